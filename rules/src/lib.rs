//! sitegate-rules: the rule engine that runs AWS IoT Core SQL over the device stream.
//!
//! Empty on purpose for now: the rules issue fills it with the dialect parser, Arrow batch
//! building from device payloads, one DataFusion plan per rule fed by an unbounded stream, and
//! windowed aggregates. It will never depend on the `sitegate` gateway crate.
//!
//! Layout (planned):
//! - `dialect`: IoT SQL to DataFusion SQL, topic filters, metadata functions.
//! - `batch`: JSON payloads to Arrow `RecordBatch`es.
//! - `engine`: planning once and executing over streaming input.
