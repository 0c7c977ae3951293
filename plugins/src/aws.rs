//! Shared AWS SDK set-up: one rustls (ring) HTTPS client, the standard credential chain, and the
//! endpoint override emulators need.
//!
//! Credentials come from the standard chain: environment, profile, and the container endpoint
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI`) that Greengrass's token exchange service provides.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

/// Region used when neither the config nor the environment names one.
pub const DEFAULT_REGION: &str = "us-east-1";
/// A TCP/TLS connection to an AWS endpoint must be up within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One attempt of an API call (request and response) must finish within this time.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach an AWS service.
#[derive(Debug, Clone, Default)]
pub struct AwsTarget<'a> {
    /// Endpoint URL override (an emulator such as `http://127.0.0.1:5000`).
    pub endpoint: Option<&'a str>,
    /// Region; `None` takes it from the environment, then [`DEFAULT_REGION`].
    pub region: Option<&'a str>,
    /// SDK-level attempts per call. Callers with their own retry loop (the spool drain) pass 1.
    pub max_attempts: u32,
}

/// Load an `SdkConfig` for `target` from the standard chain.
pub async fn sdk_config(target: &AwsTarget<'_>) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(target.max_attempts.max(1)));
    if let Some(region) = target.region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(endpoint) = target.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    if config.region().is_some() {
        return config;
    }
    config
        .into_builder()
        .region(Region::new(DEFAULT_REGION))
        .build()
}
