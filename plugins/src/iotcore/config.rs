//! `type = "iotcore"`: AWS IoT Core over MQTT 5 with the gateway's own certificate, or through
//! the Greengrass nucleus's connection (`via = "nucleus"`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::template::Template;
use crate::units::Period;

/// Default topic: the site, the device and the rule stay visible in the cloud.
pub const DEFAULT_TOPIC: &str = "sitegate/${site}/${thing_name}/${rule}";
/// IoT Core's per-connection publish limit.
pub const DEFAULT_MAX_PUBLISH_RATE: u32 = 100;
/// IoT Core's largest payload.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// IoT Core's longest topic.
pub const MAX_TOPIC_BYTES: usize = 256;
/// IoT Core's most forward slashes in a topic.
pub const MAX_TOPIC_SLASHES: usize = 7;
/// Keepalive of the gateway's connection.
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 30;
/// A CONNECT or a batch's PUBACKs must come back within this time.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 10_000;
/// QoS 1 publishes in flight at once.
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
/// Records per publish when `batch_records` is not given: one, each its own message.
pub const DEFAULT_BATCH_RECORDS: u16 = 1;
/// `batch_records` at most.
pub const MAX_BATCH_RECORDS: u16 = 500;

/// How an `iotcore` sink reaches IoT Core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Its own MQTT 5 connection with the gateway's certificate (`endpoint`, `cert`, `key`, `ca`).
    #[default]
    Mqtt,
    /// The Greengrass nucleus's connection: `PublishToIoTCore` over IPC. Needs
    /// `[greengrass] ipc = true` and the recipe's `accessControl` for the topics.
    Nucleus,
}

/// `[sinks.NAME]` with `type = "iotcore"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotCoreConfig {
    /// "mqtt" (default): the sink's own connection; "nucleus": through Greengrass IPC.
    #[serde(default)]
    pub via: Via,
    /// The account's IoT data endpoint as host:port, e.g. "abc123-ats.iot.eu-west-1.amazonaws.com:8883" (via = "mqtt").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The gateway's certificate (PEM) registered in IoT Core (via = "mqtt").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM) (via = "mqtt").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA certificates that sign the endpoint's server certificate, Amazon Root CA 1 (via = "mqtt").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// MQTT client id; defaults to the site name (a thing name in IoT Core) (via = "mqtt").
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic template for each record.
    #[serde(default = "default_topic")]
    pub topic: Template,
    /// Publishes per second at most on this connection.
    #[serde(default = "default_max_publish_rate")]
    pub max_publish_rate: u32,
    /// MQTT keepalive in seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// How long to wait for CONNACK and for a batch's PUBACKs.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Period,
    /// QoS 1 publishes in flight at once.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Records per publish at most. Above 1, records bound for the same topic go out together
    /// as a JSON array of their envelopes (up to IoT Core's 128 KiB payload), so throughput is
    /// not bound to `max_publish_rate` publishes per second; the user properties then carry
    /// `record-count` and `first-record-id`/`last-record-id`, and each envelope names its device.
    #[serde(default = "default_batch_records")]
    pub batch_records: u16,
}

fn default_topic() -> Template {
    Template::parse(DEFAULT_TOPIC).unwrap_or_else(|_| Template::literal("sitegate"))
}
fn default_max_publish_rate() -> u32 {
    DEFAULT_MAX_PUBLISH_RATE
}
fn default_keep_alive_secs() -> u64 {
    DEFAULT_KEEP_ALIVE_SECS
}
fn default_ack_timeout() -> Period {
    Period::from_millis(DEFAULT_ACK_TIMEOUT_MS)
}
fn default_max_inflight() -> u16 {
    DEFAULT_MAX_INFLIGHT
}
fn default_batch_records() -> u16 {
    DEFAULT_BATCH_RECORDS
}

impl IotCoreConfig {
    /// A config for the sink's own connection, every optional key at its default.
    pub fn new(endpoint: &str, cert: PathBuf, key: PathBuf, ca: PathBuf) -> Self {
        IotCoreConfig {
            via: Via::Mqtt,
            endpoint: Some(endpoint.to_string()),
            cert: Some(cert),
            key: Some(key),
            ca: Some(ca),
            ..IotCoreConfig::through_nucleus()
        }
    }

    /// A config that publishes through the Greengrass nucleus.
    pub fn through_nucleus() -> Self {
        IotCoreConfig {
            via: Via::Nucleus,
            endpoint: None,
            cert: None,
            key: None,
            ca: None,
            client_id: None,
            topic: default_topic(),
            max_publish_rate: DEFAULT_MAX_PUBLISH_RATE,
            keep_alive_secs: DEFAULT_KEEP_ALIVE_SECS,
            ack_timeout: default_ack_timeout(),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            batch_records: DEFAULT_BATCH_RECORDS,
        }
    }

    /// Host and port of `endpoint`.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let endpoint = self
            .endpoint
            .as_deref()
            .ok_or("`endpoint` is required unless via = \"nucleus\"")?;
        let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| {
            format!("`endpoint` {endpoint:?} needs a port, e.g. \"…amazonaws.com:8883\"")
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`endpoint` port {port:?} is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("`endpoint` has no host".into());
        }
        Ok((host.to_string(), port))
    }

    /// Pure checks; errors name the key below `[sinks.NAME]`.
    pub fn validate(&self) -> Result<(), String> {
        let own_connection = [
            ("endpoint", self.endpoint.is_some()),
            ("cert", self.cert.is_some()),
            ("key", self.key.is_some()),
            ("ca", self.ca.is_some()),
            ("client_id", self.client_id.is_some()),
        ];
        match self.via {
            Via::Nucleus => {
                if let Some((key, _)) = own_connection.iter().find(|(_, given)| *given) {
                    return Err(format!(
                        "`{key}` is not used with via = \"nucleus\": the nucleus holds the connection to IoT Core"
                    ));
                }
            }
            Via::Mqtt => {
                self.host_port()?;
                for (key, path) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
                    if path.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                        return Err(format!(
                            "`{key}` must name a PEM file (or set via = \"nucleus\" on Greengrass)"
                        ));
                    }
                }
            }
        }
        if self
            .client_id
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.len() > 128)
        {
            return Err("`client_id` must be 1 to 128 bytes".into());
        }
        if self.max_publish_rate == 0 {
            return Err("`max_publish_rate` must be at least 1".into());
        }
        if self.keep_alive_secs < 5 || self.keep_alive_secs > 1200 {
            return Err("`keep_alive_secs` must be between 5 and 1200 (IoT Core's range)".into());
        }
        if self.batch_records == 0 || self.batch_records > MAX_BATCH_RECORDS {
            return Err(format!(
                "`batch_records` is {}; it must be between 1 and {MAX_BATCH_RECORDS}",
                self.batch_records
            ));
        }
        if self.max_inflight == 0 {
            return Err("`max_inflight` must be at least 1".into());
        }
        Ok(())
    }
}
