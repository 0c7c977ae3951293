//! `[routes]` and `[rules]`: what the pipeline makes records of. Whether a route's sink or the
//! error sink exists is checked by the root `config`, which sees `[sinks]`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[routes.NAME]`: every allowed device message on `from` becomes a record for `to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// MQTT topic filter, e.g. "dt/#" or "dt/+/temp".
    pub from: String,
    /// Name of the sink in `[sinks]`.
    pub to: String,
}

/// `[rules]`: settings shared by every rule and route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Folder of `*.sql` rule files (one rule per file, named by its stem), hot-reloaded.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Rules written in the config itself, name → SQL (handy in a Greengrass component
    /// configuration, which has no folder to ship); a file of the same name in `dir` is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sql: BTreeMap<String, String>,
    /// Sink that receives messages a rule cannot decode and records a sink refused for good,
    /// with the reason (IoT Core's errorAction). Without it they are logged and counted.
    #[serde(default)]
    pub error_sink: Option<String>,
}
