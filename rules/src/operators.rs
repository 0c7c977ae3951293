//! The operators of `iot-sql-operators` (SQL version 2016-03-23) as DataFusion UDFs. The
//! dialect lowers every operator of a statement to a call of these (`a > b` becomes
//! `iot_op_gt(a, b)`), so DataFusion's coercions never decide what an operator means:
//! - `>`, `<`, `>=`, `<=` convert both operands to Decimal and compare the numbers (`'2' <
//!   '10'` is true), Undefined when one does not convert;
//! - `=` and `<>` compare operands of the same type (Int and Decimal are both numbers; Arrays
//!   item by item in order, Objects key by key in any order) and find operands of different
//!   types unequal (`5 = '5'` is false); Undefined on either side gives Undefined;
//! - `AND`, `OR`, `NOT` take Booleans and the strings "true"/"false" (any case); any other
//!   operand, Undefined included, gives Undefined;
//! - `+` concatenates when either operand is a String (the other in its string form), and adds
//!   numbers otherwise: Int for two Ints, Decimal when one is a Decimal;
//! - `-`, `*`, `/`, `%` give an Int for two Ints (`/` truncates, `%` keeps the dividend's
//!   sign), else a Decimal, converting Strings to Decimals; a String that does not convert,
//!   any other operand, a zero divisor or an Int result an i64 cannot hold give Undefined.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Datum, Float64Array, Int64Array, Scalar, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::arrow::error::ArrowError;
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;

use crate::values::{
    booleans, decimals, json_field, parse_decimal, texts, value_text, values_equal, values_of,
    whole, Kind,
};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Operator {
    Gt,
    Lt,
    GtEq,
    LtEq,
    Eq,
    NotEq,
    And,
    Or,
    Not,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

impl Operator {
    pub(crate) const ALL: [Operator; 14] = [
        Operator::Gt,
        Operator::Lt,
        Operator::GtEq,
        Operator::LtEq,
        Operator::Eq,
        Operator::NotEq,
        Operator::And,
        Operator::Or,
        Operator::Not,
        Operator::Add,
        Operator::Sub,
        Operator::Mul,
        Operator::Div,
        Operator::Mod,
    ];

    /// The UDF an operator is lowered to.
    pub(crate) fn udf_name(self) -> &'static str {
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
            Operator::Add => "iot_op_add",
            Operator::Sub => "iot_op_sub",
            Operator::Mul => "iot_op_mul",
            Operator::Div => "iot_op_div",
            Operator::Mod => "iot_op_mod",
        }
    }

    fn is_arithmetic(self) -> bool {
        matches!(
            self,
            Operator::Add | Operator::Sub | Operator::Mul | Operator::Div | Operator::Mod
        )
    }

    /// What an arithmetic operator gives for operands of these kinds.
    fn arithmetic_type(self, l: Kind, r: Kind) -> Arithmetic {
        use Kind::*;
        match (l, r) {
            (Undefined, _) | (_, Undefined) => Arithmetic::Undefined,
            // A column whose values have several types: decided value by value.
            (Json, _) | (_, Json) => Arithmetic::PerValue,
            (String, _) | (_, String) if self == Operator::Add => Arithmetic::Text,
            (Int, Int) => Arithmetic::Int,
            (Int | Decimal, Int | Decimal) => Arithmetic::Decimal,
            (Int | Decimal | String, Int | Decimal | String) if self != Operator::Add => {
                Arithmetic::Decimal
            }
            _ => Arithmetic::Undefined,
        }
    }

    fn result_field(self, l: Kind, r: Kind) -> Field {
        if !self.is_arithmetic() {
            return Field::new(self.udf_name(), DataType::Boolean, true);
        }
        let arithmetic = self.arithmetic_type(l, r);
        let t = match arithmetic {
            Arithmetic::Text | Arithmetic::PerValue => DataType::Utf8,
            Arithmetic::Int => DataType::Int64,
            // An Undefined result still needs a type: a column of nulls.
            Arithmetic::Decimal | Arithmetic::Undefined => DataType::Float64,
        };
        if arithmetic == Arithmetic::PerValue {
            json_field(self.udf_name())
        } else {
            Field::new(self.udf_name(), t, true)
        }
    }
}

/// What an arithmetic operator's result is, from its operands' kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arithmetic {
    /// `None` for every row (`true + 1`, an Object times 2, a missing field).
    Undefined,
    Text,
    Int,
    Decimal,
    /// An operand holds values of several types: each row by its values, as JSON.
    PerValue,
}

/// Registers every operator's UDF on `ctx`.
pub(crate) fn register(ctx: &SessionContext) {
    for op in Operator::ALL {
        ctx.register_udf(ScalarUDF::from(OperatorUdf::new(op)));
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

/// An operand: its values (a scalar is one row standing for every row) and its IoT kind.
struct Operand {
    array: ArrayRef,
    scalar: bool,
    kind: Kind,
}

type Kernel = fn(&dyn Datum, &dyn Datum) -> std::result::Result<BooleanArray, ArrowError>;

impl Operand {
    fn of(v: &ColumnarValue, field: Option<&FieldRef>) -> Result<Operand> {
        let (array, scalar) = match v {
            ColumnarValue::Array(a) => (Arc::clone(a), false),
            ColumnarValue::Scalar(s) => (s.to_array_of_size(1)?, true),
        };
        let kind = match field {
            Some(f) => Kind::of(f),
            None => Kind::of_type(array.data_type()),
        };
        Ok(Operand {
            array,
            scalar,
            kind,
        })
    }

    fn with(&self, array: ArrayRef) -> Operand {
        Operand {
            array,
            scalar: self.scalar,
            kind: self.kind,
        }
    }

    fn decimals(&self) -> Result<Operand> {
        Ok(self.with(Arc::new(decimals(&self.array, self.kind)?)))
    }

    fn texts(&self) -> Result<Operand> {
        Ok(self.with(Arc::new(texts(&self.array, self.kind)?)))
    }

    fn values(&self) -> Result<Vec<Option<Value>>> {
        values_of(&self.array, self.kind)
    }

    /// Whether row `i` of the result reads a value here. A NullArray (a field no message of
    /// the batch had) has no validity buffer, so it reports its rows valid: its kind says.
    fn defined(&self, i: usize) -> bool {
        self.kind != Kind::Undefined && self.array.is_valid(self.row(i))
    }

    /// The row of this operand that row `i` of the result reads.
    fn row(&self, i: usize) -> usize {
        if self.scalar {
            0
        } else {
            i
        }
    }

    fn compare(&self, other: &Operand, kernel: Kernel) -> Result<BooleanArray> {
        let (a, b) = (&self.array, &other.array);
        let out = match (self.scalar, other.scalar) {
            (false, false) | (true, true) => kernel(a, b),
            (false, true) => kernel(a, &Scalar::new(Arc::clone(b))),
            (true, false) => kernel(&Scalar::new(Arc::clone(a)), b),
        };
        Ok(out?)
    }
}

/// Rows of a result from two operands.
fn rows(l: &Operand, r: &Operand) -> usize {
    l.array.len().max(r.array.len())
}

impl ScalarUDFImpl for OperatorUdf {
    fn name(&self) -> &str {
        self.op.udf_name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let kind = |i: usize| arg_types.get(i).map_or(Kind::Undefined, Kind::of_type);
        Ok(self.op.result_field(kind(0), kind(1)).data_type().clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let kind = |i: usize| {
            args.arg_fields
                .get(i)
                .map_or(Kind::Undefined, |f| Kind::of(f))
        };
        Ok(Arc::new(self.op.result_field(kind(0), kind(1))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let operands = args
            .args
            .iter()
            .enumerate()
            .map(|(i, v)| Operand::of(v, args.arg_fields.get(i)))
            .collect::<Result<Vec<_>>>()?;
        let scalar = operands.iter().all(|o| o.scalar);
        let out: ArrayRef = match (self.op, operands.as_slice()) {
            (Operator::Not, [v]) => {
                let b = booleans(&v.array, v.kind)?;
                Arc::new(b.iter().map(|v| v.map(|v| !v)).collect::<BooleanArray>())
            }
            (Operator::Not, _) => return exec_err!("NOT takes one operand"),
            (op, [l, r]) if op.is_arithmetic() => {
                let out = arithmetic(op, l, r)?;
                let want = args.return_field.data_type();
                if out.data_type() == want {
                    out
                } else {
                    cast(&out, want)?
                }
            }
            (op, [l, r]) => Arc::new(logical_or_comparison(op, l, r)?),
            (op, _) => return exec_err!("{} takes two operands", op.udf_name()),
        };
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

fn logical_or_comparison(op: Operator, l: &Operand, r: &Operand) -> Result<BooleanArray> {
    use datafusion::arrow::compute::kernels::cmp;
    Ok(match op {
        Operator::And | Operator::Or => {
            let (la, ra) = (booleans(&l.array, l.kind)?, booleans(&r.array, r.kind)?);
            let value = |o: &Operand, a: &BooleanArray, i: usize| {
                let i = o.row(i);
                a.is_valid(i).then(|| a.value(i))
            };
            (0..rows(l, r))
                .map(|i| {
                    let (x, y) = (value(l, &la, i)?, value(r, &ra, i)?);
                    Some(if op == Operator::And { x && y } else { x || y })
                })
                .collect()
        }
        Operator::Gt | Operator::Lt | Operator::GtEq | Operator::LtEq => {
            let kernel: Kernel = match op {
                Operator::Gt => cmp::gt,
                Operator::Lt => cmp::lt,
                Operator::GtEq => cmp::gt_eq,
                _ => cmp::lt_eq,
            };
            l.decimals()?.compare(&r.decimals()?, kernel)?
        }
        _ => {
            let kernel: Kernel = if op == Operator::Eq {
                cmp::eq
            } else {
                cmp::neq
            };
            match (l.kind, r.kind) {
                (Kind::Json, _) | (_, Kind::Json) => {
                    let (a, b) = (l.values()?, r.values()?);
                    (0..rows(l, r))
                        .map(|i| {
                            let (x, y) = (a[l.row(i)].as_ref()?, b[r.row(i)].as_ref()?);
                            Some(values_equal(x, y) == (op == Operator::Eq))
                        })
                        .collect()
                }
                (a, b) if a.is_number() && b.is_number() => {
                    l.decimals()?.compare(&r.decimals()?, kernel)?
                }
                (Kind::Boolean, Kind::Boolean) | (Kind::String, Kind::String)
                    if l.array.data_type() == r.array.data_type() =>
                {
                    l.compare(r, kernel)?
                }
                (Kind::String, Kind::String) => l.texts()?.compare(&r.texts()?, kernel)?,
                _ => {
                    // Different types: unequal, Undefined where an operand is.
                    let differ = op == Operator::NotEq;
                    (0..rows(l, r))
                        .map(|i| {
                            let valid = l.defined(i) && r.defined(i);
                            valid.then_some(differ)
                        })
                        .collect()
                }
            }
        }
    })
}

fn arithmetic(op: Operator, l: &Operand, r: &Operand) -> Result<ArrayRef> {
    let n = rows(l, r);
    Ok(match op.arithmetic_type(l.kind, r.kind) {
        Arithmetic::Undefined => Arc::new(Float64Array::new_null(n)),
        Arithmetic::PerValue => {
            let (a, b) = (l.values()?, r.values()?);
            Arc::new(
                (0..n)
                    .map(|i| {
                        let (x, y) = (a[l.row(i)].as_ref()?, b[r.row(i)].as_ref()?);
                        Some(arithmetic_value(op, x, y)?.to_string())
                    })
                    .collect::<StringArray>(),
            )
        }
        Arithmetic::Text => {
            let (a, b) = (texts(&l.array, l.kind)?, texts(&r.array, r.kind)?);
            fn text<'a>(o: &Operand, s: &'a StringArray, i: usize) -> Option<&'a str> {
                let i = o.row(i);
                s.is_valid(i).then(|| s.value(i))
            }
            Arc::new(
                (0..n)
                    .map(|i| Some(format!("{}{}", text(l, &a, i)?, text(r, &b, i)?)))
                    .collect::<StringArray>(),
            )
        }
        Arithmetic::Int => {
            let (a, b) = (
                cast(&l.array, &DataType::Int64)?,
                cast(&r.array, &DataType::Int64)?,
            );
            let (Some(a), Some(b)) = (
                a.as_any().downcast_ref::<Int64Array>(),
                b.as_any().downcast_ref::<Int64Array>(),
            ) else {
                return exec_err!("{}: Int operands did not read as Ints", op.udf_name());
            };
            let value = |o: &Operand, a: &Int64Array, i: usize| {
                let i = o.row(i);
                a.is_valid(i).then(|| a.value(i))
            };
            Arc::new(
                (0..n)
                    .map(|i| {
                        let (x, y) = (value(l, a, i)?, value(r, b, i)?);
                        match op {
                            Operator::Add => x.checked_add(y),
                            Operator::Sub => x.checked_sub(y),
                            Operator::Mul => x.checked_mul(y),
                            Operator::Div => x.checked_div(y),
                            _ => x.checked_rem(y),
                        }
                    })
                    .collect::<Int64Array>(),
            )
        }
        Arithmetic::Decimal => {
            let (a, b) = (decimals(&l.array, l.kind)?, decimals(&r.array, r.kind)?);
            // SQL version 2016-03-23 processes a whole-number Decimal as an Int
            // (iot-sql-data-types), so 7 / 2.0 divides two Ints, as it does value by value
            // (`arithmetic_value`). A String operand converts to a Decimal and stays one.
            let numbers = l.kind.is_number() && r.kind.is_number();
            let value = |o: &Operand, a: &Float64Array, i: usize| {
                let i = o.row(i);
                a.is_valid(i).then(|| a.value(i))
            };
            Arc::new(
                (0..n)
                    .map(|i| {
                        let (x, y) = (value(l, &a, i)?, value(r, &b, i)?);
                        let v = match op {
                            Operator::Add => x + y,
                            Operator::Sub => x - y,
                            Operator::Mul => x * y,
                            Operator::Div if numbers => match (whole(x), whole(y)) {
                                (Some(a), Some(b)) => return Some(a.checked_div(b)? as f64),
                                _ if y != 0.0 => x / y,
                                _ => return None,
                            },
                            Operator::Div if y != 0.0 => x / y,
                            Operator::Mod if y != 0.0 => x % y,
                            _ => return None,
                        };
                        v.is_finite().then_some(v)
                    })
                    .collect::<Float64Array>(),
            )
        }
    })
}

/// An operator on values of any type, by the same tables as the columns above: what a nested
/// query (`crate::nested`) evaluates item by item. `None` is Undefined.
pub(crate) fn apply(op: Operator, x: Option<&Value>, y: Option<&Value>) -> Option<Value> {
    let boolean = |v: &Value| match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    };
    let decimal = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_decimal(s),
        _ => None,
    };
    Some(Value::Bool(match op {
        Operator::Not => !boolean(x?)?,
        // Both operands are read first: an Undefined one makes the result Undefined.
        Operator::And | Operator::Or => {
            let (a, b) = (boolean(x?)?, boolean(y?)?);
            if op == Operator::And {
                a && b
            } else {
                a || b
            }
        }
        Operator::Gt => decimal(x?)? > decimal(y?)?,
        Operator::Lt => decimal(x?)? < decimal(y?)?,
        Operator::GtEq => decimal(x?)? >= decimal(y?)?,
        Operator::LtEq => decimal(x?)? <= decimal(y?)?,
        Operator::Eq => values_equal(x?, y?),
        Operator::NotEq => !values_equal(x?, y?),
        _ => return arithmetic_value(op, x?, y?),
    }))
}

/// An arithmetic operator on two values of any type, by the same tables as the typed columns.
fn arithmetic_value(op: Operator, x: &Value, y: &Value) -> Option<Value> {
    if op == Operator::Add && (x.is_string() || y.is_string()) {
        return Some(Value::String(value_text(x)? + &value_text(y)?));
    }
    let number = |v: &Value| match v {
        Value::Number(n) => Some(n.clone()),
        Value::String(s) if op != Operator::Add => {
            parse_decimal(s).and_then(serde_json::Number::from_f64)
        }
        _ => None,
    };
    let (a, b) = (number(x)?, number(y)?);
    let ints = (x.is_number() && y.is_number())
        .then(|| Some((a.as_i64()?, b.as_i64()?)))
        .flatten();
    if let Some((a, b)) = ints {
        let v = match op {
            Operator::Add => a.checked_add(b),
            Operator::Sub => a.checked_sub(b),
            Operator::Mul => a.checked_mul(b),
            Operator::Div => a.checked_div(b),
            _ => a.checked_rem(b),
        }?;
        return Some(Value::from(v));
    }
    let (a, b) = (a.as_f64()?, b.as_f64()?);
    let v = match op {
        Operator::Add => a + b,
        Operator::Sub => a - b,
        Operator::Mul => a * b,
        Operator::Div if b != 0.0 => a / b,
        Operator::Mod if b != 0.0 => a % b,
        _ => return None,
    };
    // SQL version 2016-03-23 processes a whole-number Decimal as an Int.
    match crate::values::whole(v) {
        Some(i) => Some(Value::from(i)),
        None => serde_json::Number::from_f64(v).map(Value::Number),
    }
}
