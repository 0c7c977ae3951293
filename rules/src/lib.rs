//! sitegate-rules: AWS IoT Core SQL over the device stream, executed by DataFusion.
//!
//! Rule files (`*.sql`, one rule each, named by the file stem) hold `INSERT INTO <sink> SELECT …
//! FROM '<topic filter>' …` statements in IoT Core's dialect, plus tumbling and hopping windows.
//! Messages arrive in micro-batches, become one Arrow `RecordBatch` per statement, and run
//! through a physical plan made once per input schema. Output rows are JSON objects for sinks
//! (any JSON value for `SELECT VALUE`, a binary payload's bytes for `SELECT *`), carrying the
//! identity of the device they came from. This crate never depends on the gateway.
//!
//! Layout:
//! - `dialect`: IoT SQL to DataFusion SQL, topic filters, metadata functions, windows, errors
//!   with file, line and column; the `Context` a rule is read in (its sinks, their
//!   substitution-template expressions, which become columns, and the account).
//! - `batch`: payloads to Arrow batches (flattening, type inference, declared types, binary
//!   payloads, MQTT 5 properties) and result rows back to JSON.
//! - `engine`: plans, execution per micro-batch, windows, error records, per-rule status.
//! - `functions`: the IoT SQL function list and what each is here (DataFusion's, a UDF with
//!   IoT Core's semantics, or refused with the reason), and `cast`.
//! - `time`: `parse_time()` (Joda-Time patterns formatted in a time zone) and
//!   `time_to_epoch()` (JDK patterns read back to Unix milliseconds).
//! - `value_functions`: the functions whose arguments or results may be of any IoT type
//!   (`isNull`, `isUndefined`, `nanvl`, `get`, `decode`, `transform`), and what the dialect
//!   lowers `NULL`, `CASE`, Array/Object literals and window aggregates' arguments to.
//! - `nested`: nested object queries `(SELECT … FROM field)`, compiled at load and run on each
//!   message's field.
//! - `operators`: IoT Core's operator tables as the UDFs every operator is lowered to.
//! - `values`: IoT SQL's types over Arrow columns and the conversions between them, used by
//!   the functions, the operators and `cast` alike.
//! - `dir`: the rules directory: loading, change detection for hot reload.
//! - `sample`: running a rule over sample messages (`sitegate rules test`, the test cases).

pub mod batch;
pub mod dialect;
pub mod dir;
pub mod engine;
pub mod functions;
mod nested;
mod operators;
pub mod sample;
mod time;
mod value_functions;
mod values;

pub use batch::{Message, Properties};
pub use dialect::{Context, RuleError, RuleSpec};
pub use engine::{check, Engine, ErrorRouting, Output, Produced, RuleStatus};
