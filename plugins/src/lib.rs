//! sitegate-plugins: the `Sink` seam and the built-in sinks.
//!
//! The spool's drain hands each sink batches of [`Record`]s in queue order and forgets only
//! what the sink acknowledged. This crate never depends on the gateway.
//!
//! Layout:
//! - `record`: [`Record`] (an [`Entry`] and its spool id), one row with the identity of the device it came from, and its JSON envelope.
//! - `sink`: the [`Sink`] trait, [`Ack`], [`SinkError`] (retryable or not).
//! - `registry`: [`SinkConfig`] (`[sinks.NAME]`, tagged by `type`) and [`registry()`] of factories.
//! - `template`: `${…}` templates for partition keys and topics: identity from the record, IoT
//!   SQL expressions from the values the rule engine computed for it.
//! - `topic`: MQTT topic filter matching for routes and rule sources.
//! - `units`: sizes and periods as written in config.
//! - `aws`: one rustls HTTPS client and the standard credential chain for the AWS SDK.
//! - `backoff`: exponential backoff with jitter for every retry loop.
//! - `tls`: mutual-TLS client configuration from PEM files.
//! - `nucleus/`: Greengrass IPC (event-stream RPC to the nucleus) and, for tests, a nucleus stand-in.
//! - `file/`, `log/`, `kinesis/`, `iotcore/`, `republish/`: one folder per sink with its config and tests.

pub mod aws;
pub mod backoff;
pub mod file;
pub mod iotcore;
pub mod kinesis;
pub mod log;
pub mod nucleus;
pub mod record;
pub mod registry;
pub mod republish;
pub mod sink;
pub mod template;
pub mod tls;
pub mod topic;
pub mod units;

pub use record::{Entry, Record};
pub use registry::{build, registry, SinkConfig, SinkContext, SinkFactory};
pub use sink::{Ack, Rejected, Sink, SinkError};
pub use units::{ByteSize, Period};
