//! IoT SQL's values over Arrow columns, and its conversions between them (the
//! `iot-sql-data-types` page, "Conversions", SQL version 2016-03-23).
//!
//! A column's Arrow type gives the IoT type of its values: integers are Int, floats are
//! Decimal, text is String. A text column marked [`JSON_COLUMN`] holds each value as JSON:
//! Arrays and Objects, and the values of a field whose type changed within a batch, so `"5"`
//! and `5` stay a String and an Int. An Arrow null is Undefined. The conversions here are the only ones the functions,
//! the operators and `cast` use, so one value converts one way wherever it goes.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::Result;
use serde_json::Value;

pub(crate) use crate::batch::JSON_COLUMN;

/// The IoT type of a column's values, from its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No value (a field no message of the batch had, or an Undefined result).
    Undefined,
    Boolean,
    Int,
    Decimal,
    String,
    /// Arrays, Objects and Null, and values of several types, as JSON text.
    Json,
    /// Anything else Arrow can hold that IoT SQL has no name for.
    Other,
}

impl Kind {
    pub(crate) fn of(field: &Field) -> Kind {
        if field.metadata().contains_key(JSON_COLUMN) {
            return Kind::Json;
        }
        Kind::of_type(field.data_type())
    }

    /// The kind of a column of this type that carries no JSON mark.
    pub(crate) fn of_type(t: &DataType) -> Kind {
        match t {
            DataType::Null => Kind::Undefined,
            DataType::Boolean => Kind::Boolean,
            t if is_int(t) => Kind::Int,
            DataType::Float16 | DataType::Float32 | DataType::Float64 => Kind::Decimal,
            t if is_text(t) => Kind::String,
            _ => Kind::Other,
        }
    }

    /// Int or Decimal.
    pub(crate) fn is_number(self) -> bool {
        matches!(self, Kind::Int | Kind::Decimal)
    }
}

pub(crate) fn is_int(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
    )
}

pub(crate) fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// A string as a Decimal, when it matches the page's pattern
/// `^-?\d+(\.\d+)?((?i)E-?\d+)?$` ("0", "-1.2", "5E-12"); anything else (" 5", "+5", ".5",
/// "NaN", "1e+5") does not convert.
pub(crate) fn parse_decimal(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A Decimal's string form. SQL version 2016-03-23 processes a whole-number Decimal as an Int
/// (iot-sql-data-types), so `10.0` is "10".
pub(crate) fn decimal_text(v: f64) -> String {
    match whole(v) {
        Some(i) => i.to_string(),
        None => serde_json::Number::from_f64(v)
            .map(|n| n.to_string())
            .unwrap_or_else(|| v.to_string()),
    }
}

/// A whole-number Decimal as the Int SQL version 2016-03-23 processes it as.
pub(crate) fn whole(v: f64) -> Option<i64> {
    // Below 2^53 every whole f64 is exactly an i64.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    (v.fract() == 0.0 && v.abs() < EXACT).then_some(v as i64)
}

/// One value's string form (the page's "To string"), as [`texts`] gives a column's: Ints in
/// standard notation (every digit, beyond 2^53 too), Decimals as [`decimal_text`], Arrays and
/// Objects as their JSON; Null has none.
pub(crate) fn value_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => n.as_f64().map_or(n.to_string(), decimal_text),
        other => other.to_string(),
    })
}

/// Each value's string form (the page's "To string"): Ints in standard notation, Decimals as
/// [`decimal_text`], Booleans as "true"/"false", Arrays and Objects as their JSON; Null and
/// Undefined have none.
pub(crate) fn texts(a: &ArrayRef, kind: Kind) -> Result<StringArray> {
    if kind == Kind::Json {
        return Ok(json_values(a)
            .map(|v| match v? {
                Value::Null => None,
                Value::String(s) => Some(s),
                Value::Number(n) => Some(n.as_f64().map_or(n.to_string(), decimal_text)),
                other => Some(other.to_string()),
            })
            .collect());
    }
    if let Some(f) = a.as_any().downcast_ref::<Float64Array>() {
        return Ok(f.iter().map(|v| v.map(decimal_text)).collect());
    }
    if a.data_type() == &DataType::Null {
        return Ok(StringArray::new_null(a.len()));
    }
    let c = cast(a, &DataType::Utf8)?;
    Ok(c.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::new_null(a.len())))
}

/// A nullable field whose values are JSON text ([`JSON_COLUMN`]).
pub(crate) fn json_field(name: impl Into<String>) -> Field {
    Field::new(name, DataType::Utf8, true).with_metadata(std::collections::HashMap::from([(
        JSON_COLUMN.to_string(),
        "true".to_string(),
    )]))
}

/// A column for a [`json_field`]: each value as its JSON text, `None` (Undefined) as null.
pub(crate) fn json_column<'a>(values: impl IntoIterator<Item = Option<&'a Value>>) -> ArrayRef {
    Arc::new(
        values
            .into_iter()
            .map(|v| v.map(Value::to_string))
            .collect::<StringArray>(),
    )
}

/// The values of a [`Kind::Json`] column: JSON null is `Some(Value::Null)`, Undefined `None`.
pub(crate) fn json_values(a: &ArrayRef) -> impl Iterator<Item = Option<Value>> + '_ {
    let s = a.as_any().downcast_ref::<StringArray>();
    (0..a.len()).map(move |i| {
        let s = s?;
        s.is_valid(i)
            .then(|| serde_json::from_str::<Value>(s.value(i)).ok())
            .flatten()
    })
}

/// A column's values as JSON, converted once per batch, for rules that compare or combine values
/// of any type (`=` on an Array, `+` on a column whose type changed within a batch). Undefined
/// is `None`.
pub(crate) fn values_of(a: &ArrayRef, kind: Kind) -> Result<Vec<Option<Value>>> {
    let n = a.len();
    Ok(match kind {
        Kind::Json => json_values(a).collect(),
        Kind::Boolean => booleans(a, kind)?
            .iter()
            .map(|v| v.map(Value::Bool))
            .collect(),
        Kind::Int => {
            let c = cast(a, &DataType::Int64)?;
            match c.as_any().downcast_ref::<Int64Array>() {
                Some(i) => i.iter().map(|v| v.map(Value::from)).collect(),
                None => vec![None; n],
            }
        }
        Kind::Decimal => decimals(a, kind)?
            .iter()
            .map(|v| v.and_then(serde_json::Number::from_f64).map(Value::Number))
            .collect(),
        Kind::String => texts(a, kind)?.iter().map(|v| v.map(Value::from)).collect(),
        Kind::Undefined | Kind::Other => vec![None; n],
    })
}

/// IoT SQL's `=` on two values: numbers by value (Int and Decimal alike), Arrays item by item
/// in order, Objects key by key in any order, values of different types unequal.
pub(crate) fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| values_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| values_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Each value as a Decimal (the page's "To decimal"): numbers as they are, strings by
/// [`parse_decimal`]; Booleans, Arrays, Objects and Undefined do not convert.
pub(crate) fn decimals(a: &ArrayRef, kind: Kind) -> Result<Float64Array> {
    match kind {
        Kind::String => {
            let s = texts(a, kind)?;
            Ok(s.iter().map(|v| v.and_then(parse_decimal)).collect())
        }
        Kind::Json => Ok(json_values(a)
            .map(|v| match v? {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => parse_decimal(&s),
                _ => None,
            })
            .collect()),
        Kind::Int | Kind::Decimal => {
            let c = cast(a, &DataType::Float64)?;
            Ok(c.as_any()
                .downcast_ref::<Float64Array>()
                .cloned()
                .unwrap_or_else(|| Float64Array::new_null(a.len())))
        }
        _ => Ok(Float64Array::new_null(a.len())),
    }
}

/// Each value as an Int where a function takes one (the functions page: "rounded down to the
/// nearest Int"; strings converted to Decimal first).
pub(crate) fn ints(a: &ArrayRef, kind: Kind) -> Result<Int64Array> {
    if kind == Kind::Int {
        let c = cast(a, &DataType::Int64)?;
        if let Some(i) = c.as_any().downcast_ref::<Int64Array>() {
            return Ok(i.clone());
        }
    }
    let d = decimals(a, kind)?;
    Ok(d.iter().map(|v| v.and_then(floor_int)).collect())
}

/// A finite Decimal rounded down, when an i64 holds it.
pub(crate) fn floor_int(v: f64) -> Option<i64> {
    let f = v.floor();
    // i64::MAX as f64 rounds up to 2^63, which is out of range.
    (f.is_finite() && f >= i64::MIN as f64 && f < i64::MAX as f64).then_some(f as i64)
}

/// Each value as a Boolean (the page's "To Boolean"): Booleans, and the strings "true" and
/// "false" in any case; anything else is Undefined.
pub(crate) fn booleans(a: &ArrayRef, kind: Kind) -> Result<BooleanArray> {
    match kind {
        Kind::Boolean => Ok(a
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .unwrap_or_else(|| BooleanArray::new_null(a.len()))),
        Kind::String => {
            let s = texts(a, kind)?;
            Ok(s.iter().map(|v| v.and_then(text_boolean)).collect())
        }
        Kind::Json => Ok(json_values(a)
            .map(|v| match v? {
                Value::Bool(b) => Some(b),
                Value::String(s) => text_boolean(&s),
                _ => None,
            })
            .collect()),
        _ => Ok(BooleanArray::new_null(a.len())),
    }
}

fn text_boolean(v: &str) -> Option<bool> {
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// What `cast(x AS <keyword>)` converts to (iot-sql-functions, cast()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CastTarget {
    String,
    Int,
    /// `Double`: a Decimal of double precision, which is every Decimal here.
    Double,
    Decimal,
    Boolean,
}

impl CastTarget {
    /// The target a keyword after `AS` names (any case), or `None`.
    pub(crate) fn parse(keyword: &str) -> Option<CastTarget> {
        Some(match keyword.to_ascii_lowercase().as_str() {
            "string" | "nvarchar" | "text" | "ntext" | "varchar" => CastTarget::String,
            "int" | "integer" => CastTarget::Int,
            "double" => CastTarget::Double,
            "decimal" => CastTarget::Decimal,
            "bool" | "boolean" => CastTarget::Boolean,
            _ => return None,
        })
    }

    /// The keywords [`CastTarget::parse`] takes, for error messages.
    pub(crate) const KEYWORDS: &'static str =
        "String, Nvarchar, Text, Ntext, varchar, Int, Integer, Double, Decimal, Bool, Boolean";

    pub(crate) fn name(self) -> &'static str {
        match self {
            CastTarget::String => "string",
            CastTarget::Int => "int",
            CastTarget::Double => "double",
            CastTarget::Decimal => "decimal",
            CastTarget::Boolean => "boolean",
        }
    }

    pub(crate) fn data_type(self) -> DataType {
        match self {
            CastTarget::String => DataType::Utf8,
            CastTarget::Int => DataType::Int64,
            CastTarget::Double | CastTarget::Decimal => DataType::Float64,
            CastTarget::Boolean => DataType::Boolean,
        }
    }
}

/// `cast(value AS target)` by the page's casting rules: like the conversions, and numbers and
/// Booleans cast into each other (true = 1, 0 = false, any other number = true); Decimal to Int
/// rounds down; Arrays and Objects cast only to String (their JSON); Undefined stays Undefined.
pub(crate) fn cast_to(a: &ArrayRef, kind: Kind, target: CastTarget) -> Result<ArrayRef> {
    let n = a.len();
    if kind == Kind::Json {
        // A column whose values have several types: cast each by its own type.
        let cells: Vec<Option<Value>> = json_values(a).collect();
        let number = |v: &Value| match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => parse_decimal(s),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        };
        return Ok(match target {
            CastTarget::String => Arc::new(texts(a, kind)?),
            CastTarget::Double | CastTarget::Decimal => Arc::new(
                cells
                    .iter()
                    .map(|v| v.as_ref().and_then(number))
                    .collect::<Float64Array>(),
            ),
            CastTarget::Int => Arc::new(
                cells
                    .iter()
                    .map(|v| v.as_ref().and_then(number).and_then(floor_int))
                    .collect::<Int64Array>(),
            ),
            CastTarget::Boolean => Arc::new(
                cells
                    .iter()
                    .map(|v| match v.as_ref()? {
                        Value::Bool(b) => Some(*b),
                        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
                        Value::String(s) => text_boolean(s),
                        _ => None,
                    })
                    .collect::<BooleanArray>(),
            ),
        });
    }
    Ok(match target {
        CastTarget::String => match kind {
            Kind::Other => Arc::new(StringArray::new_null(n)),
            _ => Arc::new(texts(a, kind)?),
        },
        CastTarget::Double | CastTarget::Decimal => match kind {
            Kind::Boolean => {
                let b = booleans(a, kind)?;
                Arc::new(
                    b.iter()
                        .map(|v| v.map(|v| f64::from(u8::from(v))))
                        .collect::<Float64Array>(),
                )
            }
            _ => Arc::new(decimals(a, kind)?),
        },
        CastTarget::Int => match kind {
            Kind::Boolean => {
                let b = booleans(a, kind)?;
                Arc::new(b.iter().map(|v| v.map(i64::from)).collect::<Int64Array>())
            }
            _ => Arc::new(ints(a, kind)?),
        },
        CastTarget::Boolean => match kind {
            Kind::Int | Kind::Decimal => {
                let d = decimals(a, kind)?;
                Arc::new(
                    d.iter()
                        .map(|v| v.map(|v| v != 0.0))
                        .collect::<BooleanArray>(),
                )
            }
            _ => Arc::new(booleans(a, kind)?),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn strings_convert_to_decimals_only_by_the_pages_pattern() {
        // iot-sql-data-types, "To decimal": the page's own examples, and what the pattern
        // leaves out.
        for (s, v) in [("0", 0.0), ("-1.2", -1.2), ("5E-12", 5e-12), ("12", 12.0)] {
            assert_eq!(parse_decimal(s), Some(v), "{s}");
        }
        for s in [
            " 5", "5 ", "+5", ".5", "5.", "NaN", "inf", "1e+5", "", "-", "1.2.3", "0x10",
        ] {
            assert_eq!(parse_decimal(s), None, "{s:?}");
        }
    }

    /// iot-sql-data-types, "To string": an Int in standard notation, so one beyond 2^53 keeps
    /// every digit; a whole Decimal is an Int in SQL version 2016-03-23.
    #[test]
    fn a_value_has_one_string_form() {
        let text = |v: Value| value_text(&v);
        assert_eq!(
            text(serde_json::json!(9007199254740993i64)).unwrap(),
            "9007199254740993"
        );
        assert_eq!(text(serde_json::json!(10.0)).unwrap(), "10");
        assert_eq!(text(serde_json::json!(2.5)).unwrap(), "2.5");
        assert_eq!(text(serde_json::json!([1, "a"])).unwrap(), "[1,\"a\"]");
        assert_eq!(text(Value::Null), None);
    }

    #[test]
    fn cast_follows_the_casting_rules() {
        let b: ArrayRef = Arc::new(BooleanArray::from(vec![Some(true), Some(false), None]));
        let i = cast_to(&b, Kind::Boolean, CastTarget::Int).unwrap();
        let i = i.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(i.iter().collect::<Vec<_>>(), vec![Some(1), Some(0), None]);
        let d: ArrayRef = Arc::new(Float64Array::from(vec![-1.5, 0.0, 2.7]));
        let i = cast_to(&d, Kind::Decimal, CastTarget::Int).unwrap();
        let i = i.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(
            i.iter().collect::<Vec<_>>(),
            vec![Some(-2), Some(0), Some(2)]
        );
        let t = cast_to(&d, Kind::Decimal, CastTarget::Boolean).unwrap();
        let t = t.as_any().downcast_ref::<BooleanArray>().unwrap();
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![Some(true), Some(false), Some(true)]
        );
        let s: ArrayRef = Arc::new(StringArray::from(vec!["12.7", "TRUE", "x"]));
        let d = cast_to(&s, Kind::String, CastTarget::Decimal).unwrap();
        let d = d.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![Some(12.7), None, None]);
        let b = cast_to(&s, Kind::String, CastTarget::Boolean).unwrap();
        let b = b.as_any().downcast_ref::<BooleanArray>().unwrap();
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![None, Some(true), None]);
    }
}
