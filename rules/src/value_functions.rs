//! The IoT SQL functions whose arguments or results may be any IoT type, Null, Arrays and
//! Objects included (iot-sql-functions, SQL version 2016-03-23), as DataFusion UDFs:
//! - `isNull`, `isUndefined`, `nanvl`, `get`, `decode`, `transform`;
//! - the `NULL` literal, lowered to `iot_null()` so that it stays a Null value instead of
//!   becoming an Arrow null (Undefined);
//! - `CASE` (iot-sql-case), lowered to `iot_case` / `iot_case_when` so that its branches keep
//!   their own types instead of being coerced to one;
//! - Array and Object literals (`[1, 2]`, `{"a": 1}`), lowered to `iot_array` / `iot_object`;
//! - nested queries, `iot_nested` ([`crate::nested`] compiles and runs them);
//! - the argument of a window's `sum`/`avg`/`min`/`max` ([`AGGREGATE_ARG_UDF`]).
//!
//! Arguments are read by their IoT kind ([`Kind::of`] on the argument's field), converted once
//! per batch into JSON values ([`values_of`]), and any-type results go out as a JSON column
//! ([`json_field`]), so a result keeps its type row by row.

use std::sync::Arc;

use base64::Engine as _;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;
use serde_json::Value;

use crate::values::{
    floor_int, json_column, json_field, json_values, parse_decimal, values_equal, values_of, Kind,
};

/// The UDF the `NULL` literal is lowered to.
pub(crate) const NULL_UDF: &str = "iot_null";

/// The UDFs the two forms of `CASE` are lowered to.
pub(crate) const CASE_UDF: &str = "iot_case";
pub(crate) const CASE_WHEN_UDF: &str = "iot_case_when";
/// What the dialect wraps a window aggregate's argument in (`sum(iot_aggregate_arg(x, 'sum'))`).
/// A field whose values have several types is held as JSON text, which `sum` cannot add and
/// `max` would compare as text: its values are taken as Decimals (numbers, and strings that
/// read as numbers, as IoT SQL's arithmetic converts them; any other value is Undefined, which
/// aggregates skip). So are Strings for `sum` and `avg`; `min` and `max` of Strings compare
/// them as text. A typed column is passed as it is.
pub(crate) const AGGREGATE_ARG_UDF: &str = "iot_aggregate_arg";
/// The UDFs Array and Object literals are lowered to.
pub(crate) const ARRAY_UDF: &str = "iot_array";
pub(crate) const OBJECT_UDF: &str = "iot_object";

/// What `*` as a function's argument other than `encode`'s is lowered to (`get(*, 'order')`):
/// iot-sql-json, "`*` … creates a new JSON object containing the message data". A payload that
/// is not JSON is Undefined here; `encode(*, 'base64')` takes its bytes as they came.
pub(crate) const PAYLOAD_UDF: &str = "iot_payload";

/// The IoT names of the functions here, as [`crate::functions::lookup`] knows them.
pub(crate) const NAMES: [&str; 6] = [
    "isnull",
    "isundefined",
    "nanvl",
    "get",
    "decode",
    "transform",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Which {
    Null,
    IsNull,
    IsUndefined,
    Nanvl,
    Get,
    Decode,
    Transform,
    /// A nested query: `iot_nested(field, 'inner query')` ([`crate::nested`]).
    Nested,
    /// The argument of a window's `sum`, `avg`, `min`, `max` ([`AGGREGATE_ARG_UDF`]).
    AggregateArg,
    /// `CASE v WHEN t THEN r … [ELSE e] END`: `iot_case(v, t, r, …[, e])`.
    Case,
    /// `CASE WHEN c THEN r … [ELSE e] END`: `iot_case_when(c, r, …[, e])`.
    CaseWhen,
    /// `[a, b, …]`: `iot_array(a, b, …)`.
    Array,
    /// `{'k': v, …}`: `iot_object('k', v, …)`.
    Object,
    /// `*` as an argument: the payload as a value ([`PAYLOAD_UDF`]).
    Payload,
}

impl Which {
    const ALL: [Which; 14] = [
        Which::Payload,
        Which::AggregateArg,
        Which::Nested,
        Which::Transform,
        Which::Array,
        Which::Object,
        Which::Null,
        Which::IsNull,
        Which::IsUndefined,
        Which::Nanvl,
        Which::Get,
        Which::Decode,
        Which::Case,
        Which::CaseWhen,
    ];

    fn name(self) -> &'static str {
        match self {
            Which::Null => NULL_UDF,
            Which::IsNull => "iot_isnull",
            Which::IsUndefined => "iot_isundefined",
            Which::Nanvl => "iot_nanvl",
            Which::Get => "iot_get",
            Which::Decode => "iot_decode",
            Which::Transform => "iot_transform",
            Which::Nested => crate::nested::NESTED_UDF,
            Which::AggregateArg => AGGREGATE_ARG_UDF,
            Which::Case => CASE_UDF,
            Which::CaseWhen => CASE_WHEN_UDF,
            Which::Array => ARRAY_UDF,
            Which::Object => OBJECT_UDF,
            Which::Payload => PAYLOAD_UDF,
        }
    }

    /// How many arguments it takes; `None`: any number.
    fn arity(self) -> Option<usize> {
        match self {
            Which::Null => Some(0),
            Which::IsNull | Which::IsUndefined | Which::Payload => Some(1),
            Which::AggregateArg => Some(2),
            Which::Nanvl | Which::Get | Which::Decode | Which::Nested => Some(2),
            Which::Transform => Some(3),
            Which::Case | Which::CaseWhen | Which::Array | Which::Object => None,
        }
    }
}

/// Registers every function of this module on `ctx`.
pub(crate) fn register(ctx: &SessionContext) {
    for which in Which::ALL {
        ctx.register_udf(ScalarUDF::from(ValueUdf::new(which)));
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ValueUdf {
    which: Which,
    signature: Signature,
}

impl ValueUdf {
    fn new(which: Which) -> Self {
        // Volatile for `iot_null()`: constant folding would turn it into a plain literal and
        // lose the JSON mark that makes it Null rather than Undefined.
        let volatility = if which == Which::Null {
            Volatility::Volatile
        } else {
            Volatility::Immutable
        };
        let signature = match which.arity() {
            Some(0) => Signature::nullary(volatility),
            Some(n) => Signature::any(n, volatility),
            None => Signature::variadic_any(volatility),
        };
        ValueUdf { which, signature }
    }
}

/// `decode`'s scheme, a literal checked when the rule is planned: only `'base64'` exists.
fn check_scheme(v: Option<&ScalarValue>) -> Result<()> {
    match v {
        Some(ScalarValue::Utf8(Some(s))) if s.eq_ignore_ascii_case("base64") => Ok(()),
        Some(ScalarValue::Utf8(Some(s))) => {
            plan_err!("decode(): the scheme {s:?} is not supported; the only one is 'base64'")
        }
        _ => plan_err!("decode() takes its scheme as a literal string: 'base64'"),
    }
}

impl ScalarUDFImpl for ValueUdf {
    fn name(&self) -> &str {
        self.which.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.which {
            Which::IsNull | Which::IsUndefined => DataType::Boolean,
            _ => DataType::Utf8,
        })
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        if self.which == Which::Decode {
            check_scheme(args.scalar_arguments.get(1).copied().flatten())?;
        }
        Ok(Arc::new(match self.which {
            // Never Undefined: the page's tables give true or false for every type.
            Which::IsNull | Which::IsUndefined => Field::new(self.name(), DataType::Boolean, false),
            Which::AggregateArg => {
                let adds = matches!(
                    args.scalar_arguments.get(1).copied().flatten(),
                    Some(ScalarValue::Utf8(Some(f))) if f == "sum" || f == "avg"
                );
                match args.arg_fields.first() {
                    Some(f) if as_decimals(Kind::of(f), adds) => {
                        Field::new(self.name(), DataType::Float64, true)
                    }
                    Some(f) => f.as_ref().clone().with_name(self.name()),
                    None => Field::new(self.name(), DataType::Float64, true),
                }
            }
            Which::Case | Which::CaseWhen => {
                let kinds: Vec<Kind> = args.arg_fields.iter().map(|f| Kind::of(f)).collect();
                match case_result_type(self.which == Which::Case, &kinds) {
                    Some(t) => Field::new(self.name(), t, true),
                    None => json_field(self.name()),
                }
            }
            _ => json_field(self.name()),
        }))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(arity) = self.which.arity().filter(|&a| a != args.args.len()) {
            return exec_err!("{} takes {arity} arguments", self.name());
        }
        if self.which == Which::Null {
            return Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                "null".to_string(),
            ))));
        }
        let scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let n = if scalar { 1 } else { args.number_rows };
        let arrays = args
            .args
            .iter()
            .map(|a| match a {
                ColumnarValue::Array(a) => Ok(Arc::clone(a)),
                ColumnarValue::Scalar(s) => s.to_array_of_size(1),
            })
            .collect::<Result<Vec<_>>>()?;
        let kinds: Vec<Kind> = args.arg_fields.iter().map(|f| Kind::of(f)).collect();
        let row = |a: &ArrayRef, i: usize| if a.len() == 1 { 0 } else { i };
        let every_value = || {
            arrays
                .iter()
                .zip(&kinds)
                .map(|(a, k)| values_of(a, *k))
                .collect::<Result<Vec<_>>>()
        };
        let out: ArrayRef = match self.which {
            Which::IsNull | Which::IsUndefined => {
                let (a, kind) = (&arrays[0], kinds[0]);
                let null = self.which == Which::IsNull;
                let flags: BooleanArray = if kind == Kind::Json {
                    json_values(a)
                        .map(|v| {
                            Some(match v {
                                Some(Value::Null) => null,
                                Some(_) => false,
                                None => !null,
                            })
                        })
                        .collect()
                } else {
                    // No Null outside a JSON column: only Undefined is there to find.
                    (0..a.len())
                        .map(|i| Some(!null && (kind == Kind::Undefined || a.is_null(i))))
                        .collect()
                };
                Arc::new(flags)
            }
            Which::Nanvl => {
                let (a, b) = (
                    values_of(&arrays[0], kinds[0])?,
                    values_of(&arrays[1], kinds[1])?,
                );
                let picked = (0..n).map(|i| {
                    // A NaN never becomes a JSON value, so it is Undefined here already.
                    match a[row(&arrays[0], i)].as_ref() {
                        None | Some(Value::Null) => b[row(&arrays[1], i)].as_ref(),
                        first => first,
                    }
                });
                json_column(picked)
            }
            Which::Get => {
                let (a, b) = (
                    values_of(&arrays[0], kinds[0])?,
                    values_of(&arrays[1], kinds[1])?,
                );
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| {
                        get(
                            a[row(&arrays[0], i)].as_ref()?,
                            b[row(&arrays[1], i)].as_ref()?,
                        )
                    })
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::Decode => {
                let texts = crate::values::texts(&arrays[0], kinds[0])?;
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| {
                        let r = row(&arrays[0], i);
                        texts.is_valid(r).then(|| decode_base64(texts.value(r)))
                    })
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::AggregateArg if args.return_field.data_type() == arrays[0].data_type() => {
                return Ok(args.args[0].clone())
            }
            Which::AggregateArg => Arc::new(crate::values::decimals(&arrays[0], kinds[0])?),
            Which::Payload => {
                let Some(bytes) = arrays[0]
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::BinaryArray>()
                else {
                    return exec_err!("{PAYLOAD_UDF} takes the payload's bytes");
                };
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| {
                        let r = row(&arrays[0], i);
                        if bytes.is_null(r) {
                            return None;
                        }
                        serde_json::from_slice(bytes.value(r)).ok()
                    })
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::Nested => {
                let query = match &args.args[1] {
                    ColumnarValue::Scalar(ScalarValue::Utf8(Some(text))) => {
                        match crate::nested::parse(text) {
                            Ok(q) => q,
                            Err(why) => return exec_err!("nested query: {why}"),
                        }
                    }
                    _ => return exec_err!("iot_nested takes its query as a literal"),
                };
                let from = values_of(&arrays[0], kinds[0])?;
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| query.run(from[row(&arrays[0], i)].as_ref()?))
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::Transform => {
                let columns = every_value()?;
                let at = |c: usize, i: usize| columns[c][row(&arrays[c], i)].as_ref();
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| transform(at(0, i)?, at(1, i)?, at(2, i)?))
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::Case | Which::CaseWhen => {
                let columns = every_value()?;
                let at = |c: usize, i: usize| columns[c][row(&arrays[c], i)].as_ref();
                let simple = self.which == Which::Case;
                let first = usize::from(simple);
                let pairs = (columns.len() - first) / 2;
                let has_else = (columns.len() - first) % 2 == 1;
                let picked = (0..n).map(|i| {
                    if simple && at(0, i).is_none() {
                        // iot-sql-case: "If v is Undefined, the result … is Undefined".
                        return None;
                    }
                    for p in 0..pairs {
                        let (test, result) = (first + 2 * p, first + 2 * p + 1);
                        let hit = match (simple, at(test, i)) {
                            (true, Some(t)) => at(0, i).is_some_and(|v| values_equal(v, t)),
                            (false, Some(c)) => truthy(c),
                            (_, None) => false,
                        };
                        if hit {
                            return at(result, i);
                        }
                    }
                    has_else.then(|| at(columns.len() - 1, i)).flatten()
                });
                match args.return_field.data_type() {
                    DataType::Utf8 if Kind::of(&args.return_field) == Kind::Json => {
                        json_column(picked)
                    }
                    t => typed_column(picked, t),
                }
            }
            Which::Array | Which::Object => {
                let columns = every_value()?;
                let at = |c: usize, i: usize| columns[c][row(&arrays[c], i)].clone();
                // An Undefined item or field value is left out: Undefined is no JSON value.
                let items: Vec<Option<Value>> = (0..n)
                    .map(|i| {
                        Some(if self.which == Which::Array {
                            Value::Array((0..columns.len()).filter_map(|c| at(c, i)).collect())
                        } else {
                            let mut fields = serde_json::Map::new();
                            for c in (0..columns.len().saturating_sub(1)).step_by(2) {
                                if let (Some(Value::String(k)), Some(v)) = (at(c, i), at(c + 1, i))
                                {
                                    fields.insert(k, v);
                                }
                            }
                            Value::Object(fields)
                        })
                    })
                    .collect();
                json_column(items.iter().map(Option::as_ref))
            }
            Which::Null => return exec_err!("iot_null takes no arguments"),
        };
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

/// Whether an aggregate's argument of this kind is taken as Decimals ([`AGGREGATE_ARG_UDF`]);
/// `adds`: the aggregate is `sum` or `avg`.
fn as_decimals(kind: Kind, adds: bool) -> bool {
    kind == Kind::Json || (adds && kind == Kind::String)
}

/// The Arrow type of a `CASE` whose every result has one IoT type (`THEN 1 ELSE 0`): a typed
/// column, which the aggregates take (`sum(CASE … END)`); `None` when the results' types
/// differ, and the column holds JSON values.
fn case_result_type(simple: bool, kinds: &[Kind]) -> Option<DataType> {
    let first = usize::from(simple);
    let rest = kinds.get(first..)?;
    let mut results = rest.iter().skip(1).step_by(2).copied().collect::<Vec<_>>();
    if rest.len() % 2 == 1 {
        // The ELSE.
        results.extend(rest.last());
    }
    let kind = *results.first()?;
    if !results.iter().all(|k| *k == kind) {
        return None;
    }
    Some(match kind {
        Kind::Int => DataType::Int64,
        Kind::Decimal => DataType::Float64,
        Kind::String => DataType::Utf8,
        Kind::Boolean => DataType::Boolean,
        _ => return None,
    })
}

/// JSON values (each of the type `t` stands for) as a typed column.
fn typed_column<'a>(values: impl Iterator<Item = Option<&'a Value>>, t: &DataType) -> ArrayRef {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    match t {
        DataType::Int64 => Arc::new(values.map(|v| v?.as_i64()).collect::<Int64Array>()),
        DataType::Float64 => Arc::new(values.map(|v| v?.as_f64()).collect::<Float64Array>()),
        DataType::Boolean => Arc::new(values.map(|v| v?.as_bool()).collect::<BooleanArray>()),
        _ => Arc::new(
            values
                .map(|v| v?.as_str().map(str::to_string))
                .collect::<StringArray>(),
        ),
    }
}

/// Whether a searched `CASE`'s condition holds: a Boolean true, or the string "true" in any
/// case, as the logical operators read their operands (iot-sql-operators).
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// The largest Array `transform` returns (the page: "limited to 128 KiB"), as JSON text.
const TRANSFORM_LIMIT: usize = 128 * 1024;

/// `transform('enrichArray', object, array)`: each Object of `array` with the attributes of
/// `object` added (where both have a key, `object`'s value is the one kept). Any other mode,
/// a non-Object `object`, a non-Array `array`, an item that is not an Object, or a result over
/// 128 KiB give Undefined.
fn transform(mode: &Value, object: &Value, array: &Value) -> Option<Value> {
    let (Value::String(mode), Value::Object(extra), Value::Array(items)) = (mode, object, array)
    else {
        return None;
    };
    if mode != "enrichArray" {
        return None;
    }
    let out = items
        .iter()
        .map(|item| {
            let Value::Object(fields) = item else {
                return None;
            };
            let mut fields = fields.clone();
            for (k, v) in extra {
                fields.insert(k.clone(), v.clone());
            }
            Some(Value::Object(fields))
        })
        .collect::<Option<Vec<_>>>()
        .map(Value::Array)?;
    (out.to_string().len() <= TRANSFORM_LIMIT).then_some(out)
}

/// An index as `get` converts it (the page: "Any Type (converted to Int)"): numbers and
/// numeric strings, rounded down.
fn index(key: &Value) -> Option<usize> {
    let v = match key {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => parse_decimal(s)?,
        _ => return None,
    };
    usize::try_from(floor_int(v)?).ok()
}

/// `get(collection, key)`: the item at a 0-based index of an Array, the character at one of a
/// String, the value under a String key of an Object (no conversion of the key); Undefined
/// otherwise or out of bounds.
pub(crate) fn get(collection: &Value, key: &Value) -> Option<Value> {
    match collection {
        Value::Array(items) => items.get(index(key)?).cloned(),
        Value::String(s) => s.chars().nth(index(key)?).map(|c| Value::String(c.into())),
        Value::Object(fields) => match key {
            Value::String(k) => fields.get(k).cloned(),
            _ => None,
        },
        _ => None,
    }
}

/// `decode(text, 'base64')`: a JSON object or array when the decoded text is one, else the
/// decoded text as a String; Null when it is not base64 or not UTF-8 (the page: "returns NULL
/// if the string cannot be decoded").
fn decode_base64(text: &str) -> Value {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let Ok(bytes) = LENIENT.decode(text.trim()) else {
        return Value::Null;
    };
    let Ok(decoded) = String::from_utf8(bytes) else {
        return Value::Null;
    };
    match serde_json::from_str::<Value>(&decoded) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => Value::String(decoded),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn get_follows_the_pages_table() {
        // iot-sql-functions, get: the Array and Object examples.
        assert_eq!(get(&json!(["a", "b", "c"]), &json!(1)), Some(json!("b")));
        assert_eq!(get(&json!({"a": "b"}), &json!("a")), Some(json!("b")));
        // The page's `get("abc", 1) = "a"` disagrees with its table (0-based index): the
        // table is followed.
        assert_eq!(get(&json!("abc"), &json!(1)), Some(json!("b")));
        assert_eq!(get(&json!(["a", "b"]), &json!("1.9")), Some(json!("b")));
        assert_eq!(get(&json!(["a"]), &json!(-1)), None);
        assert_eq!(get(&json!(["a"]), &json!(1)), None);
        assert_eq!(get(&json!(["a"]), &json!(true)), None);
        assert_eq!(get(&json!({"1": "x"}), &json!(1)), None);
        assert_eq!(get(&json!(5), &json!(0)), None);
        assert_eq!(get(&Value::Null, &json!(0)), None);
    }

    #[test]
    fn decode_gives_json_text_or_null() {
        // iot-sql-functions, decode: the page's example payload.
        assert_eq!(
            decode_base64("eyAidGVtcGVyYXR1cmUiOiAzMyB9Cg=="),
            json!({"temperature": 33})
        );
        assert_eq!(decode_base64("aGVsbG8="), json!("hello"));
        assert_eq!(decode_base64("aGVsbG8"), json!("hello"));
        assert_eq!(decode_base64("MzM="), json!("33"));
        assert_eq!(decode_base64("not base64!"), Value::Null);
        assert_eq!(decode_base64("//79"), Value::Null);
    }
}
