//! Device messages to Arrow: one `RecordBatch` per micro-batch, payload JSON flattened into
//! columns (`a.b` for nested fields), types inferred per batch or declared by the rule, and the
//! metadata columns every statement can use. Rows back to JSON objects for the sinks.

use std::borrow::Cow;
use std::collections::BTreeSet;

/// Field names are looked up once per key of every payload: a fast hash, not SipHash (the
/// names are the rule's own, not a device's).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, NullArray, StringArray,
    StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::dialect::{
    ColumnType, StatementSpec, CERT_ID, MQTT, PAYLOAD, RECEIVED_AT, SOURCE_IP, THING, TOPIC,
    TRACE_ID,
};
use crate::values::decimal_text;

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
    /// The MQTT 5 properties it was published with, if any (`get_mqtt_property`,
    /// `get_user_properties`).
    pub properties: Option<Arc<Properties>>,
    /// The IP address the device connected from, without the port (`sourceip()`).
    pub source_ip: Option<Arc<str>>,
    /// The message's trace id (`traceid()`): a random (version 4) UUID the gateway gave the
    /// message when it took it for the rules, the same for every rule that reads it.
    pub trace_id: Option<u128>,
}

/// A publish's MQTT 5 properties a rule can read (MQTT 5 §3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// Payload Format Indicator: `Some(true)` for UTF-8 data (1), `Some(false)` for bytes (0).
    pub utf8_payload: Option<bool>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// In the order they came; a key may repeat.
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    /// As the rules read them ([`MQTT`] column): `format_indicator` is `"UTF8_DATA"` or
    /// `"UNSPECIFIED_BYTES"`, `correlation_data` is base64, `user_properties` holds each key's
    /// values in order. A property not sent is absent (Undefined).
    fn json(&self) -> Value {
        use base64::Engine as _;
        let mut o = Map::new();
        if let Some(utf8) = self.utf8_payload {
            let f = if utf8 {
                "UTF8_DATA"
            } else {
                "UNSPECIFIED_BYTES"
            };
            o.insert("format_indicator".into(), Value::from(f));
        }
        if let Some(c) = &self.content_type {
            o.insert("content_type".into(), Value::from(c.as_str()));
        }
        if let Some(r) = &self.response_topic {
            o.insert("response_topic".into(), Value::from(r.as_str()));
        }
        if let Some(d) = &self.correlation_data {
            let encoded = base64::engine::general_purpose::STANDARD.encode(d);
            o.insert("correlation_data".into(), Value::from(encoded));
        }
        let mut user = Map::new();
        for (k, v) in &self.user_properties {
            if let Value::Array(values) = user
                .entry(k.clone())
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                values.push(Value::from(v.as_str()));
            }
        }
        o.insert("user_properties".into(), Value::Object(user));
        Value::Object(o)
    }
}

/// A message that could not become a row, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    pub index: usize,
    pub reason: String,
}

/// How one statement's messages become batches, fixed when the statement is installed: which
/// payload fields are decoded (every one for `SELECT *`, otherwise only those the statement
/// names, so a rule reading two fields of a ten-field payload skips the other eight), and the
/// rule's declared types.
#[derive(Debug, Clone)]
pub struct Decoder {
    declared: Vec<(String, ColumnType)>,
    /// `None`: every field. Otherwise the named fields, in a fixed order (column order).
    only: Option<Vec<String>>,
    /// For `only`: each dotted name the statement reaches, and its dotted prefixes.
    lookup: HashMap<String, Target>,
    /// Columns present (as nulls) even when no message of a batch has them.
    always: Vec<String>,
    /// A payload that is not a JSON object still makes a row (the statement names no field):
    /// binary-payloads.
    binary: bool,
    /// Every row carries its payload's bytes in [`PAYLOAD`] (`*` as a function's argument).
    payload_column: bool,
    /// Every row carries its MQTT 5 properties in [`MQTT`].
    properties_column: bool,
    /// Every row carries its device's address in [`SOURCE_IP`].
    source_ip_column: bool,
    /// Every row carries its message's trace id in [`TRACE_ID`].
    trace_id_column: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Target {
    /// The column this exact name fills.
    column: Option<usize>,
    /// Some wanted name lies below this one (`motor` for `motor.amps`).
    descend: bool,
}

/// One decoded payload value. A JSON `null` is a value, IoT SQL's Null, distinct from a field
/// that is absent (Undefined, an Arrow null): iot-sql-data-types lists both.
#[derive(Debug, Clone)]
enum Cell<'m> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(Cow<'m, str>),
    /// An array or an object wanted whole, kept as its compact JSON text.
    Json(String),
}

impl Cell<'_> {
    fn kind(&self) -> u8 {
        match self {
            Cell::Null => KIND_NULL,
            Cell::Bool(_) => KIND_BOOL,
            Cell::Int(_) => KIND_INT,
            Cell::Float(_) => KIND_FLOAT,
            Cell::Text(_) => KIND_TEXT,
            Cell::Json(_) => KIND_JSON,
        }
    }

    /// The value as JSON text (error reasons, and text columns holding a number or a bool).
    fn json(&self) -> String {
        match self {
            Cell::Null => "null".to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => decimal_text(*f),
            Cell::Text(s) => Value::from(s.as_ref()).to_string(),
            Cell::Json(s) => s.clone(),
        }
    }

    /// Whether the value may go in a column of the declared type. A Null fits any: a batch in
    /// which a declared column has one holds that column as JSON values, so the Null stays a
    /// Null (an Arrow null is Undefined) and the other values keep their types.
    fn fits(&self, ty: ColumnType) -> bool {
        matches!(
            (ty, self),
            (_, Cell::Null)
                | (ColumnType::Double, Cell::Int(_) | Cell::Float(_))
                | (ColumnType::BigInt, Cell::Int(_))
                | (ColumnType::Text, Cell::Text(_))
                | (ColumnType::Boolean, Cell::Bool(_))
        )
    }
}

const KIND_BOOL: u8 = 1;
const KIND_INT: u8 = 2;
const KIND_FLOAT: u8 = 4;
const KIND_TEXT: u8 = 8;
const KIND_JSON: u8 = 16;
const KIND_NULL: u8 = 32;

/// Field metadata of a text column holding each value as JSON text (arrays and objects, and the
/// values of a field whose type changed within a batch): each goes out as that JSON value, not
/// as a string (iot-sql-select: selecting an object or an array outputs it).
pub const JSON_COLUMN: &str = "sitegate.json";

struct Column<'m> {
    name: String,
    declared: Option<ColumnType>,
    cells: Vec<Option<Cell<'m>>>,
    /// Which kinds of value the column holds (`KIND_*` bits), for type inference.
    kinds: u8,
}

impl<'m> Column<'m> {
    fn new(name: String, declared: Option<ColumnType>) -> Self {
        Column {
            name,
            declared,
            cells: Vec::new(),
            kinds: 0,
        }
    }

    fn set(&mut self, row: usize, cell: Cell<'m>) {
        self.kinds |= cell.kind();
        if self.cells.len() > row {
            // A key repeated in one object: the last one wins, as with serde_json.
            self.cells[row] = Some(cell);
        } else {
            self.cells.resize_with(row, || None);
            self.cells.push(Some(cell));
        }
    }

    fn data_type(&self) -> DataType {
        match self.declared {
            Some(_) if self.kinds & KIND_NULL != 0 => DataType::Utf8,
            Some(ColumnType::Double) => DataType::Float64,
            Some(ColumnType::BigInt) => DataType::Int64,
            Some(ColumnType::Text) => DataType::Utf8,
            Some(ColumnType::Boolean) => DataType::Boolean,
            None => match self.kinds {
                0 => DataType::Null,
                KIND_BOOL => DataType::Boolean,
                KIND_INT => DataType::Int64,
                k if k & (KIND_BOOL | KIND_TEXT | KIND_JSON | KIND_NULL) == 0 => DataType::Float64,
                // Strings; or arrays, objects, nulls, or a field whose type changed within the
                // batch, each value as JSON (see `holds_json`).
                _ => DataType::Utf8,
            },
        }
    }

    /// Whether the column holds each value as JSON ([`JSON_COLUMN`]): arrays, objects and
    /// nulls, and a field whose values have several types in the batch (Int and Decimal are one: numbers),
    /// so a `"5"` stays a String and a `5` an Int, whatever else the batch holds.
    fn holds_json(&self) -> bool {
        (self.declared.is_none() || self.kinds & KIND_NULL != 0)
            && self.kinds != 0
            && self.kinds != KIND_BOOL
            && self.kinds != KIND_TEXT
            && self.kinds & !(KIND_INT | KIND_FLOAT) != 0
    }

    fn finish(mut self, rows: usize) -> (Field, ArrayRef) {
        self.cells.resize_with(rows, || None);
        let ty = self.data_type();
        let json = self.holds_json();
        let cells = &self.cells;
        let array: ArrayRef = match ty {
            DataType::Null => Arc::new(NullArray::new(rows)),
            DataType::Boolean => Arc::new(
                cells
                    .iter()
                    .map(|c| match c {
                        Some(Cell::Bool(b)) => Some(*b),
                        _ => None,
                    })
                    .collect::<BooleanArray>(),
            ),
            DataType::Int64 => Arc::new(
                cells
                    .iter()
                    .map(|c| match c {
                        Some(Cell::Int(i)) => Some(*i),
                        _ => None,
                    })
                    .collect::<Int64Array>(),
            ),
            DataType::Float64 => Arc::new(
                cells
                    .iter()
                    .map(|c| match c {
                        Some(Cell::Float(f)) => Some(*f),
                        Some(Cell::Int(i)) => Some(*i as f64),
                        _ => None,
                    })
                    .collect::<Float64Array>(),
            ),
            _ => {
                let mut b = StringBuilder::with_capacity(rows, rows * 8);
                for c in cells {
                    match c {
                        None => b.append_null(),
                        Some(Cell::Text(s)) if !json => b.append_value(s),
                        Some(Cell::Json(s)) => b.append_value(s),
                        Some(other) => b.append_value(other.json()),
                    }
                }
                Arc::new(b.finish())
            }
        };
        let field = if json {
            crate::values::json_field(self.name)
        } else {
            Field::new(self.name, ty, true)
        };
        (field, array)
    }
}

/// One batch being decoded.
struct Builder<'d, 'm> {
    decoder: &'d Decoder,
    /// Column by name (every-field mode; `only` mode uses the decoder's lookup).
    index: HashMap<String, usize>,
    columns: Vec<Column<'m>>,
    /// The current message's values, committed to `columns` once the whole payload decoded.
    pending: Vec<(usize, Cell<'m>)>,
    /// The dotted path of the field being read.
    path: String,
    /// Why the current message was refused, when the refusal is ours rather than serde_json's.
    refusal: Option<String>,
}

impl<'d, 'm> Builder<'d, 'm> {
    fn target(&self) -> Option<Target> {
        match &self.decoder.only {
            Some(_) => self.decoder.lookup.get(self.path.as_str()).copied(),
            None => Some(Target {
                column: None,
                descend: true,
            }),
        }
    }

    /// Hold `cell` for the field at `path`, checking a declared type.
    fn hold<E: de::Error>(&mut self, target: Target, cell: Cell<'m>) -> Result<(), E> {
        let column = match (target.column, &self.decoder.only) {
            (Some(c), _) => c,
            (None, Some(_)) => return Ok(()),
            (None, None) => match self.index.get(self.path.as_str()) {
                Some(&c) => c,
                None => {
                    let declared = self.decoder.declared_type(&self.path);
                    self.index.insert(self.path.clone(), self.columns.len());
                    self.columns.push(Column::new(self.path.clone(), declared));
                    self.columns.len() - 1
                }
            },
        };
        if let Some(ty) = self.columns[column].declared {
            if !cell.fits(ty) {
                return Err(self.refuse(format!(
                    "column {}: declared {ty:?}, got {}",
                    self.path,
                    cell.json()
                )));
            }
        }
        self.pending.push((column, cell));
        Ok(())
    }

    fn refuse<E: de::Error>(&mut self, reason: String) -> E {
        self.refusal = Some(reason);
        E::custom("refused")
    }

    fn too_deep<E: de::Error>(&mut self) -> E {
        self.refuse(format!("payload nests deeper than {MAX_DEPTH} levels"))
    }

    /// A skipped value still counts towards the nesting limit.
    fn skipped<E: de::Error>(&mut self, raw: &RawValue, depth: usize) -> Result<(), E> {
        if raw.get().starts_with('{') && depth + object_depth(raw.get()) > MAX_DEPTH {
            return Err(self.too_deep());
        }
        Ok(())
    }
}

/// How deeply objects nest in a JSON text (0 for a scalar), not counting inside strings.
fn object_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// How deeply objects nest in `v` (0 for a scalar), as [`object_depth`] counts them.
fn value_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(value_depth).max().unwrap_or(0),
        Value::Array(a) => a.iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A key, borrowed from the payload unless it held escapes.
struct Key<'m>(Cow<'m, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An object's fields, at `depth` (the payload itself is depth 1).
struct ObjectFields<'b, 'd, 'm> {
    builder: &'b mut Builder<'d, 'm>,
    depth: usize,
    /// Read from a `serde_json::Value` already taken whole (its depth checked), not from the
    /// payload text, so skipped fields have no raw text.
    from_value: bool,
}

impl<'m> DeserializeSeed<'m> for ObjectFields<'_, '_, 'm> {
    type Value = ();
    fn deserialize<D: Deserializer<'m>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'m> Visitor<'m> for ObjectFields<'_, '_, 'm> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'m>>(self, mut map: A) -> Result<(), A::Error> {
        let b = self.builder;
        if self.depth > MAX_DEPTH {
            return Err(b.too_deep());
        }
        let prefix = b.path.len();
        while let Some(Key(key)) = map.next_key::<Key<'m>>()? {
            b.path.truncate(prefix);
            if prefix > 0 {
                b.path.push('.');
            }
            b.path.push_str(&key);
            match b.target() {
                Some(target) => map.next_value_seed(FieldValue {
                    builder: &mut *b,
                    depth: self.depth,
                    target,
                    from_value: self.from_value,
                })?,
                None if self.from_value => {
                    map.next_value::<de::IgnoredAny>()?;
                }
                None => {
                    let raw: &RawValue = map.next_value()?;
                    b.skipped(raw, self.depth)?;
                }
            }
        }
        b.path.truncate(prefix);
        Ok(())
    }
}

/// The value of one field the statement may want.
struct FieldValue<'b, 'd, 'm> {
    builder: &'b mut Builder<'d, 'm>,
    depth: usize,
    target: Target,
    from_value: bool,
}

impl<'m> DeserializeSeed<'m> for FieldValue<'_, '_, 'm> {
    type Value = ();
    fn deserialize<D: Deserializer<'m>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'m> Visitor<'m> for FieldValue<'_, '_, 'm> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        let cell = i64::try_from(v).map_or(Cell::Float(v as f64), Cell::Int);
        self.builder.hold(self.target, cell)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Float(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'m str) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.builder
            .hold(self.target, Cell::Text(Cow::Owned(v.to_string())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.builder.hold(self.target, Cell::Null)
    }
    fn visit_seq<A: SeqAccess<'m>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        let cell = Cell::Json(Value::Array(items).to_string());
        self.builder.hold(self.target, cell)
    }
    fn visit_map<A: MapAccess<'m>>(self, mut map: A) -> Result<(), A::Error> {
        // Every field, and the statement also names this object (`SELECT *, state` or a nested
        // query over it): held whole as well as walked.
        let named_whole = self.builder.decoder.only.is_none()
            && self
                .builder
                .decoder
                .lookup
                .get(self.builder.path.as_str())
                .is_some_and(|t| t.column.is_some());
        if self.target.column.is_none() && !named_whole {
            let held = self.builder.pending.len();
            ObjectFields {
                builder: &mut *self.builder,
                depth: self.depth + 1,
                from_value: self.from_value,
            }
            .visit_map(map)?;
            // Every field: an object with no fields below it still comes back as `{}`.
            if self.builder.decoder.only.is_none() && self.builder.pending.len() == held {
                self.builder
                    .hold(self.target, Cell::Json("{}".to_string()))?;
            }
            return Ok(());
        }
        // Wanted as a whole: held as its JSON (and walked too when fields below it are wanted).
        if self.depth + 1 > MAX_DEPTH {
            return Err(self.builder.too_deep());
        }
        let mut object = Map::new();
        while let Some((key, value)) = map.next_entry::<String, Value>()? {
            object.insert(key, value);
        }
        let object = Value::Object(object);
        if self.depth + value_depth(&object) > MAX_DEPTH {
            return Err(self.builder.too_deep());
        }
        self.builder
            .hold(self.target, Cell::Json(object.to_string()))?;
        if self.target.descend {
            ObjectFields {
                builder: self.builder,
                depth: self.depth + 1,
                from_value: true,
            }
            .deserialize(object)
            .map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

impl Decoder {
    /// `columns`: the names a statement refers to; `whole_payload`: it selects `*`.
    pub fn new(
        declared: &[(String, ColumnType)],
        columns: &BTreeSet<String>,
        whole_payload: bool,
    ) -> Self {
        let always: Vec<String> = declared
            .iter()
            .map(|(c, _)| c.clone())
            .chain(columns.iter().filter(|c| !c.starts_with("__")).cloned())
            .fold(Vec::new(), |mut acc, c| {
                if !acc.contains(&c) {
                    acc.push(c);
                }
                acc
            });
        let mut lookup: HashMap<String, Target> = HashMap::default();
        for (i, name) in always.iter().enumerate() {
            lookup.entry(name.clone()).or_default().column = Some(i);
            let mut end = 0;
            while let Some(dot) = name[end..].find('.') {
                end += dot;
                lookup.entry(name[..end].to_string()).or_default().descend = true;
                end += 1;
            }
        }
        let only = (!whole_payload).then(|| always.clone());
        Decoder {
            declared: declared.to_vec(),
            only,
            lookup,
            always,
            binary: false,
            payload_column: false,
            properties_column: false,
            source_ip_column: false,
            trace_id_column: false,
        }
    }

    /// The decoder of one statement of a rule with these declared types.
    pub fn for_statement(declared: &[(String, ColumnType)], s: &StatementSpec) -> Self {
        let mut d = Decoder::new(declared, &s.columns, s.whole_payload);
        d.binary = s.takes_binary() && declared.is_empty();
        d.payload_column = s.payload_value;
        d.properties_column = s.mqtt_properties;
        d.source_ip_column = s.source_ip;
        d.trace_id_column = s.trace_id;
        d
    }

    fn declared_type(&self, column: &str) -> Option<ColumnType> {
        self.declared
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, t)| *t)
    }

    /// Decode `messages` into one batch. Messages that fail (not JSON, not an object, too deep,
    /// a declared column of the wrong type) are left out and reported.
    pub fn decode(&self, messages: &[&Message]) -> (RecordBatch, Vec<usize>, Vec<DecodeFailure>) {
        let mut b = Builder {
            decoder: self,
            index: HashMap::default(),
            columns: Vec::new(),
            pending: Vec::new(),
            path: String::new(),
            refusal: None,
        };
        if let Some(only) = &self.only {
            b.columns = only
                .iter()
                .map(|c| Column::new(c.clone(), self.declared_type(c)))
                .collect();
        }
        let mut kept: Vec<usize> = Vec::with_capacity(messages.len());
        // Rows (by index in `kept`) whose payload is not a JSON object, for a binary statement.
        let mut binary_rows: Vec<bool> = Vec::new();
        let mut failures = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            b.pending.clear();
            b.path.clear();
            b.refusal = None;
            let mut de = serde_json::Deserializer::from_slice(&m.payload);
            let result = ObjectFields {
                builder: &mut b,
                depth: 1,
                from_value: false,
            }
            .deserialize(&mut de)
            .and_then(|()| de.end());
            if let Err(e) = result {
                if self.binary && b.refusal.is_none() {
                    // binary-payloads: the payload is bytes; the statement reads no field.
                    kept.push(i);
                    binary_rows.resize(kept.len() - 1, false);
                    binary_rows.push(true);
                    continue;
                }
                let reason = match b.refusal.take() {
                    Some(reason) => reason,
                    None if e.is_data() => "payload is not a JSON object".to_string(),
                    None => format!("payload is not JSON: {e}"),
                };
                failures.push(DecodeFailure { index: i, reason });
                continue;
            }
            let row = kept.len();
            kept.push(i);
            for (c, cell) in b.pending.drain(..) {
                b.columns[c].set(row, cell);
            }
        }
        let mut columns = b.columns;
        for c in &self.always {
            if self.only.is_none() && !b.index.contains_key(c) {
                columns.push(Column::new(c.clone(), self.declared_type(c)));
            }
        }
        let rows = kept.len();
        let mut fields = vec![
            Field::new(TOPIC, DataType::Utf8, false),
            Field::new(THING, DataType::Utf8, false),
            Field::new(CERT_ID, DataType::Utf8, false),
            Field::new(RECEIVED_AT, DataType::Int64, false),
        ];
        let picked = || kept.iter().map(|&i| messages[i]);
        // Sized up front: collecting into a StringArray grows its buffer by copying.
        let texts = |text: fn(&Message) -> &str| -> ArrayRef {
            let bytes = picked().map(|m| text(m).len()).sum();
            let mut b = StringBuilder::with_capacity(rows, bytes);
            for m in picked() {
                b.append_value(text(m));
            }
            Arc::new(b.finish())
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len() + 4);
        arrays.push(texts(|m| m.topic.as_str()));
        arrays.push(texts(|m| m.thing.as_str()));
        arrays.push(texts(|m| m.cert_id.as_str()));
        arrays.push(Arc::new(
            picked()
                .map(|m| Some(m.received_at_ms))
                .collect::<Int64Array>(),
        ));
        for column in columns {
            let (field, array) = column.finish(rows);
            fields.push(field);
            arrays.push(array);
        }
        if self.properties_column {
            // Every message has the column, an empty object when it came without properties,
            // so that a property not sent is Undefined rather than the whole column missing.
            let none = Properties::default().json().to_string();
            let texts: StringArray = picked()
                .map(|m| match &m.properties {
                    Some(p) => Some(p.json().to_string()),
                    None => Some(none.clone()),
                })
                .collect();
            fields.push(crate::values::json_field(MQTT));
            arrays.push(Arc::new(texts));
        }
        if self.source_ip_column {
            fields.push(Field::new(SOURCE_IP, DataType::Utf8, true));
            arrays.push(Arc::new(
                picked()
                    .map(|m| m.source_ip.as_deref())
                    .collect::<StringArray>(),
            ));
        }
        if self.trace_id_column {
            fields.push(Field::new(TRACE_ID, DataType::Utf8, true));
            arrays.push(Arc::new(
                picked()
                    .map(|m| m.trace_id.map(sitegate_plugins::template::uuid_v4))
                    .collect::<StringArray>(),
            ));
        }
        if self.payload_column {
            fields.push(Field::new(PAYLOAD, DataType::Binary, false));
            arrays.push(Arc::new(
                picked()
                    .map(|m| Some(m.payload.as_ref()))
                    .collect::<BinaryArray>(),
            ));
        }
        if self.binary && self.only.is_none() {
            // `SELECT *` of a binary payload is that payload, unchanged.
            binary_rows.resize(rows, false);
            fields.push(Field::new(RAW, DataType::Binary, true));
            arrays.push(Arc::new(
                picked()
                    .zip(&binary_rows)
                    .map(|(m, &raw)| raw.then(|| m.payload.as_ref()))
                    .collect::<BinaryArray>(),
            ));
        }
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), arrays)
            .unwrap_or_else(|_| RecordBatch::new_empty(schema));
        (batch, kept, failures)
    }
}

/// The column of `SELECT *` holding a binary (not JSON object) payload; null for the others.
pub const RAW: &str = "__sg_raw";

/// One output row: the JSON object for the sink, and the identity columns the rule carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub object: Map<String, Value>,
    /// `SELECT VALUE x`: the row is this value, not `object` (iot-sql-select); `None` inside
    /// is an Undefined value, which makes no output.
    pub value: Option<Option<Value>>,
    /// `SELECT *` of a binary payload: these bytes are the output.
    pub raw: Option<Bytes>,
    pub thing: Option<String>,
    pub cert_id: Option<String>,
    pub topic: Option<String>,
    pub received_at_ms: Option<i64>,
    /// The values of the statement's template columns, in order (`None`: Undefined).
    pub templates: Vec<Option<Value>>,
    /// `object` already written as JSON text, by [`written_rows`]; `object` is then empty.
    pub written: Option<Vec<u8>>,
}

/// One value of an output column; `None` for an Arrow null, which is Undefined.
fn cell(array: &dyn Array, row: usize) -> Option<Value> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes as t;
    if array.is_null(row) || array.data_type() == &DataType::Null {
        return None;
    }
    Some(match array.data_type() {
        DataType::Boolean => array
            .as_any()
            .downcast_ref::<BooleanArray>()
            .map(|a| Value::Bool(a.value(row)))
            .unwrap_or(Value::Null),
        DataType::Int64 => Value::from(array.as_primitive::<t::Int64Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<t::Int32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<t::UInt64Type>().value(row)),
        DataType::Float64 => decimal(array.as_primitive::<t::Float64Type>().value(row)),
        DataType::Float32 => decimal(f64::from(array.as_primitive::<t::Float32Type>().value(row))),
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Value::from(array.as_string_view().value(row)),
        _ => {
            let options = FormatOptions::default();
            match ArrayFormatter::try_new(array, &options) {
                Ok(f) => Value::from(f.value(row).to_string()),
                Err(_) => return None,
            }
        }
    })
}

/// A Decimal as SQL version 2016-03-23 outputs it (iot-sql-data-types): a whole number is an
/// Int (`10.0` is `10`); NaN and infinities, which JSON cannot hold, are Null.
fn decimal(v: f64) -> Value {
    match crate::values::whole(v) {
        Some(i) => Value::from(i),
        None => serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
    }
}

/// Put `value` at the dotted path `name` inside `object` (so flattened fields nest again).
pub(crate) fn insert_path(object: &mut Map<String, Value>, name: &str, value: Value) {
    let path: Vec<&str> = name.split('.').collect();
    insert_at(object, &path, value);
}

/// Put `value` at `path` (a dotted name's parts) inside `object`.
fn insert_at(object: &mut Map<String, Value>, path: &[&str], value: Value) {
    let mut parts = path.iter().copied().peekable();
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
/// `__sg_*` ones carry identity. An Undefined value (an Arrow null) leaves its key out, as IoT
/// Core does; a Null (JSON `null` in a [`JSON_COLUMN`]) goes out as `null`.
pub fn rows(batch: &RecordBatch) -> Vec<Row> {
    rows_as(batch, false)
}

/// As [`rows`], but when every field of the batch is a distinct top-level key (most rules:
/// `SELECT a, b AS c, f(x) AS d`), each row's object is written as JSON text into
/// [`Row::written`] without being built as a tree first, the same bytes `serde_json` gives
/// for the tree. Building and dropping the tree was the largest part of a rule's cost a
/// message in the gateway's profile (issue 19). Nested keys and `SELECT VALUE` keep the tree.
pub fn written_rows(batch: &RecordBatch) -> Vec<Row> {
    rows_as(batch, true)
}

/// What an output column is, decided once per batch rather than once per row.
enum Role<'a> {
    Raw(Option<&'a BinaryArray>),
    Identity(&'a dyn Array, fn(&mut Row, Option<String>)),
    ReceivedAt(&'a dyn Array),
    Value(&'a dyn Array, bool),
    Template(&'a dyn Array, bool),
    Field(&'a dyn Array, bool, Vec<&'a str>),
}

fn rows_as(batch: &RecordBatch, write: bool) -> Vec<Row> {
    let schema = batch.schema();
    let roles: Vec<Role> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter_map(|(field, column)| {
            let json = field.metadata().contains_key(JSON_COLUMN);
            let column = column.as_ref();
            Some(match field.name().as_str() {
                RAW => Role::Raw(column.as_any().downcast_ref::<BinaryArray>()),
                "__sg_thing" => Role::Identity(column, |r, v| r.thing = v),
                "__sg_cert_id" => Role::Identity(column, |r, v| r.cert_id = v),
                "__sg_topic" => Role::Identity(column, |r, v| r.topic = v),
                "__sg_received_at" => Role::ReceivedAt(column),
                crate::dialect::VALUE_COLUMN => Role::Value(column, json),
                name if name.starts_with(crate::dialect::TEMPLATE_PREFIX) => {
                    Role::Template(column, json)
                }
                name if name.starts_with("__") => return None,
                name => Role::Field(column, json, name.split('.').collect()),
            })
        })
        .collect();
    let value = field_value;
    // The written keys (`"name":`, escaped once per batch), when the rows can be written.
    let keys: Option<Vec<Vec<u8>>> = write.then(|| written_keys(&roles)).flatten();
    let mut size_hint = 64;
    (0..batch.num_rows())
        .map(|r| {
            let mut row = Row {
                object: Map::new(),
                value: None,
                raw: None,
                thing: None,
                cert_id: None,
                topic: None,
                received_at_ms: None,
                templates: Vec::new(),
                written: None,
            };
            let mut text = keys.as_ref().map(|_| {
                let mut text = Vec::with_capacity(size_hint);
                text.push(b'{');
                text
            });
            let mut keys = keys.iter().flatten();
            for role in &roles {
                match role {
                    Role::Raw(raw) => {
                        row.raw = raw
                            .filter(|a| a.is_valid(r))
                            .map(|a| Bytes::copy_from_slice(a.value(r)));
                    }
                    Role::Identity(column, set) => {
                        let text = match column.as_any().downcast_ref::<StringArray>() {
                            Some(a) => a.is_valid(r).then(|| a.value(r).to_string()),
                            None => match cell(*column, r) {
                                Some(Value::String(s)) => Some(s),
                                _ => None,
                            },
                        };
                        set(&mut row, text);
                    }
                    Role::ReceivedAt(column) => {
                        row.received_at_ms = cell(*column, r).as_ref().and_then(Value::as_i64);
                    }
                    Role::Value(column, json) => row.value = Some(value(*column, *json, r)),
                    Role::Template(column, json) => row.templates.push(value(*column, *json, r)),
                    Role::Field(column, json, path) => match (text.as_mut(), keys.next()) {
                        (Some(text), Some(key)) => write_field(text, key, *column, *json, r),
                        _ => {
                            if let Some(v) = value(*column, *json, r) {
                                insert_at(&mut row.object, path, v);
                            }
                        }
                    },
                }
            }
            if let Some(mut text) = text {
                text.push(b'}');
                size_hint = text.len();
                row.written = Some(text);
            }
            row
        })
        .collect()
}

/// The escaped `"name":` of every field, in column order, if the batch's rows can be written
/// straight to text: each field a top-level key, no two the same (a tree would merge them or
/// let the last win), and no `SELECT VALUE`.
fn written_keys(roles: &[Role]) -> Option<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    let mut names = std::collections::HashSet::new();
    for role in roles {
        match role {
            Role::Value(..) => return None,
            Role::Field(_, _, path) => {
                let [name] = path.as_slice() else {
                    return None;
                };
                if !names.insert(*name) {
                    return None;
                }
                let mut key = serde_json::to_vec(name).ok()?;
                key.push(b':');
                keys.push(key);
            }
            _ => {}
        }
    }
    Some(keys)
}

/// Appends `,"key":value` (no comma first) to a row's text, or nothing for an Undefined value.
fn write_field(text: &mut Vec<u8>, key: &[u8], column: &dyn Array, json: bool, r: usize) {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes as t;
    if column.is_null(r) || column.data_type() == &DataType::Null {
        return;
    }
    let start = text.len();
    if start > 1 {
        text.push(b',');
    }
    text.extend_from_slice(key);
    // The common types straight from the column; the rest as `cell` gives them.
    let written = match column.data_type() {
        DataType::Utf8 if !json => {
            serde_json::to_writer(&mut *text, column.as_string::<i32>().value(r))
        }
        DataType::Int64 => {
            serde_json::to_writer(&mut *text, &column.as_primitive::<t::Int64Type>().value(r))
        }
        DataType::Boolean => match column.as_any().downcast_ref::<BooleanArray>() {
            Some(a) => serde_json::to_writer(&mut *text, &a.value(r)),
            None => serde_json::to_writer(&mut *text, &Value::Null),
        },
        _ => match field_value(column, json, r) {
            Some(v) => serde_json::to_writer(&mut *text, &v),
            None => {
                text.truncate(start);
                return;
            }
        },
    };
    if written.is_err() {
        text.truncate(start);
    }
}

/// A field's value: a [`JSON_COLUMN`]'s text is the JSON it holds.
fn field_value(column: &dyn Array, json: bool, r: usize) -> Option<Value> {
    cell(column, r).map(|v| match v {
        Value::String(s) if json => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        v => v,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn msg(payload: &str) -> Message {
        Message {
            topic: "dt/a/t".into(),
            thing: "a".into(),
            cert_id: "c".into(),
            payload: Bytes::from(payload.to_string()),
            received_at_ms: 5,
            properties: None,
            source_ip: None,
            trace_id: None,
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
        let (batch, ok, failed) =
            Decoder::new(&[], &BTreeSet::from(["missing".to_string()]), true).decode(&refs);
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
        // The column is Float64 for 2.5, yet 1 goes out as the Int it came in as: SQL version
        // 2016-03-23 processes whole-number Decimals as Ints (iot-sql-data-types).
        assert_eq!(
            Value::Object(out[0].object.clone()),
            serde_json::json!({"t":1,"z":"B","s":{"v":true}})
        );
    }

    #[test]
    fn a_type_change_within_a_batch_is_held_as_json_and_declared_types_are_enforced() {
        let ms = [msg(r#"{"t":1}"#), msg(r#"{"t":"hot"}"#)];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, _, _) = Decoder::new(&[], &BTreeSet::new(), true).decode(&refs);
        let schema = batch.schema();
        let t = schema.field_with_name("t").unwrap();
        assert_eq!(t.data_type(), &DataType::Utf8);
        assert!(t.metadata().contains_key(JSON_COLUMN));
        let (_, ok, failed) =
            Decoder::new(&[("t".into(), ColumnType::Double)], &BTreeSet::new(), true).decode(&refs);
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
        let (_, ok, failed) = Decoder::new(&[], &BTreeSet::new(), true).decode(&[&m]);
        assert!(ok.is_empty());
        assert!(failed[0].reason.contains("deeper"));
    }

    #[test]
    fn only_the_named_fields_are_decoded_and_skipped_parts_still_count_towards_depth() {
        let deep = format!("{}1{}", "{\"z\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        let ms = [
            msg(r#"{"temp":-3.5,"door":"open","motor":{"amps":4,"hot":true},"tags":[1,"a"]}"#),
            msg(r#"{"temp":2,"motor":{"amps":4.5},"m\u0061x":"\u00e9"}"#),
            msg(&format!(r#"{{"temp":1,"skip":{deep}}}"#)),
        ];
        let refs: Vec<&Message> = ms.iter().collect();
        let columns = BTreeSet::from(["temp".to_string(), "motor.amps".to_string(), "max".into()]);
        let (batch, ok, failed) = Decoder::new(&[], &columns, false).decode(&refs);
        assert_eq!(ok, vec![0, 1]);
        assert!(failed[0].reason.contains("deeper"), "{failed:?}");
        let schema = batch.schema();
        let names: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .skip(4)
            .collect();
        assert_eq!(names, ["max", "motor.amps", "temp"]);
        assert_eq!(
            schema.field_with_name("temp").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            schema.field_with_name("max").unwrap().data_type(),
            &DataType::Utf8
        );
        let out = rows(&batch);
        assert_eq!(
            Value::Object(out[1].object.clone()),
            serde_json::json!({"temp":2,"motor":{"amps":4.5},"max":"é"})
        );
        assert_eq!(
            Value::Object(out[0].object.clone()),
            serde_json::json!({"temp":-3.5,"motor":{"amps":4}})
        );
    }

    #[test]
    fn an_object_wanted_whole_is_held_as_json_within_the_depth_limit() {
        let wanted = BTreeSet::from(["s".to_string(), "s.a".to_string()]);
        let deep = format!(
            r#"{{"s":{}1{}}}"#,
            r#"{"a":"#.repeat(MAX_DEPTH),
            "}".repeat(MAX_DEPTH)
        );
        let ms = [msg(r#"{"s":{"a":1,"b":[true]}}"#), msg(&deep)];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, ok, failed) = Decoder::new(&[], &wanted, false).decode(&refs);
        assert_eq!(ok, vec![0]);
        assert!(failed[0].reason.contains("deeper"), "{failed:?}");
        let field = batch.schema().field_with_name("s").unwrap().clone();
        assert!(field.metadata().contains_key(JSON_COLUMN));
        let out = rows(&batch);
        assert_eq!(
            Value::Object(out[0].object.clone()),
            serde_json::json!({"s":{"a":1,"b":[true]}})
        );
    }

    #[test]
    fn a_field_with_several_types_in_a_batch_keeps_each_value() {
        let ms = [
            msg(r#"{"v":[1, {"a":null}],"w":true,"t":"5"}"#),
            msg(r#"{"v":2.5,"w":3,"t":5}"#),
        ];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, _, _) = Decoder::new(&[], &BTreeSet::new(), true).decode(&refs);
        let out = rows(&batch);
        // Each value as it came, whatever the other messages of the batch held.
        assert_eq!(out[0].object["v"], serde_json::json!([1, {"a": null}]));
        assert_eq!(out[1].object["v"], serde_json::json!(2.5));
        assert_eq!(out[0].object["w"], Value::Bool(true));
        assert_eq!(out[1].object["w"], Value::from(3));
        assert_eq!(out[0].object["t"], Value::from("5"));
        assert_eq!(out[1].object["t"], Value::from(5));
    }

    /// Every kind of JSON leaf: whole-number Decimals and control characters among them.
    fn leaf() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            Just(Value::from(10.0)),
            "[a-z\u{e9}\"\\\\ \u{1}]{0,6}".prop_map(Value::from),
        ]
    }

    /// JSON objects up to three levels deep, with every kind of leaf.
    fn object() -> impl Strategy<Value = Value> {
        let value = leaf().prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-d]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        });
        prop::collection::btree_map("[a-d]{1,2}", value, 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    /// Equal, but for the last bit of a float: serde_json's fast float parsing (without its
    /// `float_roundtrip` feature) may differ from the shortest printed form by one ulp.
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
            }
            _ => a == b,
        }
    }

    proptest! {
        /// Every field decodes and comes back as it was, nulls and empty objects included (one message per batch, so no type is
        /// widened by a neighbour), and a statement naming some fields sees the same values.
        #[test]
        fn payloads_round_trip_and_projection_agrees(payload in object(), pick in any::<prop::sample::Index>()) {
            let text = payload.to_string();
            let m = msg(&text);
            let (batch, ok, failed) = Decoder::new(&[], &BTreeSet::new(), true).decode(&[&m]);
            prop_assert!(failed.is_empty(), "{failed:?}");
            prop_assert_eq!(ok.len(), 1);
            let all = rows(&batch);
            // Nulls and empty objects included (iot-sql-select: `SELECT *` gives the payload).
            let got = Value::Object(all[0].object.clone());
            prop_assert!(same(&got, &payload), "{got} != {payload}");

            let schema = batch.schema();
            let names: Vec<String> = schema.fields().iter().skip(4).map(|f| f.name().clone()).collect();
            if names.is_empty() {
                return Ok(());
            }
            let name = names[pick.index(names.len())].clone();
            let columns = BTreeSet::from([name.clone()]);
            let (only, _, _) = Decoder::new(&[], &columns, false).decode(&[&m]);
            prop_assert_eq!(only.num_columns(), 5);
            let from_all = cell(batch.column_by_name(&name).unwrap().as_ref(), 0);
            let from_only = cell(only.column_by_name(&name).unwrap().as_ref(), 0);
            prop_assert_eq!(from_all, from_only);
        }

        /// Rows written straight to text are the bytes `serde_json` gives for the tree, for
        /// batches whose fields change type from one message to the next (text columns).
        #[test]
        fn written_rows_are_the_trees_bytes(payloads in prop::collection::vec(flat_object(), 1..5)) {
            let ms: Vec<Message> = payloads.iter().map(|p| msg(&p.to_string())).collect();
            let refs: Vec<&Message> = ms.iter().collect();
            let (batch, _, failed) = Decoder::new(&[], &BTreeSet::new(), true).decode(&refs);
            prop_assert!(failed.is_empty(), "{failed:?}");
            let trees = rows(&batch);
            let written = written_rows(&batch);
            prop_assert_eq!(trees.len(), written.len());
            for (tree, row) in trees.iter().zip(&written) {
                let want = serde_json::to_vec(&Value::Object(tree.object.clone())).unwrap();
                prop_assert!(row.object.is_empty());
                let got = row.written.as_deref().unwrap_or_default();
                prop_assert_eq!(String::from_utf8_lossy(got), String::from_utf8_lossy(&want));
                prop_assert_eq!((&row.thing, &row.cert_id, &row.topic), (&tree.thing, &tree.cert_id, &tree.topic));
            }
        }
    }

    /// Objects of top-level keys only, whose values are leaves or arrays of them.
    fn flat_object() -> impl Strategy<Value = Value> {
        let value = prop_oneof![
            4 => leaf(),
            1 => prop::collection::vec(leaf(), 0..3).prop_map(Value::Array),
        ];
        prop::collection::btree_map("[a-c]", value, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    #[test]
    fn nested_or_repeated_keys_keep_the_tree() {
        let ms = [msg(r#"{"s":{"v":1},"t":2}"#)];
        let refs: Vec<&Message> = ms.iter().collect();
        let (batch, _, _) = Decoder::new(&[], &BTreeSet::new(), true).decode(&refs);
        let out = written_rows(&batch);
        assert_eq!(out[0].written, None);
        assert_eq!(
            Value::Object(out[0].object.clone()),
            serde_json::json!({"s":{"v":1},"t":2})
        );
    }
}
