//! Running a rule over sample messages, for `sitegate rules test` and the data-file test cases:
//! each line `{"topic":…, "thing":…, "payload":{…}, "ts":…}` is one message received at `ts`.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::batch::Message;
use crate::engine::{Engine, ErrorRouting, Output};
use crate::RuleSpec;

/// One sample message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub topic: String,
    pub thing: String,
    /// The payload: a JSON value, or a string sent as is (to try non-JSON payloads).
    pub payload: Value,
    /// Receive time, Unix ms (default: one second after the previous message).
    #[serde(default)]
    pub ts: Option<i64>,
    #[serde(default)]
    pub cert_id: Option<String>,
    /// The MQTT 5 properties it was published with.
    #[serde(default)]
    pub properties: Option<SampleProperties>,
    /// The address the device connected from (`sourceip()`).
    #[serde(default)]
    pub source_ip: Option<String>,
}

/// A sample's MQTT 5 properties.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleProperties {
    /// Payload Format Indicator: 0 (bytes) or 1 (UTF-8 data).
    #[serde(default)]
    pub payload_format_indicator: Option<u8>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub response_topic: Option<String>,
    /// Correlation data as text; its UTF-8 bytes are sent.
    #[serde(default)]
    pub correlation_data: Option<String>,
    /// `[key, value]` pairs, in order.
    #[serde(default)]
    pub user_properties: Vec<(String, String)>,
}

impl SampleProperties {
    fn to_properties(&self) -> crate::batch::Properties {
        crate::batch::Properties {
            utf8_payload: self.payload_format_indicator.map(|f| f == 1),
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone().map(Bytes::from),
            user_properties: self.user_properties.clone(),
        }
    }
}

/// Parse JSON lines of samples; errors name the line.
pub fn parse_samples(text: &str) -> Result<Vec<Sample>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// Run `spec` over `samples` one message at a time (each at its `ts`), then close windows as of
/// `until` (default: an hour after the last message, so every window closes).
pub async fn run(
    spec: RuleSpec,
    samples: &[Sample],
    error_sink: Option<String>,
    until: Option<i64>,
) -> Vec<Output> {
    let mut engine = engine(spec, error_sink);
    let mut outputs = Vec::new();
    let mut now = 0i64;
    for s in samples {
        now = s.ts.unwrap_or(now + 1000);
        let message = message(s, now);
        outputs.extend(engine.process(&[message], now).await.outputs);
    }
    outputs.extend(engine.tick(until.unwrap_or(now + 3_600_000)).await.outputs);
    outputs
}

/// Run `spec` over all `samples` as one micro-batch, as the gateway hands them over when they
/// arrive together; a rule's result for a message must not depend on its batch.
pub async fn run_batch(
    spec: RuleSpec,
    samples: &[Sample],
    error_sink: Option<String>,
) -> Vec<Output> {
    let mut engine = engine(spec, error_sink);
    let mut now = 0i64;
    let messages: Vec<Arc<Message>> = samples
        .iter()
        .map(|s| {
            now = s.ts.unwrap_or(now + 1000);
            message(s, now)
        })
        .collect();
    let mut outputs = engine.process(&messages, now).await.outputs;
    outputs.extend(engine.tick(now + 3_600_000).await.outputs);
    outputs
}

fn engine(spec: RuleSpec, error_sink: Option<String>) -> Engine {
    let mut engine = Engine::new(ErrorRouting {
        default_sink: error_sink.or_else(|| Some("errors".into())),
    });
    engine.install(spec);
    engine
}

fn message(s: &Sample, now: i64) -> Arc<Message> {
    let payload = match &s.payload {
        Value::String(text) => Bytes::from(text.clone()),
        other => Bytes::from(other.to_string()),
    };
    Arc::new(Message {
        topic: s.topic.clone(),
        thing: s.thing.clone(),
        cert_id: s
            .cert_id
            .clone()
            .unwrap_or_else(|| format!("cert-{}", s.thing)),
        payload,
        received_at_ms: now,
        properties: s.properties.as_ref().map(|p| Arc::new(p.to_properties())),
        source_ip: s.source_ip.as_deref().map(Arc::from),
        trace_id: Some(rand::random()),
    })
}

/// Outputs as a text table: sink, thing, then the row's fields.
pub fn table(outputs: &[Output]) -> String {
    let mut columns: Vec<String> = Vec::new();
    let rows: Vec<serde_json::Map<String, Value>> = outputs
        .iter()
        .map(|o| match serde_json::from_slice(&o.payload) {
            Ok(Value::Object(m)) => m,
            // SELECT VALUE, and the bytes of a binary payload, in a column of their own.
            Ok(other) => serde_json::Map::from_iter([("(value)".to_string(), other)]),
            Err(_) => serde_json::Map::from_iter([(
                "(bytes)".to_string(),
                Value::from(
                    String::from_utf8_lossy(&o.payload)
                        .escape_debug()
                        .to_string(),
                ),
            )]),
        })
        .collect();
    for r in &rows {
        for k in r.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    let mut header = vec!["sink".to_string(), "thing".to_string()];
    header.extend(columns.iter().cloned());
    let mut cells: Vec<Vec<String>> = vec![header];
    for (o, r) in outputs.iter().zip(&rows) {
        let mut line = vec![o.sink.clone(), o.thing.clone()];
        for c in &columns {
            line.push(match r.get(c) {
                None => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            });
        }
        cells.push(line);
    }
    let widths: Vec<usize> = (0..cells[0].len())
        .map(|i| {
            cells
                .iter()
                .map(|l| l[i].chars().count().min(40))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in cells {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", c.chars().take(40).collect::<String>(), w = *w))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("({} rows)\n", outputs.len()));
    out
}
