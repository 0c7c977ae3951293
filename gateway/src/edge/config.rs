//! `[listener]`: where devices connect, with which certificates, and every per-connection and
//! per-site limit of the device edge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sitegate_plugins::units::ByteSize;

use crate::invalid::Invalid;

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
/// Longest a persistent session outlives its connection, in seconds (IoT Core's default
/// persistent-session expiry); MQTT 3.1.1 sessions that are not clean get this.
pub const DEFAULT_MAX_SESSION_EXPIRY_SECS: u32 = 3_600;
/// Messages queued for one persistent session whose device is away.
pub const DEFAULT_MAX_SESSION_MESSAGES: usize = 1_000;
/// Messages queued for all persistent sessions whose device is away.
pub const DEFAULT_MAX_SAVED_MESSAGES: usize = 100_000;
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
    /// PEM files of certificate revocation lists from the device CAs. A device certificate
    /// listed is refused at the handshake; the files are read again when they change, and a
    /// live connection on a certificate newly listed is cut off (its certificate revoked in
    /// the registry). A certificate of a CA with no list here is not checked.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
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
    /// Longest Session Expiry Interval granted, in seconds: a session outlives its connection
    /// for the interval the device asks for, up to this (MQTT 5 clients are told when it is
    /// less); a not-clean MQTT 3.1.1 session gets this. 0 makes every session end with its
    /// connection.
    #[serde(default = "default_max_session_expiry_secs")]
    pub max_session_expiry_secs: u32,
    /// Most QoS 1 messages queued in the store for one persistent session while its device is
    /// away; the rest are dropped and counted (`sitegate_session_messages_dropped_total`).
    #[serde(default = "default_max_session_messages")]
    pub max_session_messages: usize,
    /// Most messages queued in the store for all away persistent sessions together.
    #[serde(default = "default_max_saved_messages")]
    pub max_saved_messages: usize,
    /// Milliseconds a write to a device may take before the connection is closed.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Connections still in their TLS handshake, site-wide, so that unauthenticated sockets
    /// cannot take the places of devices. While all are taken, new connections wait in the
    /// kernel's accept queue rather than being closed (closed, devices back off and retry).
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Of `max_pending_connections`, how many may come from one source address; a connection
    /// over it is closed at once, so one host cannot fill the queue everyone waits in.
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
fn default_max_session_expiry_secs() -> u32 {
    DEFAULT_MAX_SESSION_EXPIRY_SECS
}
fn default_max_session_messages() -> usize {
    DEFAULT_MAX_SESSION_MESSAGES
}
fn default_max_saved_messages() -> usize {
    DEFAULT_MAX_SAVED_MESSAGES
}
fn default_write_timeout_ms() -> u64 {
    DEFAULT_WRITE_TIMEOUT_MS
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

/// The largest packet MQTT's remaining-length field can describe.
const MQTT_MAX_PACKET: u64 = 268_435_455;

impl ListenerConfig {
    /// A listener section with every limit at its default.
    pub fn with_defaults(mqtts: &str, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        ListenerConfig {
            mqtts: mqtts.to_owned(),
            ca,
            cert,
            key,
            crl: Vec::new(),
            max_packet_size: default_max_packet_size(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_keep_alive_secs: DEFAULT_MAX_KEEP_ALIVE_SECS,
            max_session_expiry_secs: DEFAULT_MAX_SESSION_EXPIRY_SECS,
            max_session_messages: DEFAULT_MAX_SESSION_MESSAGES,
            max_saved_messages: DEFAULT_MAX_SAVED_MESSAGES,
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

    /// Checks addresses, file names and limits without I/O; the error names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        let l = self;
        l.mqtts.parse::<SocketAddr>().map_err(|e| {
            Invalid::new(
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
                return Err(Invalid::new(key, "must name a PEM file"));
            }
        }
        if l.crl.iter().any(|p| p.as_os_str().is_empty()) {
            return Err(Invalid::new(
                "listener.crl",
                "each entry must name a PEM file",
            ));
        }
        if l.max_packet_size.0 < 64 || l.max_packet_size.0 > MQTT_MAX_PACKET {
            return Err(Invalid::new(
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
                return Err(Invalid::new(key, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// The TLS acceptor for this listener's files, also trusting the claim CAs in `claim_ca`.
    pub fn acceptor(
        &self,
        claim_ca: Option<&std::path::Path>,
    ) -> Result<tokio_rustls::TlsAcceptor, crate::identity::tls::TlsSetupError> {
        let crls = crate::identity::tls::load_crls(&self.crl)?;
        self.acceptor_with(&crls, claim_ca)
    }

    /// The TLS acceptor with revocation lists already read.
    pub fn acceptor_with(
        &self,
        crls: &crate::identity::tls::Crls,
        claim_ca: Option<&std::path::Path>,
    ) -> Result<tokio_rustls::TlsAcceptor, crate::identity::tls::TlsSetupError> {
        crate::identity::tls::acceptor(&self.ca, &self.cert, &self.key, crls, claim_ca)
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
