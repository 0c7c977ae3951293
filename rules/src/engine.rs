//! Executing rules: each statement is planned once per input schema with DataFusion (a
//! `StreamingTable` over a one-slot `PartitionStream` stands in for the stream) and the same
//! physical plan is executed for every micro-batch. Windowed statements keep their messages per
//! window and run their aggregate plan when the window closes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batch::{self, Message, Row};
use crate::dialect::{self, Context, RuleError, RuleSpec, StatementSpec, WindowSpec};

/// Plans kept per statement (one per distinct input schema) before the oldest are dropped.
const MAX_PLANS_PER_STATEMENT: usize = 16;

/// A record a rule produced for a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub sink: String,
    pub rule: String,
    pub thing: String,
    pub cert_id: String,
    pub topic: String,
    pub received_at_ms: i64,
    /// The row as a JSON object (or, for `SELECT VALUE`, the value: any JSON).
    pub payload: Vec<u8>,
    /// Its sink's template expressions evaluated against the message, in their string form
    /// (empty for Undefined and Null); empty when the statement computes none.
    pub template_values: Vec<String>,
}

/// What one call into the engine produced.
#[derive(Debug, Default)]
pub struct Produced {
    pub outputs: Vec<Output>,
}

/// Per rule counters and load state, for `sitegate rules status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleStatus {
    pub name: String,
    pub statements: usize,
    pub sinks: Vec<String>,
    pub rows_in: u64,
    pub rows_out: u64,
    pub errors: u64,
    pub late_events: u64,
    /// The last refused version of the file, if the running version is older than the file.
    pub refused: Option<String>,
}

/// The source of every plan: hands out the batch of the current execution.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    batch: Arc<Mutex<Option<RecordBatch>>>,
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.batch.lock().ok().and_then(|mut b| b.take());
        let items: Vec<datafusion::error::Result<RecordBatch>> =
            batch.into_iter().map(Ok).collect();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(items),
        ))
    }
}

struct Plan {
    ctx: SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    slot: Arc<Mutex<Option<RecordBatch>>>,
}

fn context() -> SessionContext {
    let mut config = SessionConfig::new()
        .with_target_partitions(1)
        .with_coalesce_batches(false);
    // Payload fields keep their case, as in IoT Core.
    config.options_mut().sql_parser.enable_ident_normalization = false;
    let ctx = SessionContext::new_with_config(config);
    crate::functions::register(&ctx);
    ctx
}

/// Columns no message of a batch had are null-typed, which most expressions accept; the few
/// that do not (`sum`, `avg`) get them as numbers, then as text.
fn retype_nulls(batch: &RecordBatch, to: &DataType) -> Option<RecordBatch> {
    let schema = batch.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| f.data_type() == &DataType::Null)
    {
        return None;
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.data_type() == &DataType::Null {
                Field::new(f.name(), to.clone(), true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let columns = batch
        .columns()
        .iter()
        .map(|c| {
            if c.data_type() == &DataType::Null {
                cast(c, to).ok()
            } else {
                Some(c.clone())
            }
        })
        .collect::<Option<Vec<_>>>()?;
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).ok()
}

const NULL_FALLBACKS: [DataType; 2] = [DataType::Float64, DataType::Utf8];

/// Plan `sql` for `batch`'s schema, retyping absent columns when null does not plan. Returns
/// the plan, the batch as the plan expects it, and the type absent columns were given (if any).
async fn plan_for(
    sql: &str,
    batch: RecordBatch,
) -> Result<(Plan, RecordBatch, Option<DataType>), String> {
    let first = match plan(sql, batch.schema()).await {
        Ok(p) => return Ok((p, batch, None)),
        Err(e) => e,
    };
    for ty in &NULL_FALLBACKS {
        if let Some(retyped) = retype_nulls(&batch, ty) {
            if let Ok(p) = plan(sql, retyped.schema()).await {
                return Ok((p, retyped, Some(ty.clone())));
            }
        }
    }
    Err(first)
}

async fn plan(sql: &str, schema: SchemaRef) -> Result<Plan, String> {
    let ctx = context();
    let slot = Arc::new(Mutex::new(None));
    let source = Arc::new(Slot {
        schema: schema.clone(),
        batch: slot.clone(),
    });
    let table = StreamingTable::try_new(schema, vec![source]).map_err(|e| e.to_string())?;
    ctx.register_table("messages", Arc::new(table))
        .map_err(|e| e.to_string())?;
    let df = ctx.sql(sql).await.map_err(|e| e.to_string())?;
    let plan = df.create_physical_plan().await.map_err(|e| e.to_string())?;
    Ok(Plan { ctx, plan, slot })
}

impl Plan {
    async fn run(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>, String> {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(batch);
        }
        // Every execution registers fresh metrics in the plan's nodes and never drops them: a
        // plan kept for every micro-batch grew by ~2 KB a batch. A reset copy of the nodes per
        // run starts from empty metrics, at the cost of a few small allocations.
        let plan = reset_plan_states(Arc::clone(&self.plan)).map_err(|e| e.to_string())?;
        collect(plan, self.ctx.task_ctx())
            .await
            .map_err(|e| e.to_string())
    }
}

fn schema_key(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}:{}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(",")
}

struct Window {
    start: i64,
    end: i64,
    messages: Vec<Arc<Message>>,
}

struct Statement {
    spec: StatementSpec,
    decoder: batch::Decoder,
    /// Plans by input schema, with the type absent columns were given (if not null).
    plans: HashMap<String, (Plan, Option<DataType>)>,
    /// Open windows by start time.
    windows: BTreeMap<i64, Window>,
    /// Highest event time seen (event-time windows).
    watermark: i64,
}

struct Rule {
    spec: RuleSpec,
    statements: Vec<Statement>,
    status: RuleStatus,
}

/// Where the engine sends messages a rule cannot decode.
#[derive(Debug, Clone, Default)]
pub struct ErrorRouting {
    /// `[rules] error_sink`, used unless a rule names its own.
    pub default_sink: Option<String>,
}

/// Every loaded rule.
pub struct Engine {
    rules: BTreeMap<String, Rule>,
    errors: ErrorRouting,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Check a rule offline: it parses in `ctx`, every statement plans (against null-typed
/// columns, which coerce to anything), and it writes only to `ctx.sinks` when given.
pub async fn check(
    name: &str,
    file: &str,
    text: &str,
    ctx: &Context,
) -> Result<RuleSpec, RuleError> {
    let spec = dialect::parse_in(name, file, text, ctx)?;
    let sinks = ctx.sinks.as_deref();
    for s in &spec.statements {
        if let Some(sinks) = sinks {
            let mut known: Vec<&str> = sinks.iter().map(String::as_str).collect();
            known.sort_unstable();
            if !sinks.contains(&s.sink) {
                return Err(RuleError {
                    file: file.into(),
                    line: s.line,
                    column: 1,
                    reason: format!("no sink named {:?} (sinks: {})", s.sink, known.join(", ")),
                });
            }
        }
        let (batch, _, _) = batch::Decoder::for_statement(&spec.declared, s).decode(&[]);
        plan_for(&s.sql, batch)
            .await
            .map_err(|reason| located(file, text, s, reason))?;
    }
    if let Some(e) = &spec.error_sink {
        if let Some(sinks) = sinks {
            if !sinks.iter().any(|k| k == e) {
                return Err(RuleError {
                    file: file.into(),
                    line: 1,
                    column: 1,
                    reason: format!("@error_sink names no sink {e:?}"),
                });
            }
        }
    }
    Ok(spec)
}

/// A DataFusion error as a rule error, located in the file: by the "Line: a, Column: b" it
/// carries, else by the first name it quotes (an unknown function or column), else at the
/// statement's start.
fn located(file: &str, text: &str, s: &StatementSpec, reason: String) -> RuleError {
    let reason = unknown_field(
        &reason
            .replace("Error during planning: ", "")
            .replace("Schema error: ", ""),
    );
    let find = |key: &str| {
        reason
            .split(key)
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    if let (Some(line), Some(column)) = (find("Line: "), find("Column: ")) {
        return RuleError {
            file: file.into(),
            line: s.line + line.saturating_sub(1),
            column,
            reason,
        };
    }
    let quoted = reason
        .split(['\'', '"'])
        .nth(1)
        .filter(|q| !q.is_empty() && !q.contains(' '));
    if let Some(name) = quoted {
        for (i, l) in text
            .lines()
            .enumerate()
            .skip(s.line.saturating_sub(1) as usize)
        {
            if let Some(col) = l.find(name) {
                return RuleError {
                    file: file.into(),
                    line: i as u64 + 1,
                    column: col as u64 + 1,
                    reason,
                };
            }
        }
    }
    RuleError {
        file: file.into(),
        line: s.line,
        column: 1,
        reason,
    }
}

/// DataFusion's "No field named X. Valid fields are …" in IoT terms: its list names only the
/// gateway's own columns (a batch's payload fields are known per batch), and a name that is an
/// SQL word (`order`, `end`, `when`) was never a field to begin with, so the reason says how
/// IoT SQL reads such a field (iot-sql-json: `get` for names `.` cannot reach).
fn unknown_field(reason: &str) -> String {
    let Some(rest) = reason.strip_prefix("No field named ") else {
        return reason.to_string();
    };
    let name = rest
        .split("Valid fields")
        .next()
        .unwrap_or(rest)
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_matches('"');
    let word = name.to_ascii_uppercase();
    if datafusion::sql::sqlparser::keywords::ALL_KEYWORDS.contains(&word.as_str()) {
        format!(
            "'{name}' is an SQL word here, not a field; a payload field of that name is read \
             as get(*, '{name}')"
        )
    } else {
        format!("no field named '{name}'")
    }
}

/// The sinks a rule writes to: its statements' and its own error sink.
pub fn spec_sinks(spec: &RuleSpec) -> Vec<String> {
    let mut sinks: Vec<String> = spec.statements.iter().map(|s| s.sink.clone()).collect();
    sinks.extend(spec.error_sink.clone());
    sinks.sort();
    sinks.dedup();
    sinks
}

impl Engine {
    pub fn new(errors: ErrorRouting) -> Self {
        Engine {
            rules: BTreeMap::new(),
            errors,
        }
    }

    /// Add or replace rule `spec` (already checked). A replaced rule's open windows are dropped.
    pub fn install(&mut self, spec: RuleSpec) {
        let status = RuleStatus {
            name: spec.name.clone(),
            statements: spec.statements.len(),
            sinks: spec.statements.iter().map(|s| s.sink.clone()).collect(),
            ..RuleStatus::default()
        };
        let statements = spec
            .statements
            .iter()
            .map(|s| Statement {
                decoder: batch::Decoder::for_statement(&spec.declared, s),
                spec: s.clone(),
                plans: HashMap::new(),
                windows: BTreeMap::new(),
                watermark: i64::MIN,
            })
            .collect();
        self.rules.insert(
            spec.name.clone(),
            Rule {
                spec,
                statements,
                status,
            },
        );
    }

    /// Note that a newer version of `name` was refused (the running one stays).
    pub fn refused(&mut self, name: &str, error: &RuleError) {
        if let Some(rule) = self.rules.get_mut(name) {
            rule.status.refused = Some(error.to_string());
        }
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.rules.remove(name).is_some()
    }

    /// Whether a statement calls `traceid()`, so messages need a trace id
    /// ([`Message::trace_id`]); otherwise none is made.
    pub fn reads_trace_id(&self) -> bool {
        self.rules
            .values()
            .any(|r| r.spec.statements.iter().any(|s| s.trace_id))
    }

    /// Where undecodable messages go when a rule names no error sink of its own.
    pub fn set_errors(&mut self, errors: ErrorRouting) {
        self.errors = errors;
    }

    /// Every sink each installed rule writes to, its own error sink included.
    pub fn sinks_by_rule(&self) -> BTreeMap<String, Vec<String>> {
        self.rules
            .iter()
            .map(|(name, rule)| (name.clone(), spec_sinks(&rule.spec)))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.rules.keys().cloned().collect()
    }

    /// Topic filters of every statement.
    pub fn sources(&self) -> Vec<String> {
        self.rules
            .values()
            .flat_map(|r| r.spec.statements.iter().map(|s| s.source.clone()))
            .collect()
    }

    pub fn status(&self) -> Vec<RuleStatus> {
        self.rules.values().map(|r| r.status.clone()).collect()
    }

    /// Run every rule over a micro-batch received at `now_ms`.
    pub async fn process(&mut self, messages: &[Arc<Message>], now_ms: i64) -> Produced {
        let mut produced = Produced::default();
        let default_error_sink = self.errors.default_sink.clone();
        for rule in self.rules.values_mut() {
            let error_sink = rule
                .spec
                .error_sink
                .clone()
                .or_else(|| default_error_sink.clone());
            for st in rule.statements.iter_mut() {
                let picked: Vec<&Arc<Message>> = messages
                    .iter()
                    .filter(|m| sitegate_plugins::topic::filter_matches(&st.spec.source, &m.topic))
                    .collect();
                if picked.is_empty() {
                    continue;
                }
                rule.status.rows_in += picked.len() as u64;
                if st.spec.window.is_some() {
                    let late = st.absorb(&picked, now_ms);
                    rule.status.late_events += late;
                    continue;
                }
                let refs: Vec<&Message> = picked.iter().map(|m| m.as_ref()).collect();
                let (batch, _, failures) = st.decoder.decode(&refs);
                for f in failures {
                    rule.status.errors += 1;
                    if let Some(out) = error_output(
                        &rule.spec.name,
                        error_sink.as_deref(),
                        refs[f.index],
                        &f.reason,
                    ) {
                        produced.outputs.push(out);
                    } else {
                        tracing::warn!(rule = %rule.spec.name, thing = %refs[f.index].thing, reason = %f.reason, "message refused by rule; no error sink configured");
                    }
                }
                if batch.num_rows() == 0 {
                    continue;
                }
                match st.execute(batch).await {
                    Ok(rows) => {
                        rule.status.rows_out += rows.len() as u64;
                        produced.outputs.extend(
                            rows.into_iter().filter_map(|row| {
                                output(&rule.spec.name, &st.spec.sink, row, None)
                            }),
                        );
                    }
                    Err(reason) => {
                        rule.status.errors += refs.len() as u64;
                        tracing::warn!(rule = %rule.spec.name, %reason, "rule failed on a batch");
                        for m in &refs {
                            if let Some(out) =
                                error_output(&rule.spec.name, error_sink.as_deref(), m, &reason)
                            {
                                produced.outputs.push(out);
                            }
                        }
                    }
                }
            }
        }
        let closed = self.tick(now_ms).await;
        produced.outputs.extend(closed.outputs);
        produced
    }

    /// Close every window that is due at `now_ms` (processing time) or by its watermark.
    pub async fn tick(&mut self, now_ms: i64) -> Produced {
        let mut produced = Produced::default();
        for rule in self.rules.values_mut() {
            for st in rule.statements.iter_mut() {
                let Some(window) = st.spec.window.clone() else {
                    continue;
                };
                let horizon = match window.time_column {
                    None => now_ms,
                    Some(_) => st.watermark.saturating_sub(window.lateness_ms as i64),
                };
                let due: Vec<i64> = st
                    .windows
                    .values()
                    .filter(|w| w.end <= horizon)
                    .map(|w| w.start)
                    .collect();
                for start in due {
                    let Some(w) = st.windows.remove(&start) else {
                        continue;
                    };
                    let refs: Vec<&Message> = w.messages.iter().map(|m| m.as_ref()).collect();
                    let (batch, _, failures) = st.decoder.decode(&refs);
                    rule.status.errors += failures.len() as u64;
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    match st.execute(batch).await {
                        Ok(rows) => {
                            rule.status.rows_out += rows.len() as u64;
                            produced.outputs.extend(rows.into_iter().filter_map(|row| {
                                output(&rule.spec.name, &st.spec.sink, row, Some((w.start, w.end)))
                            }));
                        }
                        Err(reason) => {
                            rule.status.errors += 1;
                            tracing::warn!(rule = %rule.spec.name, %reason, "window aggregate failed");
                        }
                    }
                }
            }
        }
        produced
    }
}

impl Statement {
    async fn execute(&mut self, batch: RecordBatch) -> Result<Vec<Row>, String> {
        let key = schema_key(&batch.schema());
        let batch = match self.plans.get(&key) {
            Some((_, retype)) => match retype.as_ref().and_then(|ty| retype_nulls(&batch, ty)) {
                Some(retyped) => retyped,
                None => batch,
            },
            None => {
                if self.plans.len() >= MAX_PLANS_PER_STATEMENT {
                    self.plans.clear();
                }
                let (p, planned, retype) = plan_for(&self.spec.sql, batch).await?;
                self.plans.insert(key.clone(), (p, retype));
                planned
            }
        };
        let (plan, _) = self.plans.get(&key).ok_or("plan vanished")?;
        let out = plan.run(batch).await?;
        // A window's rows get its bounds added to their object, so they keep the tree.
        let shape = match self.spec.window {
            Some(_) => batch::rows,
            None => batch::written_rows,
        };
        Ok(out.iter().flat_map(shape).collect())
    }

    /// Put messages into their windows; returns how many came too late.
    fn absorb(&mut self, picked: &[&Arc<Message>], now_ms: i64) -> u64 {
        let Some(w) = self.spec.window.clone() else {
            return 0;
        };
        let mut late = 0;
        for m in picked {
            let t = match &w.time_column {
                None => now_ms,
                Some(col) => match event_time(m, col) {
                    Some(t) => t,
                    None => now_ms,
                },
            };
            if w.time_column.is_some() {
                self.watermark = self.watermark.max(t);
                let horizon = self.watermark.saturating_sub(w.lateness_ms as i64);
                if t < horizon
                    && window_starts(t, &w)
                        .iter()
                        .all(|s| s + w.size_ms as i64 <= horizon)
                {
                    late += 1;
                    continue;
                }
            }
            for start in window_starts(t, &w) {
                self.windows
                    .entry(start)
                    .or_insert_with(|| Window {
                        start,
                        end: start + w.size_ms as i64,
                        messages: Vec::new(),
                    })
                    .messages
                    .push(Arc::clone(m));
            }
        }
        late
    }
}

/// Event time of `m` from payload column `col` (Unix ms, number).
fn event_time(m: &Message, col: &str) -> Option<i64> {
    let v: Value = serde_json::from_slice(&m.payload).ok()?;
    let mut cur = &v;
    for part in col.split('.') {
        cur = cur.get(part)?;
    }
    cur.as_i64().or_else(|| cur.as_f64().map(|f| f as i64))
}

/// Starts of every window containing time `t`.
fn window_starts(t: i64, w: &WindowSpec) -> Vec<i64> {
    let size = w.size_ms as i64;
    let slide = w.slide_ms.max(1) as i64;
    let last = t.div_euclid(slide) * slide;
    let mut starts = Vec::new();
    let mut s = last;
    while s > t - size {
        starts.push(s);
        s -= slide;
    }
    starts.reverse();
    starts
}

/// The output of one row; `None` for a `SELECT VALUE` whose value is Undefined.
fn output(rule: &str, sink: &str, row: Row, window: Option<(i64, i64)>) -> Option<Output> {
    let payload = match (row.raw, row.written, window) {
        (Some(raw), _, _) => raw.to_vec(),
        (None, Some(text), None) => text,
        (None, written, window) => {
            let mut payload = match (row.value, written) {
                (Some(value), _) => value?,
                (None, Some(text)) => {
                    serde_json::from_slice(&text).unwrap_or(Value::Object(row.object))
                }
                (None, None) => Value::Object(row.object),
            };
            if let (Some((start, end)), Value::Object(object)) = (window, &mut payload) {
                object.insert("window_start".into(), Value::from(start));
                object.insert("window_end".into(), Value::from(end));
            }
            serde_json::to_vec(&payload).unwrap_or_default()
        }
    };
    Some(Output {
        sink: sink.to_string(),
        rule: rule.to_string(),
        thing: row.thing.unwrap_or_default(),
        cert_id: row.cert_id.unwrap_or_default(),
        topic: row.topic.unwrap_or_default(),
        received_at_ms: row
            .received_at_ms
            .or(window.map(|(_, end)| end))
            .unwrap_or_default(),
        payload,
        template_values: row.templates.into_iter().map(template_text).collect(),
    })
}

/// A template value as it is substituted: its string form, Undefined and Null as nothing.
fn template_text(v: Option<Value>) -> String {
    v.as_ref()
        .and_then(crate::values::value_text)
        .unwrap_or_default()
}

/// The error record for a message a rule could not take, shaped like IoT Core's errorAction.
fn error_output(rule: &str, sink: Option<&str>, m: &Message, reason: &str) -> Option<Output> {
    let sink = sink?;
    let body = serde_json::json!({
        "ruleName": rule,
        "topic": m.topic,
        "clientId": m.thing,
        "thing_name": m.thing,
        "cert_id": m.cert_id,
        "reason": reason,
        "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(&m.payload),
        "failures": [{"failedAction": "decode", "failedResource": rule, "errorMessage": reason}],
    });
    Some(Output {
        sink: sink.to_string(),
        rule: rule.to_string(),
        thing: m.thing.clone(),
        cert_id: m.cert_id.clone(),
        topic: m.topic.clone(),
        received_at_ms: m.received_at_ms,
        payload: serde_json::to_vec(&body).unwrap_or_default(),
        template_values: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hopping_windows_overlap_and_tumbling_ones_do_not() {
        let tumble = WindowSpec {
            size_ms: 10,
            slide_ms: 10,
            time_column: None,
            lateness_ms: 0,
        };
        assert_eq!(window_starts(25, &tumble), vec![20]);
        let hop = WindowSpec {
            size_ms: 10,
            slide_ms: 5,
            time_column: None,
            lateness_ms: 0,
        };
        assert_eq!(window_starts(25, &hop), vec![20, 25]);
        assert_eq!(window_starts(-1, &tumble), vec![-10]);
    }

    /// Metrics entries held by every node of the statements' cached plans.
    fn plan_metrics(engine: &Engine) -> usize {
        fn count(plan: &Arc<dyn ExecutionPlan>) -> usize {
            plan.metrics().map(|m| m.iter().count()).unwrap_or(0)
                + plan.children().iter().map(|c| count(c)).sum::<usize>()
        }
        engine
            .rules
            .values()
            .flat_map(|r| r.statements.iter())
            .flat_map(|s| s.plans.values())
            .map(|(p, _)| count(&p.plan))
            .sum()
    }

    #[tokio::test]
    async fn a_cached_plan_run_for_every_batch_does_not_grow() {
        let spec = check(
            "hot",
            "hot.sql",
            "INSERT INTO out SELECT temp FROM 'dt/#' WHERE temp > 0",
            &Context::default(),
        )
        .await
        .unwrap();
        let mut engine = Engine::new(ErrorRouting::default());
        engine.install(spec);
        let batch: Vec<Arc<Message>> = (0..10)
            .map(|i| {
                Arc::new(Message {
                    topic: "dt/a".into(),
                    thing: "a".into(),
                    cert_id: "c".into(),
                    payload: format!(r#"{{"temp":{i}}}"#).into(),
                    received_at_ms: 0,
                    properties: None,
                    source_ip: None,
                    trace_id: None,
                })
            })
            .collect();
        let out = engine.process(&batch, 0).await;
        assert_eq!(out.outputs.len(), 9);
        let after_one = plan_metrics(&engine);
        for _ in 0..50 {
            engine.process(&batch, 0).await;
        }
        assert_eq!(plan_metrics(&engine), after_one);
    }

    /// iot-sql-functions, traceid(): the trace id of the MQTT message, so every rule and
    /// statement reading it gives the same one for one message, and each message its own.
    #[tokio::test]
    async fn traceid_is_one_per_message() {
        let mut engine = Engine::new(ErrorRouting::default());
        for (name, sql) in [
            (
                "a",
                "INSERT INTO a SELECT traceid() AS t, n FROM 'dt/#';\n\
                 INSERT INTO b SELECT traceid() AS t, n FROM 'dt/#'",
            ),
            ("c", "INSERT INTO c SELECT traceid() AS t, n FROM 'dt/+'"),
        ] {
            engine.install(check(name, name, sql, &Context::default()).await.unwrap());
        }
        let batch: Vec<Arc<Message>> = (0..3)
            .map(|i| {
                Arc::new(Message {
                    topic: "dt/a".into(),
                    thing: "a".into(),
                    cert_id: "c".into(),
                    payload: format!(r#"{{"n":{i}}}"#).into(),
                    received_at_ms: 0,
                    properties: None,
                    source_ip: None,
                    trace_id: Some(rand::random()),
                })
            })
            .collect();
        let out = engine.process(&batch, 0).await.outputs;
        assert_eq!(out.len(), 9);
        let mut by_message: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for o in &out {
            let row: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
            by_message
                .entry(row["n"].as_i64().unwrap())
                .or_default()
                .push(row["t"].as_str().unwrap().to_string());
        }
        let ids: Vec<&String> = by_message.values().map(|t| &t[0]).collect();
        for traces in by_message.values() {
            assert_eq!(traces.len(), 3);
            assert!(traces.iter().all(|t| t == &traces[0]), "{traces:?}");
        }
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    }
}
