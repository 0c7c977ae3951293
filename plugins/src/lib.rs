//! sitegate-plugins: the `Sink` seam and the built-in sinks.
//!
//! Empty on purpose for now: the uplinks issue fills it with the small `Sink` trait
//! (`name()`, `send(batch) -> Result<Ack, SinkError>`, defaulted `flush`/`close`), a
//! `registry()` from config `type` to factory, and one folder per sink (kinesis, iotcore,
//! republish, file, log). It will never depend on the `sitegate` gateway crate.
//!
//! Layout (planned):
//! - `sink`: the trait, `Ack`, `SinkError` (retryable or not).
//! - `kinesis/`, `iotcore/`, `republish/`, `file/`: one sink each, with its config and tests.
