//! The functions of AWS IoT SQL (the `iot-sql-functions` page of the IoT Core developer guide,
//! SQL version 2016-03-23), and what each one is at the edge.
//!
//! Every call in a rule is looked up here when the rule loads ([`lookup`]); nothing reaches
//! DataFusion under a name whose meaning there differs from IoT Core's:
//! - [`Function::Iot`]: IoT Core's semantics as a UDF of this module (registered as
//!   `iot_<name>` by [`register`]), where DataFusion's differs (`substring` is 0-based in IoT
//!   Core, `lpad` adds spaces, `floor` returns an Int, `trim` takes any whitespace, the math
//!   functions convert strings and give Undefined for an imaginary result…) or has
//!   none (`startswith`, `indexof`, the hashes, the bit functions…); the functions over values
//!   of any type live in `value_functions`, the time functions in `time`, and
//!   `get_mqtt_property` / `get_user_properties` are rewritten by the dialect.
//! - [`Function::Renamed`]: the same function under DataFusion's name (`rand` → `random`).
//! - [`Function::External`]: calls another AWS service, which a gateway does not do; refused.
//! - [`Function::NotYet`]: an IoT function this engine cannot compute with IoT Core's meaning
//!   yet (`get_or_default`, whose text the page this engine follows does not give); refused
//!   with the reason.
//! - [`Function::Aggregate`]: sitegate's windowed aggregates (`count`, `sum`, …, `first`,
//!   `last`) and the window specs (`TUMBLE`, `HOP`), which IoT Core does not have.
//!
//! Conversions follow the page's argument tables: a non-string argument where a String is
//! expected is its string form; a Decimal where an Int is expected is rounded down; a
//! Null (or missing) argument gives Undefined, which is left out of the output.

use std::sync::Arc;

use base64::Engine as _;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;
use md5::Digest as _;

use crate::values::{self, is_int, CastTarget, Kind};

/// What a function name is at the edge (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Iot,
    Renamed(&'static str),
    External(&'static str),
    NotYet(&'static str),
    Aggregate,
}

/// What `name` (any case) is, or `None` when it is no AWS IoT SQL function.
pub fn lookup(name: &str) -> Option<Function> {
    use Function::*;
    let lower = name.to_ascii_lowercase();
    if UDFS.iter().any(|u| u.name == lower)
        || crate::value_functions::NAMES.contains(&lower.as_str())
    {
        return Some(Iot);
    }
    Some(match lower.as_str() {
        "concat" => Iot,
        "rand" => Renamed("random"),
        "aws_lambda" => External("AWS Lambda"),
        "get_dynamodb" => External("Amazon DynamoDB"),
        "get_secret" => External("AWS Secrets Manager"),
        "get_thing_shadow" => External("the IoT Core device shadow service"),
        "get_registry_data" => External("the IoT Core registry"),
        "machinelearning_predict" => External("Amazon Machine Learning"),
        "cast" => Iot,
        "get_or_default" => NotYet(
            "the functions page lists it without its semantics (does Null take the default?), \
             so it is refused rather than guessed; use nanvl() or CASE WHEN isUndefined(x)",
        ),
        // Rewritten by the dialect before this lookup (the message's MQTT 5 properties).
        "get_mqtt_property" | "get_user_properties" => Iot,
        "count" | "sum" | "avg" | "min" | "max" | "first" | "last" | "tumble" | "hop" => Aggregate,
        _ => return None,
    })
}

/// Registers the [`Function::Iot`] UDFs and the operators on `ctx`.
pub fn register(ctx: &SessionContext) {
    for u in UDFS.iter() {
        ctx.register_udf(ScalarUDF::from(u.clone()));
    }
    ctx.register_udf(ScalarUDF::from(CastUdf::new()));
    ctx.register_udf(ScalarUDF::from(ConcatUdf::new()));
    crate::value_functions::register(ctx);
    crate::operators::register(ctx);
}

/// The UDF `cast(x AS type)` is lowered to: `iot_cast(x, 'type')`, the type one of
/// [`CastTarget`]'s names, checked when the rule loads.
pub const CAST_UDF: &str = "iot_cast";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CastUdf {
    signature: Signature,
}

impl CastUdf {
    fn new() -> Self {
        CastUdf {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

fn cast_target(v: Option<&ScalarValue>) -> Result<CastTarget> {
    match v {
        Some(ScalarValue::Utf8(Some(t))) => match CastTarget::parse(t) {
            Some(t) => Ok(t),
            None => exec_err!("cast to {t}: not an IoT SQL type"),
        },
        _ => exec_err!("cast takes a type keyword after AS"),
    }
}

impl ScalarUDFImpl for CastUdf {
    fn name(&self) -> &str {
        CAST_UDF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        // The type is the second argument's value; return_field_from_args reads it.
        Ok(DataType::Utf8)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let target = cast_target(args.scalar_arguments.get(1).copied().flatten())?;
        Ok(Arc::new(Field::new(CAST_UDF, target.data_type(), true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [value, ColumnarValue::Scalar(target)] = args.args.as_slice() else {
            return exec_err!("cast takes a value and a type keyword");
        };
        let target = cast_target(Some(target))?;
        let kind = args
            .arg_fields
            .first()
            .map_or(Kind::Undefined, |f| Kind::of(f));
        let scalar = matches!(value, ColumnarValue::Scalar(_));
        let array = match value {
            ColumnarValue::Array(a) => Arc::clone(a),
            ColumnarValue::Scalar(s) => s.to_array_of_size(1)?,
        };
        let out = values::cast_to(&array, kind, target)?;
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

/// `concat(…)` (iot-sql-functions): no argument is Undefined; one is returned unmodified; with
/// an Array among them, one Array of every argument (Arrays' items spliced in); otherwise the
/// concatenation of their string forms. The page's example `concat(1) = "1"` disagrees with its
/// table ("the argument is returned unmodified"); the table is followed. An Undefined argument
/// makes the result Undefined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConcatUdf {
    signature: Signature,
}

impl ConcatUdf {
    fn new() -> Self {
        ConcatUdf {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ConcatUdf {
    fn name(&self) -> &str {
        "iot_concat"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(match arg_types {
            [] => DataType::Float64,
            [one] => one.clone(),
            _ => DataType::Utf8,
        })
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(match args.arg_fields {
            [] => Arc::new(Field::new(self.name(), DataType::Float64, true)),
            [one] => Arc::new(one.as_ref().clone().with_name(self.name())),
            many if many.iter().any(|f| Kind::of(f) == Kind::Json) => {
                Arc::new(values::json_field(self.name()))
            }
            _ => Arc::new(Field::new(self.name(), DataType::Utf8, true)),
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        match args.args.as_slice() {
            [] => return Ok(ColumnarValue::Array(Arc::new(Float64Array::new_null(n)))),
            [one] => return Ok(one.clone()),
            _ => {}
        }
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let kinds: Vec<Kind> = args.arg_fields.iter().map(|f| Kind::of(f)).collect();
        let row = |a: &ArrayRef, i: usize| if a.len() == 1 { 0 } else { i };
        if kinds.contains(&Kind::Json) {
            let columns = arrays
                .iter()
                .zip(&kinds)
                .map(|(a, k)| values::values_of(a, *k))
                .collect::<Result<Vec<_>>>()?;
            let out: StringArray = (0..n)
                .map(|i| {
                    let vals = columns
                        .iter()
                        .zip(&arrays)
                        .map(|(c, a)| c[row(a, i)].clone())
                        .collect::<Option<Vec<_>>>()?;
                    let joined = if vals.iter().any(serde_json::Value::is_array) {
                        let mut items = Vec::new();
                        for v in vals {
                            match v {
                                serde_json::Value::Array(a) => items.extend(a),
                                other => items.push(other),
                            }
                        }
                        serde_json::Value::Array(items)
                    } else {
                        let mut text = String::new();
                        for v in &vals {
                            match v {
                                serde_json::Value::String(s) => text.push_str(s),
                                serde_json::Value::Number(x) => text.push_str(
                                    &x.as_f64().map_or(x.to_string(), values::decimal_text),
                                ),
                                serde_json::Value::Null => return None,
                                other => text.push_str(&other.to_string()),
                            }
                        }
                        serde_json::Value::String(text)
                    };
                    Some(joined.to_string())
                })
                .collect();
            return Ok(ColumnarValue::Array(Arc::new(out)));
        }
        let texts = arrays
            .iter()
            .zip(&kinds)
            .map(|(a, k)| values::texts(a, *k))
            .collect::<Result<Vec<_>>>()?;
        let out: StringArray = (0..n)
            .map(|i| {
                let mut text = String::new();
                for (t, a) in texts.iter().zip(&arrays) {
                    let r = row(a, i);
                    if t.is_null(r) {
                        return None;
                    }
                    text.push_str(t.value(r));
                }
                Some(text)
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

// The conversions of `values`, with a column's kind read off its Arrow type: a function here
// takes an Array or Object argument as its JSON text.
fn texts(a: &ArrayRef) -> Result<StringArray> {
    values::texts(a, Kind::of_type(a.data_type()))
}

fn decimals(a: &ArrayRef) -> Result<Float64Array> {
    values::decimals(a, Kind::of_type(a.data_type()))
}

fn ints(a: &ArrayRef) -> Result<Int64Array> {
    values::ints(a, Kind::of_type(a.data_type()))
}

/// The name a [`Function::Iot`] function is registered under.
pub fn udf_name(name: &str) -> String {
    format!("iot_{}", name.to_ascii_lowercase())
}

/// How a UDF's result type follows its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Returns {
    Text,
    Int,
    Bool,
    Decimal,
    /// Int when every argument is an Int, else Decimal (`mod`, `remainder`).
    IntIfInts,
}

type Eval = fn(&[ArrayRef]) -> Result<ArrayRef>;

/// One IoT function as a DataFusion UDF; its name identifies it.
#[derive(Debug, Clone)]
struct IotUdf {
    name: &'static str,
    registered: String,
    arities: &'static [usize],
    returns: Returns,
    eval: Eval,
    signature: Signature,
}

impl PartialEq for IotUdf {
    fn eq(&self, other: &Self) -> bool {
        self.registered == other.registered
    }
}

impl Eq for IotUdf {}

impl std::hash::Hash for IotUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.registered.hash(state);
    }
}

impl IotUdf {
    fn new(name: &'static str, arities: &'static [usize], returns: Returns, eval: Eval) -> Self {
        let signature = Signature::one_of(
            arities
                .iter()
                .map(|&n| datafusion::logical_expr::TypeSignature::Any(n))
                .collect(),
            Volatility::Immutable,
        );
        IotUdf {
            name,
            registered: udf_name(name),
            arities,
            returns,
            eval,
            signature,
        }
    }
}

impl ScalarUDFImpl for IotUdf {
    fn name(&self) -> &str {
        &self.registered
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.returns {
            Returns::Text => DataType::Utf8,
            Returns::Int => DataType::Int64,
            Returns::Bool => DataType::Boolean,
            Returns::Decimal => DataType::Float64,
            Returns::IntIfInts if arg_types.iter().all(is_int) => DataType::Int64,
            Returns::IntIfInts => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if !self.arities.contains(&args.args.len()) {
            return exec_err!("{} takes {:?} arguments", self.name, self.arities);
        }
        let mut arrays = ColumnarValue::values_to_arrays(&args.args)?;
        // A column holding JSON values (several types in one batch, Arrays, Objects) reaches
        // the function as each value's string form, which every argument table starts from.
        for (a, f) in arrays.iter_mut().zip(&args.arg_fields) {
            if Kind::of(f) == Kind::Json {
                *a = Arc::new(values::texts(a, Kind::Json)?);
            }
        }
        let out = (self.eval)(&arrays)?;
        let want = args.return_field.data_type();
        if out.data_type() == want {
            Ok(ColumnarValue::Array(out))
        } else {
            Ok(ColumnarValue::Array(cast(&out, want)?))
        }
    }
}

static UDFS: std::sync::LazyLock<Vec<IotUdf>> = std::sync::LazyLock::new(|| {
    use Returns::*;
    vec![
        IotUdf::new("substring", &[2, 3], Text, substring),
        IotUdf::new("lpad", &[2], Text, |a| pad(a, true)),
        IotUdf::new("rpad", &[2], Text, |a| pad(a, false)),
        IotUdf::new("trim", &[1], Text, |a| map_text(a, |s| s.trim().to_owned())),
        IotUdf::new("ltrim", &[1], Text, |a| {
            map_text(a, |s| s.trim_start().to_owned())
        }),
        IotUdf::new("rtrim", &[1], Text, |a| {
            map_text(a, |s| s.trim_end().to_owned())
        }),
        IotUdf::new("startswith", &[2], Bool, |a| {
            two_texts_bool(a, |s, p| s.starts_with(p))
        }),
        IotUdf::new("endswith", &[2], Bool, |a| {
            two_texts_bool(a, |s, p| s.ends_with(p))
        }),
        IotUdf::new("indexof", &[2], Int, indexof),
        IotUdf::new("lower", &[1], Text, |a| map_text(a, str::to_lowercase)),
        IotUdf::new("upper", &[1], Text, |a| map_text(a, str::to_uppercase)),
        IotUdf::new("length", &[1], Int, |a| {
            let s = texts(&a[0])?;
            Ok(Arc::new(
                s.iter()
                    .map(|v| v.map(|v| v.chars().count() as i64))
                    .collect::<Int64Array>(),
            ))
        }),
        IotUdf::new("numbytes", &[1], Int, |a| {
            let s = texts(&a[0])?;
            Ok(Arc::new(
                s.iter()
                    .map(|v| v.map(|v| v.len() as i64))
                    .collect::<Int64Array>(),
            ))
        }),
        IotUdf::new("chr", &[1], Text, chr),
        IotUdf::new("md5", &[1], Text, |a| {
            map_text(a, |s| hex::encode(md5::Md5::digest(s.as_bytes())))
        }),
        IotUdf::new("sha1", &[1], Text, |a| {
            map_text(a, |s| {
                hex::encode(ring::digest::digest(
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    s.as_bytes(),
                ))
            })
        }),
        IotUdf::new("sha224", &[1], Text, |a| {
            map_text(a, |s| hex::encode(sha2::Sha224::digest(s.as_bytes())))
        }),
        IotUdf::new("sha256", &[1], Text, |a| {
            map_text(a, |s| hex::encode(sha2::Sha256::digest(s.as_bytes())))
        }),
        IotUdf::new("sha384", &[1], Text, |a| {
            map_text(a, |s| hex::encode(sha2::Sha384::digest(s.as_bytes())))
        }),
        IotUdf::new("sha512", &[1], Text, |a| {
            map_text(a, |s| hex::encode(sha2::Sha512::digest(s.as_bytes())))
        }),
        IotUdf::new("encode", &[2], Text, encode),
        IotUdf::new("mod", &[2], IntIfInts, remainder),
        IotUdf::new("remainder", &[2], IntIfInts, remainder),
        IotUdf::new("trunc", &[2], IntIfInts, trunc),
        IotUdf::new("parse_time", &[2, 3], Text, crate::time::parse_time),
        IotUdf::new("time_to_epoch", &[2], Int, crate::time::time_to_epoch),
        IotUdf::new("sign", &[1], Int, |a| {
            map_decimal_to_int(a, |x| {
                if x > 0.0 {
                    1
                } else if x < 0.0 {
                    -1
                } else {
                    0
                }
            })
        }),
        IotUdf::new("floor", &[1], Int, |a| {
            map_decimal_to_int(a, |x| x.floor() as i64)
        }),
        IotUdf::new("ceil", &[1], Int, |a| {
            map_decimal_to_int(a, |x| x.ceil() as i64)
        }),
        IotUdf::new("round", &[1], Int, |a| {
            map_decimal_to_int(a, |x| (x + 0.5).floor() as i64)
        }),
        IotUdf::new("abs", &[1], IntIfInts, |a| {
            if is_int(a[0].data_type()) {
                let i = ints(&a[0])?;
                return Ok(Arc::new(
                    i.iter()
                        .map(|v| v.and_then(i64::checked_abs))
                        .collect::<Int64Array>(),
                ));
            }
            map_decimal(a, f64::abs)
        }),
        IotUdf::new("acos", &[1], Decimal, |a| map_decimal(a, f64::acos)),
        IotUdf::new("asin", &[1], Decimal, |a| map_decimal(a, f64::asin)),
        IotUdf::new("atan", &[1], Decimal, |a| map_decimal(a, f64::atan)),
        IotUdf::new("atan2", &[2], Decimal, |a| {
            let (y, x) = (decimals(&a[0])?, decimals(&a[1])?);
            Ok(Arc::new(
                y.iter()
                    .zip(x.iter())
                    .map(|(y, x)| Some(y?.atan2(x?)).filter(|v| v.is_finite()))
                    .collect::<Float64Array>(),
            ))
        }),
        IotUdf::new("cos", &[1], Decimal, |a| map_decimal(a, f64::cos)),
        IotUdf::new("cosh", &[1], Decimal, |a| map_decimal(a, f64::cosh)),
        IotUdf::new("exp", &[1], Decimal, |a| map_decimal(a, f64::exp)),
        IotUdf::new("ln", &[1], Decimal, |a| map_decimal(a, f64::ln)),
        IotUdf::new("log", &[1], Decimal, |a| map_decimal(a, f64::log10)),
        IotUdf::new("sin", &[1], Decimal, |a| map_decimal(a, f64::sin)),
        IotUdf::new("sinh", &[1], Decimal, |a| map_decimal(a, f64::sinh)),
        IotUdf::new("sqrt", &[1], Decimal, |a| map_decimal(a, f64::sqrt)),
        IotUdf::new("tan", &[1], Decimal, |a| map_decimal(a, f64::tan)),
        IotUdf::new("tanh", &[1], Decimal, |a| map_decimal(a, f64::tanh)),
        IotUdf::new("power", &[2], Decimal, |a| {
            let (x, y) = (decimals(&a[0])?, decimals(&a[1])?);
            Ok(Arc::new(
                x.iter()
                    .zip(y.iter())
                    .map(|(x, y)| Some(x?.powf(y?)))
                    .collect::<Float64Array>(),
            ))
        }),
        IotUdf::new("bitand", &[2], Int, |a| bits(a, |x, y| x & y)),
        IotUdf::new("bitor", &[2], Int, |a| bits(a, |x, y| x | y)),
        IotUdf::new("bitxor", &[2], Int, |a| bits(a, |x, y| x ^ y)),
        IotUdf::new("bitnot", &[1], Int, |a| {
            let x = ints(&a[0])?;
            Ok(Arc::new(
                x.iter().map(|x| x.map(|x| !x)).collect::<Int64Array>(),
            ))
        }),
        IotUdf::new("regexp_matches", &[2], Bool, |a| {
            regexp(a, |re, s, _| Some(RegexpOut::Bool(re.is_match(s))))
        }),
        IotUdf::new("regexp_substr", &[2], Text, |a| {
            regexp(a, |re, s, _| {
                Some(RegexpOut::Text(
                    re.find(s)
                        .map(|m| m.as_str().to_owned())
                        .unwrap_or_default(),
                ))
            })
        }),
        IotUdf::new("replace", &[3], Text, |a| {
            let (s, from, to) = (texts(&a[0])?, texts(&a[1])?, texts(&a[2])?);
            Ok(Arc::new(
                (0..s.len())
                    .map(|i| {
                        fn at(t: &StringArray, i: usize) -> Option<&str> {
                            t.is_valid(i).then(|| t.value(i))
                        }
                        Some(at(&s, i)?.replace(at(&from, i)?, at(&to, i)?))
                    })
                    .collect::<StringArray>(),
            ))
        }),
        IotUdf::new("regexp_replace", &[3], Text, |a| {
            regexp(a, |re, s, rep| {
                Some(RegexpOut::Text(re.replace_all(s, rep?).into_owned()))
            })
        }),
    ]
});

fn map_text(a: &[ArrayRef], f: impl Fn(&str) -> String) -> Result<ArrayRef> {
    let s = texts(&a[0])?;
    Ok(Arc::new(
        s.iter().map(|v| v.map(&f)).collect::<StringArray>(),
    ))
}

fn two_texts_bool(a: &[ArrayRef], f: impl Fn(&str, &str) -> bool) -> Result<ArrayRef> {
    let (s, p) = (texts(&a[0])?, texts(&a[1])?);
    Ok(Arc::new(
        s.iter()
            .zip(p.iter())
            .map(|(s, p)| Some(f(s?, p?)))
            .collect::<BooleanArray>(),
    ))
}

/// A Decimal function: strings converted, and an imaginary or infinite result (NaN, ±inf)
/// Undefined.
fn map_decimal(a: &[ArrayRef], f: impl Fn(f64) -> f64) -> Result<ArrayRef> {
    let d = decimals(&a[0])?;
    Ok(Arc::new(
        d.iter()
            .map(|v| v.map(&f).filter(|v| v.is_finite()))
            .collect::<Float64Array>(),
    ))
}

fn map_decimal_to_int(a: &[ArrayRef], f: impl Fn(f64) -> i64) -> Result<ArrayRef> {
    if is_int(a[0].data_type()) {
        let i = ints(&a[0])?;
        return Ok(Arc::new(
            i.iter()
                .map(|v| v.map(|v| f(v as f64)))
                .collect::<Int64Array>(),
        ));
    }
    let d = decimals(&a[0])?;
    Ok(Arc::new(
        d.iter()
            .map(|v| v.filter(|v| v.is_finite()).map(&f))
            .collect::<Int64Array>(),
    ))
}

/// `substring(String, Int[, Int])`: from the first index (0-based, inclusive) to the second
/// (exclusive) or the end; indices clamped to the string; an empty string when the range is
/// empty.
fn substring(a: &[ArrayRef]) -> Result<ArrayRef> {
    let s = texts(&a[0])?;
    let from = ints(&a[1])?;
    let to = match a.get(2) {
        Some(t) => Some(ints(t)?),
        None => None,
    };
    let out: StringArray = (0..s.len())
        .map(|i| {
            if s.is_null(i) || from.is_null(i) || to.as_ref().is_some_and(|t| t.is_null(i)) {
                return None;
            }
            let chars: Vec<char> = s.value(i).chars().collect();
            let n = chars.len() as i64;
            let start = from.value(i).clamp(0, n) as usize;
            let end = to.as_ref().map_or(n, |t| t.value(i).clamp(0, n)) as usize;
            Some(if start >= end {
                String::new()
            } else {
                chars[start..end].iter().collect()
            })
        })
        .collect();
    Ok(Arc::new(out))
}

/// Most spaces `lpad`/`rpad` add (the page clamps the count to 0…1000).
const MAX_PAD: i64 = 1000;

fn pad(a: &[ArrayRef], left: bool) -> Result<ArrayRef> {
    let s = texts(&a[0])?;
    let n = ints(&a[1])?;
    let out: StringArray = s
        .iter()
        .zip(n.iter())
        .map(|(s, n)| {
            let spaces = " ".repeat(n?.clamp(0, MAX_PAD) as usize);
            Some(if left {
                spaces + s?
            } else {
                format!("{}{spaces}", s?)
            })
        })
        .collect();
    Ok(Arc::new(out))
}

fn indexof(a: &[ArrayRef]) -> Result<ArrayRef> {
    let (s, p) = (texts(&a[0])?, texts(&a[1])?);
    Ok(Arc::new(
        s.iter()
            .zip(p.iter())
            .map(|(s, p)| {
                let (s, p) = (s?, p?);
                Some(match s.find(p) {
                    Some(byte) => s[..byte].chars().count() as i64,
                    None => -1,
                })
            })
            .collect::<Int64Array>(),
    ))
}

/// `chr(Int)`: the ASCII character of the code; Undefined outside ASCII.
fn chr(a: &[ArrayRef]) -> Result<ArrayRef> {
    let n = ints(&a[0])?;
    Ok(Arc::new(
        n.iter()
            .map(|n| {
                let c = u8::try_from(n?).ok().filter(u8::is_ascii)?;
                Some(char::from(c).to_string())
            })
            .collect::<StringArray>(),
    ))
}

/// `encode(value, 'base64')`: the value's string form, UTF-8, in padded base64 (for `*`, the
/// payload's bytes as they came); base64 is the only scheme, any other is Undefined.
fn encode(a: &[ArrayRef]) -> Result<ArrayRef> {
    let scheme = texts(&a[1])?;
    let base64 = |i: usize| scheme.is_valid(i) && scheme.value(i).eq_ignore_ascii_case("base64");
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    // `encode(*, 'base64')`: the payload's bytes as they came, JSON or not (binary-payloads).
    if let Some(bytes) = a[0]
        .as_any()
        .downcast_ref::<datafusion::arrow::array::BinaryArray>()
    {
        return Ok(Arc::new(
            (0..bytes.len())
                .map(|i| (base64(i) && bytes.is_valid(i)).then(|| encode(bytes.value(i))))
                .collect::<StringArray>(),
        ));
    }
    let s = texts(&a[0])?;
    Ok(Arc::new(
        (0..s.len())
            .map(|i| (base64(i) && s.is_valid(i)).then(|| encode(s.value(i).as_bytes())))
            .collect::<StringArray>(),
    ))
}

/// `mod` and `remainder`: the remainder of the first by the second, with the dividend's sign;
/// Int for two Ints, else Decimal; Undefined for a zero divisor.
fn remainder(a: &[ArrayRef]) -> Result<ArrayRef> {
    if is_int(a[0].data_type()) && is_int(a[1].data_type()) {
        let (x, y) = (ints(&a[0])?, ints(&a[1])?);
        return Ok(Arc::new(
            x.iter()
                .zip(y.iter())
                .map(|(x, y)| x?.checked_rem(y?))
                .collect::<Int64Array>(),
        ));
    }
    let (x, y) = (decimals(&a[0])?, decimals(&a[1])?);
    Ok(Arc::new(
        x.iter()
            .zip(y.iter())
            .map(|(x, y)| {
                Some((x?, y?))
                    .filter(|(_, y)| *y != 0.0)
                    .map(|(x, y)| x % y)
            })
            .collect::<Float64Array>(),
    ))
}

/// `trunc(x, places)`: `x` cut (not rounded) to `places` decimal places, `places` rounded down
/// and held to 0..=34; an Int `x` is returned as it is. A String `x` converts to a Decimal; a
/// `places` that is not a number gives Undefined (the page's table).
fn trunc(a: &[ArrayRef]) -> Result<ArrayRef> {
    if !matches!(Kind::of_type(a[1].data_type()), Kind::Int | Kind::Decimal) {
        return Ok(Arc::new(Float64Array::new_null(a[0].len())));
    }
    let places = ints(&a[1])?;
    if is_int(a[0].data_type()) {
        let x = ints(&a[0])?;
        return Ok(Arc::new(
            x.iter()
                .zip(places.iter())
                .map(|(x, p)| p.and(x))
                .collect::<Int64Array>(),
        ));
    }
    let x = decimals(&a[0])?;
    Ok(Arc::new(
        x.iter()
            .zip(places.iter())
            .map(|(x, p)| truncate_places(x?, p?.clamp(0, 34) as usize))
            .collect::<Float64Array>(),
    ))
}

/// `v` with its decimal digits after the `places`-th dropped, by its shortest decimal form (so
/// 2.31 stays 2.31, which multiplying by 100 in binary would not).
fn truncate_places(v: f64, places: usize) -> Option<f64> {
    if !v.is_finite() {
        return None;
    }
    // Rust prints an f64 in plain notation, never with an exponent.
    let text = v.to_string();
    let cut = match text.find('.') {
        Some(dot) if text.len() > dot + 1 + places => &text[..dot + 1 + places],
        _ => &text,
    };
    cut.trim_end_matches('.').parse().ok()
}

fn bits(a: &[ArrayRef], f: impl Fn(i64, i64) -> i64) -> Result<ArrayRef> {
    let (x, y) = (ints(&a[0])?, ints(&a[1])?);
    Ok(Arc::new(
        x.iter()
            .zip(y.iter())
            .map(|(x, y)| Some(f(x?, y?)))
            .collect::<Int64Array>(),
    ))
}

enum RegexpOut {
    Bool(bool),
    Text(String),
}

/// The regexp functions: the pattern (second argument) compiled once per distinct value in a
/// batch; one that does not compile gives Undefined.
fn regexp(
    a: &[ArrayRef],
    f: impl Fn(&regex::Regex, &str, Option<&str>) -> Option<RegexpOut>,
) -> Result<ArrayRef> {
    let s = texts(&a[0])?;
    let p = texts(&a[1])?;
    let r = match a.get(2) {
        Some(r) => Some(texts(r)?),
        None => None,
    };
    let mut compiled: Option<(String, Option<regex::Regex>)> = None;
    let mut bools = Vec::with_capacity(s.len());
    let mut strings = Vec::with_capacity(s.len());
    let mut as_bool = false;
    for i in 0..s.len() {
        let out = (|| {
            let (subject, pattern) = (
                s.is_valid(i).then(|| s.value(i))?,
                p.is_valid(i).then(|| p.value(i))?,
            );
            if compiled.as_ref().is_none_or(|(text, _)| text != pattern) {
                compiled = Some((pattern.to_owned(), regex::Regex::new(pattern).ok()));
            }
            let re = compiled.as_ref()?.1.as_ref()?;
            let rep = r.as_ref().and_then(|r| r.is_valid(i).then(|| r.value(i)));
            f(re, subject, rep)
        })();
        match out {
            Some(RegexpOut::Bool(b)) => {
                as_bool = true;
                bools.push(Some(b));
                strings.push(None);
            }
            Some(RegexpOut::Text(t)) => {
                bools.push(None);
                strings.push(Some(t));
            }
            None => {
                bools.push(None);
                strings.push(None);
            }
        }
    }
    if as_bool {
        Ok(Arc::new(BooleanArray::from(bools)))
    } else {
        Ok(Arc::new(StringArray::from(strings)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_function_of_the_reference_is_classified() {
        // The function list of iot-sql-functions (SQL version 2016-03-23).
        for name in [
            "abs",
            "accountid",
            "acos",
            "asin",
            "atan",
            "atan2",
            "aws_lambda",
            "bitand",
            "bitor",
            "bitxor",
            "bitnot",
            "cast",
            "ceil",
            "chr",
            "clientid",
            "concat",
            "cos",
            "cosh",
            "decode",
            "encode",
            "endswith",
            "exp",
            "floor",
            "get",
            "get_dynamodb",
            "get_mqtt_property",
            "get_or_default",
            "get_registry_data",
            "get_secret",
            "get_thing_shadow",
            "get_user_properties",
            "md5",
            "sha1",
            "sha224",
            "sha256",
            "sha384",
            "sha512",
            "indexof",
            "isNull",
            "isUndefined",
            "length",
            "ln",
            "log",
            "lower",
            "lpad",
            "ltrim",
            "machinelearning_predict",
            "mod",
            "nanvl",
            "numbytes",
            "parse_time",
            "power",
            "rand",
            "regexp_matches",
            "regexp_replace",
            "regexp_substr",
            "remainder",
            "replace",
            "rpad",
            "round",
            "rtrim",
            "sign",
            "sin",
            "sinh",
            "substring",
            "sqrt",
            "startswith",
            "tan",
            "tanh",
            "time_to_epoch",
            "transform",
            "trunc",
            "trim",
            "upper",
            "sourceip",
            "sql_version",
            "traceid",
        ] {
            let metadata = crate::dialect::METADATA_FUNCTIONS.contains(&name);
            assert!(metadata || lookup(name).is_some(), "{name}");
        }
        assert_eq!(lookup("date_trunc"), None);
        assert_eq!(lookup("SUBSTRING"), Some(Function::Iot));
    }
}
