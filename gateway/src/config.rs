//! The gateway's configuration: one serde tree read from TOML, composed of the sections that
//! the parts own.
//!
//! Each part owns its section, its defaults and its pure `validate()`: `[listener]` in
//! `edge`, `[auth]` in `auth`, `[spool]` in `spool`, `[routes]` and `[rules]` in `pipeline`,
//! `[admin]` and `[greengrass]` in `ops`, `[downlinks]` and `[relay]` in `downlink`; `[sinks]` is `sitegate-plugins`'s. This module
//! composes them, loads and parses (`Config::load`, `Config::from_toml_str`), resolves relative
//! paths against the config file's folder (so a config and its `pki/` folder move together),
//! and runs the checks that span sections (`Config::validate`). Only `load` touches the file
//! system.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::auth::{AuthConfig, DeviceGroupConfig, StatementConfig};
pub use crate::downlink::{DownlinkConfig, RelayConfig};
pub use crate::edge::ListenerConfig;
pub use crate::invalid::Invalid;
pub use crate::ops::{AdminConfig, GreengrassConfig};
pub use crate::pipeline::{RouteConfig, RulesConfig};
pub use crate::spool::{EncryptionConfig, QueueOverride, SpoolConfig, WhenFull};
pub use sitegate_plugins::units::{ByteSize, Period};

/// Where state lives when `data_dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sitegate";

/// Site name used when neither `site` nor `AWS_IOT_THING_NAME` is set.
pub const DEFAULT_SITE: &str = "site";

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this site; appears on every record. Defaults to `AWS_IOT_THING_NAME`, then "site".
    #[serde(default)]
    pub site: Option<String>,
    /// Directory for the device registry, the spool and the admin socket.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The device-facing MQTT over mutual TLS listener.
    pub listener: ListenerConfig,
    /// Device groups and policies, in the Greengrass client-device-auth shape.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The local administration endpoint used by `sitegate device …`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where results go: `[sinks.NAME]` with a `type` (file, log, …) and that type's keys.
    #[serde(default)]
    pub sinks: BTreeMap<String, sitegate_plugins::SinkConfig>,
    /// Direct routes: device messages on a topic filter go to a sink unchanged, without SQL.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// Rule settings shared by rules and routes.
    #[serde(default)]
    pub rules: RulesConfig,
    /// The durable, encrypted store between rules and sinks.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Running as a Greengrass v2 component.
    #[serde(default)]
    pub greengrass: GreengrassConfig,
    /// Cloud to device: `[downlinks.NAME]` subscribes a cloud topic filter on an `iotcore`
    /// sink's cloud link and hands its messages to local subscribers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub downlinks: BTreeMap<String, DownlinkConfig>,
    /// Devices' own AWS IoT Jobs and shadow topics, relayed to and from IoT Core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayConfig>,
    /// The folder relative paths were resolved against (the config file's, or the component's
    /// work folder); a configuration update from the nucleus resolves against it too.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// Why a configuration was refused. Never retryable: the file has to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid(Invalid::new(key, reason))
    }
}

impl Config {
    /// A config with `listener` and every other section at its default.
    pub fn with_listener(listener: ListenerConfig) -> Config {
        Config {
            site: None,
            data_dir: default_data_dir(),
            listener,
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            sinks: BTreeMap::new(),
            routes: BTreeMap::new(),
            rules: RulesConfig::default(),
            spool: SpoolConfig::default(),
            greengrass: GreengrassConfig::default(),
            downlinks: BTreeMap::new(),
            relay: None,
            base_dir: None,
        }
    }

    /// Reads, parses, resolves relative paths against the file's folder, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml_str(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; `origin` names the text in errors (usually the file path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Makes every relative path absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.base_dir = Some(base.to_path_buf());
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        resolve(&mut self.listener.ca);
        resolve(&mut self.listener.cert);
        resolve(&mut self.listener.key);
        if let Some(socket) = self.admin.socket.as_mut() {
            resolve(socket);
        }
        if let Some(dir) = self.rules.dir.as_mut() {
            resolve(dir);
        }
        if let Some(key_file) = self.spool.encryption.key_file.as_mut() {
            resolve(key_file);
        }
        for sink in self.sinks.values_mut() {
            for path in sink.paths_mut() {
                resolve(path);
            }
        }
    }

    /// Checks everything that can be checked without I/O; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(site) = &self.site {
            validate_site(site).map_err(|reason| ConfigError::invalid("site", reason))?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        self.listener.validate()?;
        self.admin.validate()?;
        self.auth.validate()?;
        for (name, sink) in &self.sinks {
            validate_name(name).map_err(|r| ConfigError::invalid(format!("sinks.{name}"), r))?;
            sink.validate()
                .map_err(|r| ConfigError::invalid(format!("sinks.{name}"), r))?;
            if let sitegate_plugins::SinkConfig::Iotcore(c) = sink {
                if c.via == sitegate_plugins::iotcore::Via::Nucleus && !self.greengrass.ipc {
                    return Err(ConfigError::invalid(
                        format!("sinks.{name}.via"),
                        "\"nucleus\" needs [greengrass] ipc = true",
                    ));
                }
            }
        }
        for name in self.rules.sql.keys() {
            validate_name(name)
                .map_err(|r| ConfigError::invalid(format!("rules.sql.{name}"), r))?;
        }
        self.rules
            .validate()
            .map_err(|(key, reason)| ConfigError::invalid(key, reason))?;
        for (name, route) in &self.routes {
            validate_name(name).map_err(|r| ConfigError::invalid(format!("routes.{name}"), r))?;
            if !sitegate_plugins::topic::valid_filter(&route.from) {
                return Err(ConfigError::invalid(
                    format!("routes.{name}.from"),
                    format!("{:?} is not an MQTT topic filter", route.from),
                ));
            }
            let Some(sink) = self.sinks.get(&route.to) else {
                return Err(ConfigError::invalid(
                    format!("routes.{name}.to"),
                    format!("no sink named {:?} in [sinks]", route.to),
                ));
            };
            unevaluated_expression(sink, &format!("routes.{name}.to"), "a route")?;
        }
        if let Some(error_sink) = &self.rules.error_sink {
            let Some(sink) = self.sinks.get(error_sink) else {
                return Err(ConfigError::invalid(
                    "rules.error_sink",
                    format!("no sink named {error_sink:?} in [sinks]"),
                ));
            };
            unevaluated_expression(sink, "rules.error_sink", "the error sink")?;
        }
        self.spool.validate(&self.sinks)?;
        for name in self.downlinks.keys() {
            validate_name(name)
                .map_err(|r| ConfigError::invalid(format!("downlinks.{name}"), r))?;
        }
        crate::downlink::validate(&self.downlinks, self.relay.as_ref(), &self.sinks)?;
        Ok(())
    }

    /// The site name: `site`, else `AWS_IOT_THING_NAME` (set by Greengrass), else "site".
    pub fn site_name(&self) -> String {
        self.site
            .clone()
            .or_else(|| std::env::var("AWS_IOT_THING_NAME").ok())
            .unwrap_or_else(|| DEFAULT_SITE.to_owned())
    }

    /// The routes and rules the pipeline runs, and what the rules are checked against.
    pub fn pipeline_update(&self) -> crate::pipeline::PipelineUpdate {
        crate::pipeline::PipelineUpdate::new(&self.routes, &self.rules, self.rules_context())
    }

    /// What the rules are read against: the sinks they may write to, each sink's template
    /// expressions (computed by the statements writing to it), and `[rules] account_id`.
    pub fn rules_context(&self) -> sitegate_rules::Context {
        sitegate_rules::Context {
            sinks: Some(self.sinks.keys().cloned().collect()),
            templates: self
                .sinks
                .iter()
                .filter_map(|(name, s)| {
                    let t = s.template()?;
                    (!t.expressions().is_empty()).then(|| (name.clone(), t.expressions().to_vec()))
                })
                .collect(),
            account_id: self.rules.account_id.clone(),
        }
    }

    /// The admin socket path: `[admin] socket`, else `<data_dir>/admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }
}

/// A sink fed by `what` (a route, the error sink) gets records no rule computed template values
/// for: its template may read the record's fields and identity, and any other expression would
/// silently render empty, so it is refused (iot-substitution-templates evaluates it against the
/// original message, which only a rule does here).
fn unevaluated_expression(
    sink: &sitegate_plugins::SinkConfig,
    key: &str,
    what: &str,
) -> Result<(), ConfigError> {
    let Some(t) = sink.template() else {
        return Ok(());
    };
    match t
        .expressions()
        .iter()
        .find(|e| !sitegate_plugins::template::is_field_path(e))
    {
        Some(e) => Err(ConfigError::invalid(
            key,
            format!(
                "the sink's template {:?} has `${{{e}}}`, which a rule evaluates against each \
                 message; {what} sends records no rule made, so its template may use field \
                 names and the message's identity only",
                t.source()
            ),
        )),
        None => Ok(()),
    }
}

fn validate_site(site: &str) -> Result<(), String> {
    if site.is_empty() || site.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if let Some(c) = site
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.')))
    {
        return Err(format!(
            "character {c:?} not allowed (letters, digits, - _ : .)"
        ));
    }
    Ok(())
}

/// Sink and route names become sled tree names and record fields: keep them plain.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("names are 1 to 64 letters, digits, `-` or `_`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{DEFAULT_MAX_PACKET_SIZE, DEFAULT_MQTTS};

    const MINIMAL: &str = r#"
        [listener]
        ca = "pki/ca.pem"
        cert = "pki/gateway.pem"
        key = "pki/gateway.key"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml_str(MINIMAL, "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.listener.mqtts, DEFAULT_MQTTS);
        assert_eq!(c.listener.max_packet_size.0, DEFAULT_MAX_PACKET_SIZE);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MINIMAL}\nmqtt_port = 1"); // lands in [listener]
        let err = Config::from_toml_str(&text, "t").unwrap_err().to_string();
        assert!(err.contains("unknown field `mqtt_port`"), "{err}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let text = MINIMAL.replace("[listener]", "[listener]\nmqtts = \"nowhere\"");
        let c = Config::from_toml_str(&text, "t").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("config key `listener.mqtts`"), "{err}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("256KiB".parse::<ByteSize>().unwrap().0, 262_144);
        assert_eq!("8GiB".parse::<ByteSize>().unwrap().0, 8 << 30);
        assert_eq!("10MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert_eq!("42".parse::<ByteSize>().unwrap().0, 42);
        assert!("8 parsecs"
            .parse::<ByteSize>()
            .unwrap_err()
            .contains("unit"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let mut c = Config::from_toml_str(MINIMAL, "t").unwrap();
        c.resolve_paths(Path::new("/etc/sitegate"));
        assert_eq!(c.listener.ca, PathBuf::from("/etc/sitegate/pki/ca.pem"));
        assert_eq!(
            c.admin_socket(),
            PathBuf::from("/var/lib/sitegate/admin.sock")
        );
    }

    #[test]
    fn bad_site_is_refused() {
        let text = format!("site = \"plant 7\"\n{MINIMAL}");
        let err = Config::from_toml_str(&text, "t")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`site`"), "{err}");
    }
}
