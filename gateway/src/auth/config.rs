//! `[auth]`: device groups and policies, in Greengrass client-device-auth's shape.

use std::collections::BTreeMap;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sitegate_plugins::units::Period;

use crate::invalid::Invalid;

/// How often `[auth.registry]` looks again at every certificate it answers for.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(300);
/// How long what the registry last said stands while it cannot be reached.
pub const DEFAULT_TRUST_FOR: Duration = Duration::from_secs(24 * 3600);
/// Days a certificate signed for an enrolling device is valid.
pub const DEFAULT_ENROLLED_CERT_DAYS: u32 = 365;
/// Certificate requests taken per minute, site-wide, from claim certificates.
pub const DEFAULT_ENROLL_REQUESTS_PER_MINUTE: u32 = 10;
/// Enrollments waiting for a decision at once.
pub const DEFAULT_MAX_PENDING_ENROLLMENTS: usize = 100;
/// Connections made with a claim certificate at once.
pub const DEFAULT_MAX_CLAIM_SESSIONS: usize = 16;
/// How long one claim connection may stay open, waiting for its answer.
pub const DEFAULT_CLAIM_SESSION_LIMIT: Duration = Duration::from_secs(600);

/// `[auth]`: who may do what.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Device groups by name; a device belongs to every group whose selection rule matches it.
    #[serde(default)]
    pub device_groups: BTreeMap<String, DeviceGroupConfig>,
    /// Policies by name, each a map of named statements.
    #[serde(default)]
    pub policies: BTreeMap<String, BTreeMap<String, StatementConfig>>,
    /// A registry that vouches for certificates no operator decided on (the AWS IoT registry).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// In-band enrollment: devices holding a shared claim certificate may ask for their own.
    #[serde(default)]
    pub enrollment: Option<EnrollmentConfig>,
}

/// `[auth.enrollment]`: fleet provisioning by claim, at the edge. A device connecting with a
/// certificate of `claim_ca` may only publish a CSR to `$sitegate/enroll/<thing>` and take its
/// answer on `$sitegate/enroll/<thing>/accepted` or `/rejected`; the certificate is signed with
/// the site CA in `ca_dir` and sent once approved: by an operator (now or ahead), or by
/// `[auth.registry]` when the thing's `sitegate_enrollment_key` attribute names the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// PEM file of the claim CA(s): the CA that signs the shared claim certificates, never the
    /// site CA that signs devices.
    pub claim_ca: std::path::PathBuf,
    /// Directory with the site CA's `ca.pem` and `ca.key` (as `sitegate ca init` writes them),
    /// which signs the enrolled devices' certificates; its CA must be in `listener.ca`.
    pub ca_dir: std::path::PathBuf,
    /// Days an enrolled device's certificate is valid.
    #[serde(default = "default_enrolled_cert_days")]
    pub cert_days: u32,
    /// Certificate requests taken per minute, site-wide; more are answered "rate limited".
    #[serde(default = "default_enroll_requests_per_minute")]
    pub max_requests_per_minute: u32,
    /// Enrollments waiting for a decision at once; more are answered "too many pending".
    #[serde(default = "default_max_pending_enrollments")]
    pub max_pending: usize,
    /// Claim connections open at once (they take no device's place under
    /// `listener.max_connections`).
    #[serde(default = "default_max_claim_sessions")]
    pub max_sessions: usize,
    /// How long one claim connection may stay open waiting for its answer ("10m").
    #[serde(default = "default_claim_session_limit")]
    pub session_limit: Period,
}

fn default_enrolled_cert_days() -> u32 {
    DEFAULT_ENROLLED_CERT_DAYS
}
fn default_enroll_requests_per_minute() -> u32 {
    DEFAULT_ENROLL_REQUESTS_PER_MINUTE
}
fn default_max_pending_enrollments() -> usize {
    DEFAULT_MAX_PENDING_ENROLLMENTS
}
fn default_max_claim_sessions() -> usize {
    DEFAULT_MAX_CLAIM_SESSIONS
}
fn default_claim_session_limit() -> Period {
    Period(DEFAULT_CLAIM_SESSION_LIMIT)
}

/// `[auth.registry]`: the AWS IoT registry as the verifier of devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// "iot": AWS IoT Core's registry (things, thing types and groups, certificates).
    #[serde(rename = "type")]
    pub kind: String,
    /// Endpoint URL override, for emulators (`http://127.0.0.1:5000`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// AWS region; default from the environment, then us-east-1.
    #[serde(default)]
    pub region: Option<String>,
    /// How often every certificate it answers for is looked up again ("5m").
    #[serde(default = "default_sync_interval")]
    pub sync_interval: Period,
    /// How long its last answer stands while it cannot be reached; after that a certificate
    /// only it approved is pending again until it answers ("24h").
    #[serde(default = "default_trust_for")]
    pub trust_for: Period,
}

fn default_sync_interval() -> Period {
    Period(DEFAULT_SYNC_INTERVAL)
}

fn default_trust_for() -> Period {
    Period(DEFAULT_TRUST_FOR)
}

/// `[auth.device_groups.NAME]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceGroupConfig {
    /// Which things belong, e.g. "thingName: pump-* OR thingName: door-1".
    pub selection_rule: String,
    /// Name of the policy in `[auth.policies]` the group's members get.
    pub policy: String,
}

/// `[auth.policies.POLICY.STATEMENT]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatementConfig {
    /// Free text for the operator; not interpreted.
    #[serde(default)]
    pub description: Option<String>,
    /// "mqtt:connect", "mqtt:publish", "mqtt:subscribe" or "*".
    pub operations: Vec<String>,
    /// "mqtt:clientId:…", "mqtt:topic:…", "mqtt:topicfilter:…" or "*"; may use `${iot:Connection.Thing.ThingName}`.
    pub resources: Vec<String>,
}

impl AuthConfig {
    /// Checks groups, selection rules, policy references and statements.
    pub fn validate(&self) -> Result<(), Invalid> {
        super::PolicySet::compile(self)?;
        if let Some(r) = &self.registry {
            if r.kind != "iot" {
                return Err(Invalid::new(
                    "auth.registry.type",
                    format!("{:?} is not a registry sitegate knows (\"iot\")", r.kind),
                ));
            }
            if r.sync_interval.0 < Duration::from_secs(1) {
                return Err(Invalid::new(
                    "auth.registry.sync_interval",
                    "must be at least 1s",
                ));
            }
        }
        if let Some(e) = &self.enrollment {
            e.validate()?;
        }
        Ok(())
    }
}

impl EnrollmentConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let positive = [
            ("auth.enrollment.cert_days", u64::from(self.cert_days)),
            (
                "auth.enrollment.max_requests_per_minute",
                u64::from(self.max_requests_per_minute),
            ),
            ("auth.enrollment.max_pending", self.max_pending as u64),
            ("auth.enrollment.max_sessions", self.max_sessions as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Invalid::new(key, "must be greater than 0"));
            }
        }
        if self.session_limit.0 < Duration::from_secs(1) {
            return Err(Invalid::new(
                "auth.enrollment.session_limit",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}
