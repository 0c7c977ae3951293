//! sitegate: a site gateway for IoT fleets.
//!
//! Devices connect over MQTT with their own X.509 certificates; the gateway checks who each one
//! is and what it may do on every packet, and relays what is allowed between local devices.
//! Allowed publishes then go through routes and SQL rules (`sitegate-rules`) into an encrypted,
//! crash-safe spool, and from there to the sinks (`sitegate-plugins`).
//!
//! Layout, in the direction of dependencies (a part uses only parts above it; the test
//! `layout::parts_depend_one_way` keeps it so):
//! - leaves: `clock` (wall time), `escape` (device text made safe for logs), `disk` (the
//!   free-space reserve), `topic` (what a topic or filter may be), `secret` (owner-only key
//!   files), `invalid` (the error a config section's `validate()` returns), `metrics` (series
//!   names, the recorder, the edge's counters).
//! - `identity`: the site PKI, identity from a certificate, the thing-name rule, TLS set-up.
//! - `auth`: `[auth]`, policies, device groups and the device registry.
//! - `spool`: `[spool]`, per-sink durable queues in sled, sealed with AES-256-GCM.
//! - `pipeline`: `[routes]`, `[rules]`, ingest and the group-commit committer.
//! - `edge`: `[listener]`, accept loop, MQTT codec, sessions, session table, local broker.
//! - `delivery`: the sinks' drains.
//! - `downlink`: `[downlinks]`, `[relay]`: cloud messages and the cloud's jobs and shadow
//!   answers into the local router, on a cloud link per `iotcore` sink.
//! - `ops`: `[admin]`, `[greengrass]`, the admin socket, the Prometheus endpoint.
//! - `config`: the whole configuration tree, composed of the sections above.
//! - `control`: live reconfiguration; the Greengrass component (recipe, nucleus updates).
//! - `daemon`: `run(config, listeners, shutdown)` and [`Gateway`].
//! - `fleet`: virtual devices and `sitegate simulate`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod clock;
pub mod disk;
pub mod escape;
mod invalid;
pub mod metrics;
mod secret;
pub mod topic;

pub mod auth;
pub mod identity;
pub mod spool;

pub mod delivery;
pub mod edge;
pub mod pipeline;

pub mod downlink;

pub mod config;
pub mod ops;

pub mod control;
pub mod daemon;
pub mod fleet;

pub use config::Config;
pub use daemon::{run, Gateway, Listeners, RunError};
