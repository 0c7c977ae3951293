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
        Ok(())
    }
}
