//! The gateway's configuration: one serde tree read from TOML.
//!
//! Parsing (`Config::from_toml_str`) and validation (`Config::validate`) are pure; only
//! `Config::load` touches the file system. Relative paths are resolved against the directory of
//! the config file, so a config and its `pki/` folder can move together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::policy::{PolicySet, PROVISIONING_GROUP};

/// Where state lives when `data_dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sitegate";
/// The MQTT over TLS port devices connect to.
pub const DEFAULT_MQTTS: &str = "0.0.0.0:8883";
/// Largest MQTT packet accepted from a device (IoT Core's payload limit is 128 KB; headroom for topic and properties).
pub const DEFAULT_MAX_PACKET_SIZE: u64 = 256 * 1024;
/// Concurrent device connections before new ones are turned away.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// QoS 1 messages in flight per connection in each direction (MQTT 5 receive maximum).
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
/// A TLS handshake must finish within this many milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// The CONNECT packet must arrive within this many milliseconds after the handshake.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Keepalive granted to clients that ask for none or for more (seconds; IoT Core's maximum).
pub const DEFAULT_MAX_KEEP_ALIVE_SECS: u16 = 1_200;
/// A write to a device that does not complete in this many milliseconds closes the connection.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Connections still in their TLS handshake or before CONNECT, site-wide: they have not shown
/// a valid certificate yet, so they get a budget of their own beside `max_connections`.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 256;
/// Of those, from one source address.
pub const DEFAULT_MAX_PENDING_PER_ADDRESS: usize = 32;
/// Topic filters in one SUBSCRIBE (IoT Core's limit).
pub const DEFAULT_MAX_FILTERS_PER_SUBSCRIBE: usize = 8;
/// Subscriptions one connection may hold (IoT Core's limit).
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 50;
/// Retained messages kept for the whole site.
pub const DEFAULT_MAX_RETAINED_MESSAGES: usize = 10_000;
/// Bytes (topic and payload) of the retained messages of the whole site.
pub const DEFAULT_MAX_RETAINED_BYTES: u64 = 8 * 1024 * 1024;
/// Distinct topics and filters the local router may cache before it is rebuilt to free them.
pub const DEFAULT_ROUTER_CACHE_LIMIT: usize = 100_000;
/// Stored bytes per sink queue when `[spool] max_bytes` is not given.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Age limit of spooled records when `[spool] max_age` is not given (7 days).
pub const DEFAULT_SPOOL_MAX_AGE_SECS: u64 = 7 * 86_400;
/// Free space kept on the data_dir filesystem when `[spool] disk_reserve` is not given: room
/// for sled's own segment writes and the device registry after the spool stops taking data.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;
/// Group commit interval in milliseconds.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 5;
/// Group commit size in messages.
pub const DEFAULT_COMMIT_RECORDS: usize = 2_000;
/// Messages waiting for a commit before sessions wait.
pub const DEFAULT_MAX_PENDING: usize = 20_000;
/// Blocks sealed under one data key before a new one is made (random 96-bit nonces stay far
/// below the 2^32 messages-per-key bound).
pub const DEFAULT_ROTATE_BLOCKS: u64 = 1 << 20;
/// Age of a data key before a new one is made (1 day).
pub const DEFAULT_ROTATE_AFTER_SECS: u64 = 86_400;
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
    /// The folder relative paths were resolved against (the config file's, or the component's
    /// work folder); a configuration update from the nucleus resolves against it too.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[greengrass]`: what sitegate does with the nucleus when it runs as a component.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GreengrassConfig {
    /// Talk to the nucleus over Greengrass IPC: follow component configuration updates (sinks,
    /// routes and rules reload live) and let `iotcore` sinks publish with `via = "nucleus"`.
    /// Needs the component's IPC environment (`SVCUID`, the nucleus socket).
    #[serde(default)]
    pub ipc: bool,
}

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

/// What a full queue does with new data.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Hold new data (and so the devices' PUBACKs) until the sink drains some.
    #[default]
    Block,
    /// Evict the oldest blocks, counted, to make room.
    DropOldest,
}

/// `[spool]`: limits and group commit of the per-sink queues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Stored bytes per sink queue at most.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: ByteSize,
    /// Records older than this are dropped (counted) even if undelivered.
    #[serde(default = "default_spool_max_age")]
    pub max_age: Period,
    /// What a full queue does: "block" or "drop_oldest".
    #[serde(default)]
    pub when_full: WhenFull,
    /// Free space the spool leaves on the data_dir filesystem. Below it, every queue acts as
    /// if at `max_bytes` (`when_full` applies) and new devices are not registered, so sled
    /// never meets a full disk; both resume by themselves when space returns. 0 turns it off.
    #[serde(default = "default_disk_reserve")]
    pub disk_reserve: ByteSize,
    /// Group commit: a commit (one fsync) happens this long after the first waiting message…
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Period,
    /// …or as soon as this many messages wait, whichever comes first.
    #[serde(default = "default_commit_records")]
    pub commit_records: usize,
    /// Messages waiting for a commit at most; beyond this, device sessions wait (backpressure).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How spool blocks are encrypted.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Per-sink overrides of `max_bytes`, `max_age` and `when_full`.
    #[serde(default)]
    pub sinks: BTreeMap<String, QueueOverride>,
}

/// `[spool.sinks.NAME]`: limits for one sink's queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueOverride {
    /// Stored bytes for this queue at most.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// Age limit for this queue.
    #[serde(default)]
    pub max_age: Option<Period>,
    /// Full behaviour for this queue.
    #[serde(default)]
    pub when_full: Option<WhenFull>,
}

/// `[spool.encryption]`: data keys wrapped by KMS, by a local key file, or both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// KMS key (id, ARN or alias) that wraps data keys via GenerateDataKey.
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// KMS endpoint override (an emulator such as "http://127.0.0.1:5000").
    #[serde(default)]
    pub endpoint: Option<String>,
    /// AWS region for KMS; default from the environment.
    #[serde(default)]
    pub region: Option<String>,
    /// Local key-encryption key (32 random bytes, mode 0600). With `kms_key_id` too, it is the
    /// fallback that lets the hub accept data while KMS is unreachable. Without either, one is
    /// created at `<data_dir>/spool.kek`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A new data key after this many sealed blocks.
    #[serde(default = "default_rotate_blocks")]
    pub rotate_blocks: u64,
    /// A new data key after this long.
    #[serde(default = "default_rotate_after")]
    pub rotate_after: Period,
}

/// `[listener]`: where devices connect and with which certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address and port for MQTT over TLS, e.g. "0.0.0.0:8883".
    #[serde(default = "default_mqtts")]
    pub mqtts: String,
    /// PEM file with one or more CA certificates that sign device certificates.
    pub ca: PathBuf,
    /// PEM certificate (chain) the gateway presents to devices.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Largest MQTT packet accepted, as bytes or a size such as "256KiB".
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// Concurrent device connections; further ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// QoS 1 messages in flight per connection (advertised as MQTT 5 receive maximum).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Milliseconds a TLS handshake may take.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Milliseconds between the end of the handshake and the CONNECT packet.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Largest keepalive granted, in seconds; clients asking for 0 or more get this.
    #[serde(default = "default_max_keep_alive_secs")]
    pub max_keep_alive_secs: u16,
    /// Milliseconds a write to a device may take before the connection is closed.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Connections still in their TLS handshake or waiting for CONNECT, site-wide; further
    /// ones are closed at once, so unauthenticated sockets cannot take the places of devices.
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Of `max_pending_connections`, how many may come from one source address.
    #[serde(default = "default_max_pending_per_address")]
    pub max_pending_per_address: usize,
    /// Longest topic name or filter, in bytes of UTF-8.
    #[serde(default = "default_max_topic_bytes")]
    pub max_topic_bytes: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Most topic filters in one SUBSCRIBE; the rest are refused with 0x97 (quota exceeded).
    #[serde(default = "default_max_filters_per_subscribe")]
    pub max_filters_per_subscribe: usize,
    /// Most subscriptions one connection holds; further filters are refused with 0x97.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Most retained messages kept for the whole site; a retained publish beyond it is refused
    /// (MQTT 5 PUBACK 0x97).
    #[serde(default = "default_max_retained_messages")]
    pub max_retained_messages: usize,
    /// Most bytes (topic and payload) of retained messages for the whole site.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: ByteSize,
    /// Distinct topics and filters the local router may have cached before it is rebuilt to
    /// free them (its caches are never freed otherwise); sessions link again on their own.
    #[serde(default = "default_router_cache_limit")]
    pub router_cache_limit: usize,
}

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

/// `[admin]`: the local endpoint that `sitegate device approve|revoke|list` talk to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket path (mode 0600). Defaults to `<data_dir>/admin.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://<this>/metrics`, e.g. "127.0.0.1:9464". A loopback
    /// address only: the endpoint has no authentication. Off when absent.
    #[serde(default)]
    pub metrics: Option<String>,
}

fn default_max_pending_connections() -> usize {
    DEFAULT_MAX_PENDING_CONNECTIONS
}
fn default_max_pending_per_address() -> usize {
    DEFAULT_MAX_PENDING_PER_ADDRESS
}
fn default_max_topic_bytes() -> usize {
    crate::topic::DEFAULT_MAX_TOPIC_BYTES
}
fn default_max_topic_levels() -> usize {
    crate::topic::DEFAULT_MAX_TOPIC_LEVELS
}
fn default_max_filters_per_subscribe() -> usize {
    DEFAULT_MAX_FILTERS_PER_SUBSCRIBE
}
fn default_max_subscriptions() -> usize {
    DEFAULT_MAX_SUBSCRIPTIONS
}
fn default_max_retained_messages() -> usize {
    DEFAULT_MAX_RETAINED_MESSAGES
}
fn default_max_retained_bytes() -> ByteSize {
    ByteSize(DEFAULT_MAX_RETAINED_BYTES)
}
fn default_router_cache_limit() -> usize {
    DEFAULT_ROUTER_CACHE_LIMIT
}
fn default_spool_max_bytes() -> ByteSize {
    ByteSize(DEFAULT_SPOOL_MAX_BYTES)
}
fn default_disk_reserve() -> ByteSize {
    ByteSize(DEFAULT_DISK_RESERVE)
}
fn default_spool_max_age() -> Period {
    Period::from_secs(DEFAULT_SPOOL_MAX_AGE_SECS)
}
fn default_commit_interval() -> Period {
    Period::from_millis(DEFAULT_COMMIT_INTERVAL_MS)
}
fn default_commit_records() -> usize {
    DEFAULT_COMMIT_RECORDS
}
fn default_max_pending() -> usize {
    DEFAULT_MAX_PENDING
}
fn default_rotate_blocks() -> u64 {
    DEFAULT_ROTATE_BLOCKS
}
fn default_rotate_after() -> Period {
    Period::from_secs(DEFAULT_ROTATE_AFTER_SECS)
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: default_spool_max_bytes(),
            max_age: default_spool_max_age(),
            when_full: WhenFull::Block,
            disk_reserve: default_disk_reserve(),
            commit_interval: default_commit_interval(),
            commit_records: DEFAULT_COMMIT_RECORDS,
            max_pending: DEFAULT_MAX_PENDING,
            encryption: EncryptionConfig::default(),
            sinks: BTreeMap::new(),
        }
    }
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            kms_key_id: None,
            endpoint: None,
            region: None,
            key_file: None,
            rotate_blocks: DEFAULT_ROTATE_BLOCKS,
            rotate_after: default_rotate_after(),
        }
    }
}

impl SpoolConfig {
    /// The limits of `sink`'s queue, overrides applied.
    pub fn limits_for(&self, sink: &str) -> crate::spool::QueueLimits {
        let o = self.sinks.get(sink).cloned().unwrap_or_default();
        crate::spool::QueueLimits {
            max_bytes: o.max_bytes.unwrap_or(self.max_bytes).0,
            max_age_ms: u64::from(o.max_age.unwrap_or(self.max_age)),
            when_full: o.when_full.unwrap_or(self.when_full),
        }
    }

    fn validate(
        &self,
        sinks: &BTreeMap<String, sitegate_plugins::SinkConfig>,
    ) -> Result<(), ConfigError> {
        let sizes = std::iter::once(("spool.max_bytes".to_string(), Some(self.max_bytes))).chain(
            self.sinks
                .iter()
                .map(|(n, o)| (format!("spool.sinks.{n}.max_bytes"), o.max_bytes)),
        );
        for (key, size) in sizes {
            if size.is_some_and(|s| s.0 < 4096) {
                return Err(ConfigError::invalid(key, "must be at least 4KiB"));
            }
        }
        for name in self.sinks.keys() {
            if !sinks.contains_key(name) {
                return Err(ConfigError::invalid(
                    format!("spool.sinks.{name}"),
                    "no such sink in [sinks]",
                ));
            }
        }
        if self.commit_interval.0.is_zero() || self.commit_interval.0 > Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "spool.commit_interval",
                "must be between 1ms and 1s",
            ));
        }
        for (key, value) in [
            ("spool.commit_records", self.commit_records),
            ("spool.max_pending", self.max_pending),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        let e = &self.encryption;
        if e.kms_key_id.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::invalid(
                "spool.encryption.kms_key_id",
                "must not be empty",
            ));
        }
        if e.endpoint.is_some() && e.kms_key_id.is_none() {
            return Err(ConfigError::invalid(
                "spool.encryption.endpoint",
                "set only with kms_key_id",
            ));
        }
        if e.rotate_blocks == 0 || e.rotate_blocks > 1 << 30 {
            return Err(ConfigError::invalid(
                "spool.encryption.rotate_blocks",
                "must be between 1 and 2^30",
            ));
        }
        Ok(())
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_mqtts() -> String {
    DEFAULT_MQTTS.to_owned()
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_PACKET_SIZE)
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_inflight() -> u16 {
    DEFAULT_MAX_INFLIGHT
}
fn default_handshake_timeout_ms() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT_MS
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_max_keep_alive_secs() -> u16 {
    DEFAULT_MAX_KEEP_ALIVE_SECS
}
fn default_write_timeout_ms() -> u64 {
    DEFAULT_WRITE_TIMEOUT_MS
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
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The largest packet MQTT's remaining-length field can describe.
const MQTT_MAX_PACKET: u64 = 268_435_455;

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
        let l = &self.listener;
        l.mqtts.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid(
                "listener.mqtts",
                format!("{e}: expected host:port such as \"0.0.0.0:8883\""),
            )
        })?;
        for (key, path) in [
            ("listener.ca", &l.ca),
            ("listener.cert", &l.cert),
            ("listener.key", &l.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(key, "must name a PEM file"));
            }
        }
        if l.max_packet_size.0 < 64 || l.max_packet_size.0 > MQTT_MAX_PACKET {
            return Err(ConfigError::invalid(
                "listener.max_packet_size",
                format!("must be between 64 bytes and {MQTT_MAX_PACKET} bytes"),
            ));
        }
        let positive = [
            ("listener.max_connections", l.max_connections as u64),
            ("listener.max_inflight", u64::from(l.max_inflight)),
            ("listener.handshake_timeout_ms", l.handshake_timeout_ms),
            ("listener.connect_timeout_ms", l.connect_timeout_ms),
            (
                "listener.max_keep_alive_secs",
                u64::from(l.max_keep_alive_secs),
            ),
            ("listener.write_timeout_ms", l.write_timeout_ms),
            (
                "listener.max_pending_connections",
                l.max_pending_connections as u64,
            ),
            (
                "listener.max_pending_per_address",
                l.max_pending_per_address as u64,
            ),
            ("listener.max_topic_bytes", l.max_topic_bytes as u64),
            ("listener.max_topic_levels", l.max_topic_levels as u64),
            (
                "listener.max_filters_per_subscribe",
                l.max_filters_per_subscribe as u64,
            ),
            ("listener.max_subscriptions", l.max_subscriptions as u64),
            ("listener.router_cache_limit", l.router_cache_limit as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        if let Some(metrics) = &self.admin.metrics {
            let addr = metrics.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid(
                    "admin.metrics",
                    format!("{e}: expected host:port such as \"127.0.0.1:9464\""),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    "admin.metrics",
                    format!("{addr} is not a loopback address; the metrics endpoint has no authentication, so it serves 127.0.0.1 or ::1 only"),
                ));
            }
        }
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
        for (name, sql) in &self.rules.sql {
            validate_name(name)
                .map_err(|r| ConfigError::invalid(format!("rules.sql.{name}"), r))?;
            if sql.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("rules.sql.{name}"),
                    "is empty; give the rule's SQL",
                ));
            }
        }
        for (name, route) in &self.routes {
            validate_name(name).map_err(|r| ConfigError::invalid(format!("routes.{name}"), r))?;
            if !sitegate_plugins::topic::valid_filter(&route.from) {
                return Err(ConfigError::invalid(
                    format!("routes.{name}.from"),
                    format!("{:?} is not an MQTT topic filter", route.from),
                ));
            }
            if !self.sinks.contains_key(&route.to) {
                return Err(ConfigError::invalid(
                    format!("routes.{name}.to"),
                    format!("no sink named {:?} in [sinks]", route.to),
                ));
            }
        }
        if let Some(error_sink) = &self.rules.error_sink {
            if !self.sinks.contains_key(error_sink) {
                return Err(ConfigError::invalid(
                    "rules.error_sink",
                    format!("no sink named {error_sink:?} in [sinks]"),
                ));
            }
        }
        self.spool.validate(&self.sinks)?;
        Ok(())
    }

    /// The site name: `site`, else `AWS_IOT_THING_NAME` (set by Greengrass), else "site".
    pub fn site_name(&self) -> String {
        self.site
            .clone()
            .or_else(|| std::env::var("AWS_IOT_THING_NAME").ok())
            .unwrap_or_else(|| DEFAULT_SITE.to_owned())
    }

    /// The admin socket path: `[admin] socket`, else `<data_dir>/admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }
}

impl ListenerConfig {
    /// A listener section with every limit at its default.
    pub fn with_defaults(mqtts: &str, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        ListenerConfig {
            mqtts: mqtts.to_owned(),
            ca,
            cert,
            key,
            max_packet_size: default_max_packet_size(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_keep_alive_secs: DEFAULT_MAX_KEEP_ALIVE_SECS,
            write_timeout_ms: DEFAULT_WRITE_TIMEOUT_MS,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
            max_pending_per_address: DEFAULT_MAX_PENDING_PER_ADDRESS,
            max_topic_bytes: crate::topic::DEFAULT_MAX_TOPIC_BYTES,
            max_topic_levels: crate::topic::DEFAULT_MAX_TOPIC_LEVELS,
            max_filters_per_subscribe: DEFAULT_MAX_FILTERS_PER_SUBSCRIBE,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_retained_messages: DEFAULT_MAX_RETAINED_MESSAGES,
            max_retained_bytes: ByteSize(DEFAULT_MAX_RETAINED_BYTES),
            router_cache_limit: DEFAULT_ROUTER_CACHE_LIMIT,
        }
    }

    /// The topic size limits of this listener.
    pub fn topic_limits(&self) -> crate::topic::TopicLimits {
        crate::topic::TopicLimits {
            max_bytes: self.max_topic_bytes,
            max_levels: self.max_topic_levels,
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

impl AuthConfig {
    /// Checks groups, selection rules, policy references and statements.
    pub fn validate(&self) -> Result<(), ConfigError> {
        PolicySet::compile(self)?;
        Ok(())
    }
}

impl From<crate::auth::policy::PolicyError> for ConfigError {
    fn from(e: crate::auth::policy::PolicyError) -> Self {
        ConfigError::invalid(e.key, e.reason)
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

/// Reserved group names that a config may not define.
pub fn is_reserved_group(name: &str) -> bool {
    name == PROVISIONING_GROUP
}

pub use sitegate_plugins::units::{ByteSize, Period};

#[cfg(test)]
mod tests {
    use super::*;

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
