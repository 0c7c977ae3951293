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
    /// The AWS account the rules belong to, 12 digits: what `accountid()` gives. A rule that
    /// calls `accountid()` is refused without it.
    #[serde(default)]
    pub account_id: Option<String>,
}

impl RulesConfig {
    /// Pure checks of the section's own keys; the message names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, sql) in &self.sql {
            if sql.trim().is_empty() {
                return Err((
                    format!("rules.sql.{name}"),
                    "is empty; give the rule's SQL".into(),
                ));
            }
        }
        if let Some(account) = &self.account_id {
            if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
                return Err((
                    "rules.account_id".into(),
                    format!("{account:?} is not an AWS account id (12 digits)"),
                ));
            }
        }
        Ok(())
    }
}
