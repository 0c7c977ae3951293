//! The functions of AWS IoT SQL (the `iot-sql-functions` page of the IoT Core developer guide,
//! SQL version 2016-03-23), and what each one is at the edge.
//!
//! Every call in a rule is looked up here when the rule loads ([`lookup`]); nothing reaches
//! DataFusion under a name whose meaning there differs from IoT Core's:
//! - [`Function::Same`]: DataFusion's function of that name gives IoT Core's result for the
//!   values a payload field can hold here (strings, numbers, booleans).
//! - [`Function::Iot`]: IoT Core's semantics as a UDF of this module (registered as
//!   `iot_<name>` by [`register`]), where DataFusion's differs (`substring` is 0-based in IoT
//!   Core, `lpad` adds spaces, `floor` returns an Int, `trim` takes any whitespace…) or has
//!   none (`startswith`, `indexof`, the hashes, the bit functions…).
//! - [`Function::Renamed`]: the same function under DataFusion's name (`rand` → `random`).
//! - [`Function::External`]: calls another AWS service, which a gateway does not do; refused.
//! - [`Function::NotYet`]: an IoT function this engine cannot compute with IoT Core's meaning
//!   yet (those needing objects, Undefined apart from Null, MQTT 5 properties, IoT's casts);
//!   refused with the reason.
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
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use md5::Digest as _;

/// What a function name is at the edge (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Same,
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
    if UDFS.iter().any(|u| u.name == lower) {
        return Some(Iot);
    }
    Some(match lower.as_str() {
        "abs" | "acos" | "asin" | "atan" | "atan2" | "cos" | "cosh" | "exp" | "ln" | "log"
        | "sin" | "sinh" | "sqrt" | "tan" | "tanh" | "lower" | "upper" | "length" | "concat"
        | "replace" => Same,
        "rand" => Renamed("random"),
        "aws_lambda" => External("AWS Lambda"),
        "get_dynamodb" => External("Amazon DynamoDB"),
        "get_secret" => External("AWS Secrets Manager"),
        "get_thing_shadow" => External("the IoT Core device shadow service"),
        "get_registry_data" => External("the IoT Core registry"),
        "machinelearning_predict" => External("Amazon Machine Learning"),
        "cast" => NotYet(
            "IoT Core's conversions (to Decimal, Int from \"12.7\", Boolean rules) are not SQL's",
        ),
        "get" | "get_or_default" | "transform" => NotYet("it needs objects and arrays as values"),
        "isnull" | "isundefined" => NotYet("it needs Null and Undefined kept apart"),
        "decode" => NotYet("it returns an object when the decoded text is JSON"),
        "nanvl" => NotYet("it takes values of any type"),
        "parse_time" | "time_to_epoch" => NotYet("it needs Joda-Time patterns"),
        "get_mqtt_property" | "get_user_properties" => {
            NotYet("it needs the MQTT 5 properties of each message")
        }
        "accountid" | "sourceip" | "traceid" | "sql_version" => {
            NotYet("this value is not known at the edge")
        }
        "count" | "sum" | "avg" | "min" | "max" | "first" | "last" | "tumble" | "hop" => Aggregate,
        _ => return None,
    })
}

/// Registers the [`Function::Iot`] UDFs and the operators on `ctx`.
pub fn register(ctx: &SessionContext) {
    for u in UDFS.iter() {
        ctx.register_udf(ScalarUDF::from(u.clone()));
    }
    for op in Operator::ALL {
        ctx.register_udf(ScalarUDF::from(OperatorUdf::new(op)));
    }
}

/// The operators of `iot-sql-operators` that the dialect lowers to these UDFs (`a > b`
/// becomes `iot_op_gt(a, b)`):
/// - `>`, `<`, `>=`, `<=` convert both operands to Decimal and compare the numbers (`'2' <
///   '10'` is true), Undefined when one does not convert;
/// - `=` and `<>` compare operands of the same type (Int and Decimal are both numbers) and
///   find operands of different types unequal (`5 = '5'` is false);
/// - `AND`, `OR`, `NOT` take Booleans and the strings "true"/"false" (any case); any other
///   operand, Undefined included, gives Undefined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    Gt,
    Lt,
    GtEq,
    LtEq,
    Eq,
    NotEq,
    And,
    Or,
    Not,
}

impl Operator {
    pub const ALL: [Operator; 9] = [
        Operator::Gt,
        Operator::Lt,
        Operator::GtEq,
        Operator::LtEq,
        Operator::Eq,
        Operator::NotEq,
        Operator::And,
        Operator::Or,
        Operator::Not,
    ];

    /// The UDF an operator is lowered to.
    pub fn udf_name(self) -> &'static str {
        match self {
            Operator::Gt => "iot_op_gt",
            Operator::Lt => "iot_op_lt",
            Operator::GtEq => "iot_op_gte",
            Operator::LtEq => "iot_op_lte",
            Operator::Eq => "iot_op_eq",
            Operator::NotEq => "iot_op_neq",
            Operator::And => "iot_op_and",
            Operator::Or => "iot_op_or",
            Operator::Not => "iot_op_not",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OperatorUdf {
    op: Operator,
    signature: Signature,
}

impl OperatorUdf {
    fn new(op: Operator) -> Self {
        let arity = if op == Operator::Not { 1 } else { 2 };
        OperatorUdf {
            op,
            signature: Signature::any(arity, Volatility::Immutable),
        }
    }
}

/// An operand as Arrow's comparison kernels take it: a column, or a scalar as one.
enum Operand {
    Array(ArrayRef),
    Scalar(ArrayRef),
}

impl Operand {
    fn of(v: &ColumnarValue) -> Result<Operand> {
        Ok(match v {
            ColumnarValue::Array(a) => Operand::Array(Arc::clone(a)),
            ColumnarValue::Scalar(s) => Operand::Scalar(s.to_array_of_size(1)?),
        })
    }

    fn array(&self) -> &ArrayRef {
        match self {
            Operand::Array(a) | Operand::Scalar(a) => a,
        }
    }

    fn map(&self, f: impl Fn(&ArrayRef) -> Result<ArrayRef>) -> Result<Operand> {
        Ok(match self {
            Operand::Array(a) => Operand::Array(f(a)?),
            Operand::Scalar(a) => Operand::Scalar(f(a)?),
        })
    }

    fn compare(
        &self,
        other: &Operand,
        kernel: fn(
            &dyn datafusion::arrow::array::Datum,
            &dyn datafusion::arrow::array::Datum,
        )
            -> std::result::Result<BooleanArray, datafusion::arrow::error::ArrowError>,
    ) -> Result<BooleanArray> {
        use datafusion::arrow::array::Scalar;
        let out = match (self, other) {
            (Operand::Array(a), Operand::Array(b)) => kernel(a, b),
            (Operand::Array(a), Operand::Scalar(b)) => kernel(a, &Scalar::new(Arc::clone(b))),
            (Operand::Scalar(a), Operand::Array(b)) => kernel(&Scalar::new(Arc::clone(a)), b),
            (Operand::Scalar(a), Operand::Scalar(b)) => kernel(a, b),
        };
        Ok(out?)
    }
}

/// Row `i` of an operand of `len` rows: a scalar operand is one row for every row.
fn row(len: usize, i: usize) -> usize {
    if len == 1 {
        0
    } else {
        i
    }
}

/// Each value as a Boolean for `AND`, `OR`, `NOT`: Booleans, and the strings "true" and
/// "false" in any case; anything else is Null (Undefined).
fn booleans(a: &ArrayRef) -> Result<BooleanArray> {
    match a.data_type() {
        DataType::Boolean => Ok(a
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .unwrap_or_else(|| BooleanArray::new_null(a.len()))),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = texts(a)?;
            Ok(s.iter()
                .map(|v| match v {
                    Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
                    Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
                    _ => None,
                })
                .collect())
        }
        _ => Ok(BooleanArray::new_null(a.len())),
    }
}

/// The IoT type family of an Arrow type, for `=`.
fn family(t: &DataType) -> u8 {
    match t {
        DataType::Null => 0,
        DataType::Boolean => 1,
        t if is_int(t) || matches!(t, DataType::Float32 | DataType::Float64) => 2,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => 3,
        _ => 4,
    }
}

impl ScalarUDFImpl for OperatorUdf {
    fn name(&self) -> &str {
        self.op.udf_name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use datafusion::arrow::compute::kernels::cmp;
        if self.op == Operator::Not {
            let [v] = args.args.as_slice() else {
                return exec_err!("NOT takes one operand");
            };
            return Ok(match v {
                ColumnarValue::Array(a) => {
                    let b = booleans(a)?;
                    ColumnarValue::Array(Arc::new(
                        b.iter().map(|v| v.map(|v| !v)).collect::<BooleanArray>(),
                    ))
                }
                ColumnarValue::Scalar(s) => {
                    let b = booleans(&s.to_array_of_size(1)?)?;
                    let out: ArrayRef =
                        Arc::new(b.iter().map(|v| v.map(|v| !v)).collect::<BooleanArray>());
                    ColumnarValue::Scalar(datafusion::common::ScalarValue::try_from_array(&out, 0)?)
                }
            });
        }
        let [l, r] = args.args.as_slice() else {
            return exec_err!("{} takes two operands", self.op.udf_name());
        };
        let scalar = matches!((l, r), (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_)));
        let (l, r) = (Operand::of(l)?, Operand::of(r)?);
        let to_decimal = |a: &ArrayRef| -> Result<ArrayRef> { Ok(Arc::new(decimals(a)?)) };
        let out = match self.op {
            Operator::And | Operator::Or | Operator::Not => {
                let (la, ra) = (booleans(l.array())?, booleans(r.array())?);
                let n = la.len().max(ra.len());
                let and = self.op == Operator::And;
                let value = |a: &BooleanArray, i: usize| {
                    let i = row(a.len(), i);
                    a.is_valid(i).then(|| a.value(i))
                };
                (0..n)
                    .map(|i| {
                        let (x, y) = (value(&la, i)?, value(&ra, i)?);
                        Some(if and { x && y } else { x || y })
                    })
                    .collect()
            }
            Operator::Gt | Operator::Lt | Operator::GtEq | Operator::LtEq => {
                let kernel = match self.op {
                    Operator::Gt => cmp::gt,
                    Operator::Lt => cmp::lt,
                    Operator::GtEq => cmp::gt_eq,
                    _ => cmp::lt_eq,
                };
                l.map(to_decimal)?.compare(&r.map(to_decimal)?, kernel)?
            }
            Operator::Eq | Operator::NotEq => {
                let kernel = if self.op == Operator::Eq {
                    cmp::eq
                } else {
                    cmp::neq
                };
                let (lf, rf) = (family(l.array().data_type()), family(r.array().data_type()));
                match (lf, rf) {
                    (2, 2) => l.map(to_decimal)?.compare(&r.map(to_decimal)?, kernel)?,
                    (1, 1) | (3, 3) if l.array().data_type() == r.array().data_type() => {
                        l.compare(&r, kernel)?
                    }
                    (3, 3) => {
                        let text = |a: &ArrayRef| -> Result<ArrayRef> { Ok(Arc::new(texts(a)?)) };
                        l.map(text)?.compare(&r.map(text)?, kernel)?
                    }
                    _ => {
                        // Different types: unequal, Undefined where an operand is missing.
                        let (la, ra) = (l.array(), r.array());
                        let n = la.len().max(ra.len());
                        let differ = self.op == Operator::NotEq;
                        (0..n)
                            .map(|i| {
                                let valid =
                                    la.is_valid(row(la.len(), i)) && ra.is_valid(row(ra.len(), i));
                                valid.then_some(differ)
                            })
                            .collect()
                    }
                }
            }
        };
        let out: ArrayRef = Arc::new(out);
        if scalar {
            Ok(ColumnarValue::Scalar(
                datafusion::common::ScalarValue::try_from_array(&out, 0)?,
            ))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
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
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let out = (self.eval)(&arrays)?;
        let want = args.return_field.data_type();
        if out.data_type() == want {
            Ok(ColumnarValue::Array(out))
        } else {
            Ok(ColumnarValue::Array(cast(&out, want)?))
        }
    }
}

fn is_int(t: &DataType) -> bool {
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
        IotUdf::new("regexp_replace", &[3], Text, |a| {
            regexp(a, |re, s, rep| {
                Some(RegexpOut::Text(re.replace_all(s, rep?).into_owned()))
            })
        }),
    ]
});

/// The string form of each value (the page's "standard string conversion"); Null stays Null.
fn texts(a: &ArrayRef) -> Result<StringArray> {
    let c = cast(a, &DataType::Utf8)?;
    Ok(c.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::new_null(a.len())))
}

/// Each value as a Decimal: numbers as they are, strings that read as numbers; else Null.
fn decimals(a: &ArrayRef) -> Result<Float64Array> {
    if matches!(
        a.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        let s = texts(a)?;
        return Ok(s
            .iter()
            .map(|v| v.and_then(|v| v.trim().parse::<f64>().ok()))
            .collect());
    }
    if a.data_type() == &DataType::Boolean || a.data_type() == &DataType::Null {
        return Ok(Float64Array::new_null(a.len()));
    }
    let c = cast(a, &DataType::Float64)?;
    Ok(c.as_any()
        .downcast_ref::<Float64Array>()
        .cloned()
        .unwrap_or_else(|| Float64Array::new_null(a.len())))
}

/// Each value as an Int: Decimals rounded down (the page's rule for Int arguments).
fn ints(a: &ArrayRef) -> Result<Int64Array> {
    if is_int(a.data_type()) {
        let c = cast(a, &DataType::Int64)?;
        if let Some(i) = c.as_any().downcast_ref::<Int64Array>() {
            return Ok(i.clone());
        }
    }
    let d = decimals(a)?;
    Ok(d.iter()
        .map(|v| v.filter(|v| v.is_finite()).map(|v| v.floor() as i64))
        .collect())
}

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

/// `encode(value, 'base64')`: the value's string form, UTF-8, in padded base64; base64 is the
/// only scheme, any other is Undefined.
fn encode(a: &[ArrayRef]) -> Result<ArrayRef> {
    let (s, scheme) = (texts(&a[0])?, texts(&a[1])?);
    Ok(Arc::new(
        s.iter()
            .zip(scheme.iter())
            .map(|(s, scheme)| {
                scheme
                    .filter(|m| m.eq_ignore_ascii_case("base64"))
                    .and(s)
                    .map(|s| base64::engine::general_purpose::STANDARD.encode(s))
            })
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
            "trim",
            "upper",
            "sourceip",
            "sql_version",
            "traceid",
        ] {
            let metadata = name == "clientid";
            assert!(metadata || lookup(name).is_some(), "{name}");
        }
        assert_eq!(lookup("date_trunc"), None);
        assert_eq!(lookup("SUBSTRING"), Some(Function::Iot));
    }
}
