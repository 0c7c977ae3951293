//! `[auth]`: device groups and policies, in Greengrass client-device-auth's shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

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
        Ok(())
    }
}
