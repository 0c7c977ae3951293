//! Device messages to Arrow: one `RecordBatch` per micro-batch, payload JSON flattened into
//! columns (`a.b` for nested fields), types inferred per batch or declared by the rule, and the
//! metadata columns every statement can use. Rows back to JSON objects for the sinks.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Builder, Int64Builder, NullArray,
    StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Map, Value};

use crate::dialect::{ColumnType, CERT_ID, RECEIVED_AT, THING, TOPIC};

/// Nesting deeper than this is refused (to the error sink), not flattened.
pub const MAX_DEPTH: usize = 16;

/// One device message as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub thing: String,
    pub cert_id: String,
    pub payload: Bytes,
    /// When the gateway received it (Unix ms); `timestamp()`.
    pub received_at_ms: i64,
}

/// A message that could not become a row, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    pub index: usize,
    pub reason: String,
}

/// Move the fields of `value` into `out`, nested objects as dotted names.
fn flatten(
    prefix: Option<&str>,
    value: Map<String, Value>,
    depth: usize,
    out: &mut Vec<(String, Value)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("payload nests deeper than {MAX_DEPTH} levels"));
    }
    for (k, v) in value {
        let name = match prefix {
            None => k,
            Some(p) => format!("{p}.{k}"),
        };
        match v {
            Value::Object(inner) => flatten(Some(&name), inner, depth + 1, out)?,
            other => out.push((name, other)),
        }
    }
    Ok(())
}

fn declared_value(column: &str, ty: ColumnType, v: &Value) -> Result<Value, String> {
    let ok = match (ty, v) {
        (_, Value::Null) => true,
        (ColumnType::Double, Value::Number(_)) => true,
        (ColumnType::BigInt, Value::Number(n)) => n.is_i64(),
        (ColumnType::Text, Value::String(_)) => true,
        (ColumnType::Boolean, Value::Bool(_)) => true,
        _ => false,
    };
    if ok {
        Ok(v.clone())
    } else {
        Err(format!("column {column}: declared {ty:?}, got {v}"))
    }
}

/// Decode `messages` into one batch. Messages that fail (not JSON, not an object, too deep, a
/// declared column of the wrong type) are left out and reported; `columns` are added as null
/// columns when no message has them, so statements referring to them still plan.
pub fn decode(
    messages: &[&Message],
    declared: &[(String, ColumnType)],
    columns: &BTreeSet<String>,
) -> (RecordBatch, Vec<usize>, Vec<DecodeFailure>) {
    // Columns are filled row by row: each message's fields are moved into their column, and
    // columns a message lacks are padded with None when the next value (or the end) comes.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut payload_columns: Vec<(String, Vec<Option<Value>>)> = Vec::new();
    let mut kept: Vec<usize> = Vec::with_capacity(messages.len());
    let mut failures = Vec::new();
    let mut fields: Vec<(String, Value)> = Vec::new();
    'messages: for (i, m) in messages.iter().enumerate() {
        let object: Map<String, Value> = match serde_json::from_slice(&m.payload) {
            Ok(o) => o,
            Err(e) => {
                let reason = match serde_json::from_slice::<Value>(&m.payload) {
                    Ok(_) => "payload is not a JSON object".to_string(),
                    Err(_) => format!("payload is not JSON: {e}"),
                };
                failures.push(DecodeFailure { index: i, reason });
                continue;
            }
        };
        fields.clear();
        if let Err(reason) = flatten(None, object, 1, &mut fields) {
            failures.push(DecodeFailure { index: i, reason });
            continue;
        }
        if !declared.is_empty() {
            for (name, value) in fields.iter_mut() {
                if let Some((_, ty)) = declared.iter().find(|(c, _)| c == name) {
                    match declared_value(name, *ty, value) {
                        Ok(v) => *value = v,
                        Err(reason) => {
                            failures.push(DecodeFailure { index: i, reason });
                            continue 'messages;
                        }
                    }
                }
            }
        }
        let row = kept.len();
        kept.push(i);
        for (name, value) in fields.drain(..) {
            if name.starts_with("__") || value.is_null() {
                continue;
            }
            let c = match index.get(&name) {
                Some(&c) => c,
                None => {
                    index.insert(name.clone(), payload_columns.len());
                    payload_columns.push((name, Vec::new()));
                    payload_columns.len() - 1
                }
            };
            let values = &mut payload_columns[c].1;
            if values.len() > row {
                values[row] = Some(value);
            } else {
                values.resize(row, None);
                values.push(Some(value));
            }
        }
    }
    let extra = declared
        .iter()
        .map(|(c, _)| c)
        .chain(columns.iter().filter(|c| !c.starts_with("__")));
    for c in extra {
        if !index.contains_key(c) {
            index.insert(c.clone(), payload_columns.len());
            payload_columns.push((c.clone(), Vec::new()));
        }
    }
    let rows = kept.len();
    let mut schema_fields = vec![
        Field::new(TOPIC, DataType::Utf8, false),
        Field::new(THING, DataType::Utf8, false),
        Field::new(CERT_ID, DataType::Utf8, false),
        Field::new(RECEIVED_AT, DataType::Int64, false),
    ];
    let picked: Vec<&Message> = kept.iter().map(|&i| messages[i]).collect();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(payload_columns.len() + 4);
    arrays.push(Arc::new(
        picked
            .iter()
            .map(|m| Some(m.topic.as_str()))
            .collect::<datafusion::arrow::array::StringArray>(),
    ));
    arrays.push(Arc::new(
        picked
            .iter()
            .map(|m| Some(m.thing.as_str()))
            .collect::<datafusion::arrow::array::StringArray>(),
    ));
    arrays.push(Arc::new(
        picked
            .iter()
            .map(|m| Some(m.cert_id.as_str()))
            .collect::<datafusion::arrow::array::StringArray>(),
    ));
    arrays.push(Arc::new(
        picked
            .iter()
            .map(|m| Some(m.received_at_ms))
            .collect::<datafusion::arrow::array::Int64Array>(),
    ));
    for (name, mut values) in payload_columns {
        values.resize(rows, None);
        let declared_ty = declared.iter().find(|(c, _)| *c == name).map(|(_, t)| *t);
        let (ty, array) = column(&values, declared_ty);
        schema_fields.push(Field::new(name, ty, true));
        arrays.push(array);
    }
    let schema = Arc::new(Schema::new(schema_fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays)
        .unwrap_or_else(|_| RecordBatch::new_empty(schema));
    (batch, kept, failures)
}

fn column(values: &[Option<Value>], declared: Option<ColumnType>) -> (DataType, ArrayRef) {
    let present: Vec<&Value> = values.iter().flatten().collect();
    let ty = match declared {
        Some(ColumnType::Double) => DataType::Float64,
        Some(ColumnType::BigInt) => DataType::Int64,
        Some(ColumnType::Text) => DataType::Utf8,
        Some(ColumnType::Boolean) => DataType::Boolean,
        None if present.is_empty() => DataType::Null,
        None if present.iter().all(|v| v.is_boolean()) => DataType::Boolean,
        None if present.iter().all(|v| v.is_i64()) => DataType::Int64,
        None if present.iter().all(|v| v.is_number()) => DataType::Float64,
        // Strings, arrays, or a field whose type changed within the batch: text, so the
        // rule keeps running.
        None => DataType::Utf8,
    };
    let array: ArrayRef = match ty {
        DataType::Null => Arc::new(NullArray::new(values.len())),
        DataType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(values.len());
            values
                .iter()
                .for_each(|v| b.append_option(v.as_ref().and_then(Value::as_bool)));
            Arc::new(b.finish())
        }
        DataType::Int64 => {
            let mut b = Int64Builder::with_capacity(values.len());
            values
                .iter()
                .for_each(|v| b.append_option(v.as_ref().and_then(Value::as_i64)));
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::with_capacity(values.len());
            values
                .iter()
                .for_each(|v| b.append_option(v.as_ref().and_then(Value::as_f64)));
            Arc::new(b.finish())
        }
        _ => {
            let mut b = StringBuilder::with_capacity(values.len(), values.len() * 8);
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Value::String(s)) => b.append_value(s),
                    Some(other) => b.append_value(other.to_string()),
                }
            }
            Arc::new(b.finish())
        }
    };
    (ty, array)
}

/// One output row: the JSON object for the sink, and the identity columns the rule carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub object: Map<String, Value>,
    pub thing: Option<String>,
    pub cert_id: Option<String>,
    pub topic: Option<String>,
    pub received_at_ms: Option<i64>,
}

fn cell(array: &dyn Array, row: usize) -> Value {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes as t;
    if array.is_null(row) || array.data_type() == &DataType::Null {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Boolean => array
            .as_any()
            .downcast_ref::<BooleanArray>()
            .map(|a| Value::Bool(a.value(row)))
            .unwrap_or(Value::Null),
        DataType::Int64 => Value::from(array.as_primitive::<t::Int64Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<t::Int32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<t::UInt64Type>().value(row)),
        DataType::Float64 => Value::from(array.as_primitive::<t::Float64Type>().value(row)),
        DataType::Float32 => Value::from(array.as_primitive::<t::Float32Type>().value(row)),
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Value::from(array.as_string_view().value(row)),
        _ => {
            let options = FormatOptions::default();
            match ArrayFormatter::try_new(array, &options) {
                Ok(f) => Value::from(f.value(row).to_string()),
                Err(_) => Value::Null,
            }
        }
    }
}

/// Put `value` at the dotted path `name` inside `object` (so flattened fields nest again).
fn insert_path(object: &mut Map<String, Value>, name: &str, value: Value) {
    let mut parts = name.split('.').peekable();
    let mut current = object;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_string(), value);
            return;
        }
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { return };
        current = next;
    }
}

/// Rows of an output batch as JSON objects. Columns starting with `__` are not part of the row;
/// `__sg_*` ones carry identity. Absent (null) values are left out, as IoT Core does.
pub fn rows(batch: &RecordBatch) -> Vec<Row> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|r| {
            let mut row = Row {
                object: Map::new(),
                thing: None,
                cert_id: None,
                topic: None,
                received_at_ms: None,
            };
            for (i, field) in schema.fields().iter().enumerate() {
                let value = cell(batch.column(i).as_ref(), r);
                match field.name().as_str() {
                    "__sg_thing" => row.thing = value.as_str().map(str::to_string),
                    "__sg_cert_id" => row.cert_id = value.as_str().map(str::to_string),
                    "__sg_topic" => row.topic = value.as_str().map(str::to_string),
                    "__sg_received_at" => row.received_at_ms = value.as_i64(),
                    name if name.starts_with("__") => {}
                    name => {
                        if !value.is_null() {
                            insert_path(&mut row.object, name, value);
                        }
                    }
                }
            }
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn msg(payload: &str) -> Message {
        Message {
            topic: "dt/a/t".into(),
            thing: "a".into(),
            cert_id: "c".into(),
            payload: Bytes::from(payload.to_string()),
            received_at_ms: 5,
        }
    }

    #[test]
    fn flattens_infers_and_reports_failures() {
        let ms = [
            msg(r#"{"t":1,"z":"B","s":{"v":true}}"#),
            msg("nope"),
            msg(r#"{"t":2.5}"#),
            msg("[1]"),
        ];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, ok, failed) = decode(&refs, &[], &BTreeSet::from(["missing".to_string()]));
        assert_eq!(ok, vec![0, 2]);
        assert_eq!(failed.len(), 2);
        assert!(failed[0].reason.contains("not JSON"));
        let schema = batch.schema();
        assert_eq!(
            schema.field_with_name("t").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            schema.field_with_name("s.v").unwrap().data_type(),
            &DataType::Boolean
        );
        assert_eq!(
            schema.field_with_name("missing").unwrap().data_type(),
            &DataType::Null
        );
        let out = rows(&batch);
        assert_eq!(
            Value::Object(out[0].object.clone()),
            serde_json::json!({"t":1.0,"z":"B","s":{"v":true}})
        );
    }

    #[test]
    fn a_type_change_within_a_batch_becomes_text_and_declared_types_are_enforced() {
        let ms = [msg(r#"{"t":1}"#), msg(r#"{"t":"hot"}"#)];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, _, _) = decode(&refs, &[], &BTreeSet::new());
        assert_eq!(
            batch.schema().field_with_name("t").unwrap().data_type(),
            &DataType::Utf8
        );
        let (_, ok, failed) = decode(&refs, &[("t".into(), ColumnType::Double)], &BTreeSet::new());
        assert_eq!(ok, vec![0]);
        assert!(failed[0].reason.contains("declared Double"), "{:?}", failed);
    }

    #[test]
    fn too_deep_is_refused() {
        let deep = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        let m = msg(&deep);
        let (_, ok, failed) = decode(&[&m], &[], &BTreeSet::new());
        assert!(ok.is_empty());
        assert!(failed[0].reason.contains("deeper"));
    }
}
