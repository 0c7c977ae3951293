//! sitegate: a site gateway for IoT fleets.
//!
//! Devices connect over MQTT with their own X.509 certificates; the gateway checks who each one
//! is and what it may do on every packet, and relays what is allowed between local devices.
//! Allowed publishes then go through routes and SQL rules (`sitegate-rules`) into an encrypted,
//! crash-safe spool, and from there to the sinks (`sitegate-plugins`).
//!
//! Layout:
//! - `config`: the TOML configuration tree, defaults and validation.
//! - `topic`: what a topic or filter may be (MQTT's UTF-8 and wildcard rules, size limits).
//! - `escape`: device-controlled text made safe for log lines.
//! - `disk`: the free-space reserve of the data_dir filesystem.
//! - `pki`: site CA, gateway and device certificates, identity from a certificate.
//! - `auth`: policies, device groups and the device registry; what a device may do.
//! - `tls`: the listener's mutual-TLS setup.
//! - `listener`: accept loop, handshake timeout, connection limit.
//! - `codec`: MQTT 3.1.1 / 5 framing over rumqttd's protocol codec.
//! - `session`: one device's MQTT session with per-packet authorization.
//! - `sessions`: the table of live sessions (takeover, revocation, shutdown).
//! - `broker`: rumqttd's router as the local fan-out fabric.
//! - `pipeline`: ingest of allowed publishes, routes, group commit into the spool.
//! - `spool`: per-sink durable queues in sled, compressed and AES-256-GCM sealed; the drains.
//! - `admin`: the local admin socket behind `sitegate device …`.
//! - `stats`: counters of the device edge.
//! - `prometheus`: the `/metrics` endpoint on a loopback port, latency histograms.
//! - `daemon`: `run(config, listeners, shutdown)` and [`Gateway`].
//! - `greengrass`: the component recipe, configuration from the nucleus and following its updates.
//! - `live`: live reconfiguration of sinks, routes and rules; the sinks' drains.
//! - `fleet`: virtual devices (rumqttc over mutual TLS) for the demo, simulator and tests.
//! - `fuzzing`: the device edge in memory (real sessions and router) for fuzzers and property
//!   tests; MQTT packets as bytes.
//! - `simulate`: `sitegate simulate`, a fleet of thousands of virtual devices with a summary.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod escape;
pub mod fleet;
pub mod fuzzing;
pub mod greengrass;
pub mod listener;
pub mod live;
pub mod pipeline;
pub mod pki;
pub mod prometheus;
pub mod session;
pub mod sessions;
pub mod simulate;
pub mod spool;
pub mod stats;
pub mod tls;
pub mod topic;

pub use config::Config;
pub use daemon::{run, Gateway, Listeners, RunError};
