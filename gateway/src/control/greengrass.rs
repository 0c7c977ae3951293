//! Running as an AWS IoT Greengrass v2 component: the recipe, generated from the code so it
//! never drifts, and the component's default configuration (the same tree as the TOML config).
//!
//! The nucleus hands the component configuration to the process through the recipe's `Setenv`
//! (`SITEGATE_CONFIG_JSON = {configuration:/sitegate}`), relative paths resolve against the
//! component's work folder, `site` defaults to `AWS_IOT_THING_NAME`, and AWS credentials come
//! from the token exchange service, which the SDK's standard chain finds as the container
//! credentials endpoint.
//!
//! With `[greengrass] ipc = true`, [`follow_configuration`] subscribes to the component's
//! configuration through the nucleus (Greengrass IPC) and applies each new version live: sinks,
//! routes and rules change while devices stay connected; an invalid version is refused with the
//! reason logged and counted, and the running configuration stays.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sitegate_plugins::backoff::Backoff;
use sitegate_plugins::nucleus::Nucleus;
use tokio::sync::watch;

use crate::config::{Config, GreengrassConfig, ListenerConfig};
use crate::control::live::Live;

/// The component's name in Greengrass.
pub const COMPONENT_NAME: &str = "io.sitegate.Gateway";
/// Environment variable carrying the component configuration as JSON.
pub const CONFIG_ENV: &str = "SITEGATE_CONFIG_JSON";
/// The key of the component configuration that holds sitegate's config tree.
pub const CONFIG_KEY: &str = "sitegate";
/// A deployment changes many keys at once, one event each: wait this long for quiet.
pub const UPDATE_SETTLE: Duration = Duration::from_millis(300);
/// The IPC operation `iotcore` sinks with `via = "nucleus"` need, and its access-control policy.
pub const PUBLISH_POLICY: &str = "io.sitegate.Gateway:mqttproxy:1";

/// Greengrass's names for the architectures a manifest is built for, and ours in artifact names.
pub const ARCHITECTURES: [(&str, &str); 2] = [("amd64", "x86_64"), ("aarch64", "aarch64")];

/// The configuration a fresh component starts with: TLS files from `sitegate ca init` in the
/// work folder, state in `data`, the spool sealed by a key file next to the CA. Deployments add
/// `auth`, `sinks` and `routes` by merging into `/sitegate`.
pub fn default_config() -> Config {
    let mut config = Config::with_listener(ListenerConfig::with_defaults(
        crate::edge::DEFAULT_MQTTS,
        PathBuf::from("pki/ca.pem"),
        PathBuf::from("pki/gateway.pem"),
        PathBuf::from("pki/gateway.key"),
    ));
    config.data_dir = PathBuf::from("data");
    config.spool.encryption.key_file = Some(PathBuf::from("pki/spool.kek"));
    config.greengrass = GreengrassConfig { ipc: true };
    config
}

/// The component's environment: its configuration.
fn setenv() -> Value {
    json!({ (CONFIG_ENV): "{configuration:/sitegate}" })
}

/// The recipe for `version`, with artifacts at `artifact_uri` (`{arch}` becomes x86_64 or
/// aarch64 per manifest).
pub fn recipe(version: &str, artifact_uri: &str) -> Value {
    let defaults = serde_json::to_value(default_config()).unwrap_or(Value::Null);
    let manifests: Vec<Value> = ARCHITECTURES
        .iter()
        .map(|(gg_arch, our_arch)| {
            json!({
                "Platform": { "os": "linux", "architecture": gg_arch },
                "Lifecycle": {
                    "Setenv": setenv(),
                    "Install": "{artifacts:path}/sitegate ca init --dir {work:path}/pki --site {iot:thingName} --if-missing",
                    "Run": "{artifacts:path}/sitegate run --config-env --base-dir {work:path}",
                },
                "Artifacts": [{
                    "URI": artifact_uri.replace("{arch}", our_arch),
                    "Unarchive": "NONE",
                    "Permission": { "Read": "OWNER", "Execute": "OWNER" },
                }],
            })
        })
        .collect();
    let mut dependencies = BTreeMap::new();
    dependencies.insert(
        "aws.greengrass.TokenExchangeService",
        json!({ "VersionRequirement": "^2.0.0", "DependencyType": "HARD" }),
    );
    json!({
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": COMPONENT_NAME,
        "ComponentVersion": version,
        "ComponentDescription": "sitegate: site gateway for IoT fleets (device identity, least privilege, encrypted store-and-forward to Kinesis and IoT Core)",
        "ComponentPublisher": "sitegate",
        "ComponentDependencies": dependencies,
        "ComponentConfiguration": { "DefaultConfiguration": {
            CONFIG_KEY: defaults,
            // Only what an `iotcore` sink with via = "nucleus" publishes: the default topic
            // template's prefix. Reading and following its own configuration needs no entry.
            "accessControl": { "aws.greengrass.ipc.mqttproxy": { PUBLISH_POLICY: {
                "policyDescription": "sitegate forwards device records to AWS IoT Core",
                "operations": ["aws.greengrass#PublishToIoTCore"],
                "resources": ["sitegate/#"],
            } } },
        } },
        "Manifests": manifests,
    })
}

/// The recipe as YAML.
pub fn recipe_yaml(version: &str, artifact_uri: &str) -> String {
    let header = "# Generated by `sitegate greengrass recipe`; do not edit by hand.\n";
    let body = serde_yaml::to_string(&recipe(version, artifact_uri)).unwrap_or_default();
    // YAML 1.1 readers (the nucleus's among them) take an unquoted 2020-01-25 for a date.
    let body = body.replace(
        "RecipeFormatVersion: 2020-01-25",
        "RecipeFormatVersion: '2020-01-25'",
    );
    format!("{header}{body}")
}

/// Parse the component configuration JSON (the `/sitegate` object) into a config whose
/// relative paths are taken from `base` (the component's work folder).
pub fn config_from_json(
    text: &str,
    base: &std::path::Path,
) -> Result<Config, crate::config::ConfigError> {
    let mut config: Config =
        serde_json::from_str(text).map_err(|e| crate::config::ConfigError::Parse {
            origin: "component configuration JSON".into(),
            message: e.to_string(),
        })?;
    config.resolve_paths(base);
    config.validate()?;
    Ok(config)
}

/// Follows the component's configuration through the nucleus until `stopped`: each new version
/// (after a deployment's burst of events settles) is read whole, validated and applied live.
/// A broken subscription is renewed with backoff; the latest version is read on every renewal.
pub async fn follow_configuration(
    nucleus: Arc<Nucleus>,
    live: Arc<Live>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let subscribed = tokio::select! {
            s = nucleus.subscribe_to_configuration_update(&[CONFIG_KEY]) => s,
            _ = stopped.changed() => return,
        };
        let mut updates = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the component configuration; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.step()) => continue,
                    _ = stopped.changed() => return,
                }
            }
        };
        backoff.reset();
        tracing::info!(socket = %nucleus.socket().display(), "following the component configuration");
        // What changed while nobody listened (at start, or while the nucleus restarted).
        apply_latest(&nucleus, &live).await;
        loop {
            tokio::select! {
                event = updates.next() => match event {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "configuration update event"),
                    Some(Ok(_)) => {
                        // Let the rest of the deployment's events arrive, then read once.
                        loop {
                            tokio::select! {
                                more = updates.next() => if more.is_none() { break },
                                _ = tokio::time::sleep(UPDATE_SETTLE) => break,
                            }
                        }
                        apply_latest(&nucleus, &live).await;
                    }
                },
                _ = stopped.changed() => return,
            }
        }
        tracing::warn!("the configuration subscription ended; renewing it");
    }
}

/// Reads the configuration from the nucleus and applies it if it differs from what runs.
async fn apply_latest(nucleus: &Nucleus, live: &Live) {
    let value = match nucleus.get_configuration(&[CONFIG_KEY]).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the component configuration");
            return;
        }
    };
    let running = live.running().await;
    let base = running
        .base_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("."));
    let new = match config_from_json(&value.to_string(), &base) {
        Ok(c) => c,
        Err(e) => {
            live.refused();
            tracing::error!(error = %e, "configuration update refused; the running configuration stays");
            return;
        }
    };
    if !live.differs(&new).await {
        return;
    }
    match live.apply(new).await {
        Ok(applied) => {
            tracing::info!(
                started = ?applied.sinks_started,
                replaced = ?applied.sinks_replaced,
                stopped = ?applied.sinks_stopped,
                "configuration update applied"
            );
            if !applied.restart_needed.is_empty() {
                tracing::warn!(keys = ?applied.restart_needed, "these keys changed and take effect at the next restart");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration update refused; the running configuration stays")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_a_valid_config() {
        let recipe = recipe("1.2.3", "s3://bucket/sitegate-{arch}");
        let defaults = &recipe["ComponentConfiguration"]["DefaultConfiguration"]["sitegate"];
        let config = config_from_json(
            &defaults.to_string(),
            std::path::Path::new("/greengrass/v2/work/io.sitegate.Gateway"),
        )
        .unwrap();
        assert_eq!(
            config.data_dir,
            PathBuf::from("/greengrass/v2/work/io.sitegate.Gateway/data")
        );
        assert_eq!(
            recipe["Manifests"][1]["Artifacts"][0]["URI"],
            "s3://bucket/sitegate-aarch64"
        );
    }

    #[test]
    fn json_errors_name_the_key() {
        let err = config_from_json(
            r#"{"listener":{"ca":"a","cert":"b","key":"c"},"spool":{"when_full":"later"}}"#,
            std::path::Path::new("/w"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("later"), "{err}");
    }
}
