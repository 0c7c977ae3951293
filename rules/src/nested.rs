//! Nested object queries (iot-sql-nested-queries): `(SELECT VALUE n FROM e)`, `(SELECT v FROM
//! e WHERE n = 'temperature')` and `(SELECT a, b FROM data2)` read inside one message's field,
//! an Array (the query runs on each item and gives an Array) or an Object (the query runs on it
//! and gives its one result).
//!
//! The dialect lowers such a subquery to `iot_nested(field, 'inner query')`, the inner query
//! already lowered like the rest of the statement (its operators are `iot_op_*` calls). This
//! module compiles that text into a [`Query`] of [`Term`]s, refusing at load what it cannot
//! evaluate, and evaluates it on JSON values with the operator tables of
//! [`crate::operators::apply`]. Inside, a query may use the items' fields, literals, operators,
//! `get`, `a[0]` / `a.b`, and Array and Object literals.

use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Query as SqlQuery,
    SelectItem, SetExpr, TableFactor, UnaryOperator, Value as SqlValue,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use serde_json::{Map, Value};

use crate::dialect::VALUE_COLUMN;
use crate::operators::{apply, Operator};
use crate::value_functions::{get, truthy, ARRAY_UDF, NULL_UDF, OBJECT_UDF};

/// The UDF a nested query is lowered to: `iot_nested(field, 'inner query')`.
pub(crate) const NESTED_UDF: &str = "iot_nested";

/// An expression of a nested query, on one item.
#[derive(Debug, Clone, PartialEq)]
enum Term {
    /// A field of the item (dotted path).
    Path(Vec<String>),
    Literal(Value),
    Op(Operator, Vec<Term>),
    Get(Box<Term>, Box<Term>),
    Array(Vec<Term>),
    Object(Vec<(String, Term)>),
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// `*`: the item itself.
    Star,
    /// An output key (a dotted path nests) and its expression.
    Named(String, Term),
}

/// A compiled nested query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    /// `SELECT VALUE`: each result is the value itself, not an object.
    value: bool,
    items: Vec<Item>,
    filter: Option<Term>,
}

/// The `iot_nested(…)` call for a subquery of the statement, or why it is refused.
pub(crate) fn lower(query: &SqlQuery) -> Result<String, String> {
    let (from, _) = compile(query)?;
    let text = crate::dialect::text_literal(&query.to_string());
    Ok(format!("{NESTED_UDF}({from}, {text})"))
}

/// The inner query's text (what [`lower`] wrote) compiled again, when the UDF runs.
pub(crate) fn parse(text: &str) -> Result<Query, String> {
    let mut p = Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .map_err(|e| e.to_string())?;
    let query = p.parse_query().map_err(|e| e.to_string())?;
    compile(&query).map(|(_, q)| q)
}

/// The field a query reads (as SQL) and the query.
fn compile(query: &SqlQuery) -> Result<(String, Query), String> {
    let refuse = |what: &str| {
        Err(format!(
            "a nested query takes no {what} (iot-sql-nested-queries)"
        ))
    };
    if query.with.is_some() || query.order_by.is_some() || query.limit_clause.is_some() {
        return refuse("WITH, ORDER BY or LIMIT");
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return refuse("UNION or VALUES");
    };
    if select.distinct.is_some()
        || select.having.is_some()
        || !matches!(&select.group_by, GroupByExpr::Expressions(g, _) if g.is_empty())
    {
        return refuse("DISTINCT, GROUP BY or HAVING");
    }
    let [from] = select.from.as_slice() else {
        return Err("a nested query reads one field: FROM <field>".into());
    };
    let TableFactor::Table { name, .. } = &from.relation else {
        return Err("a nested query reads one field: FROM <field>".into());
    };
    if !from.joins.is_empty() {
        return refuse("JOIN");
    }
    let mut value = false;
    let mut items = Vec::new();
    for item in &select.projection {
        items.push(match item {
            SelectItem::Wildcard(_) => Item::Star,
            SelectItem::ExprWithAlias { expr, alias } if alias.value == VALUE_COLUMN => {
                value = true;
                Item::Named(String::new(), term(expr)?)
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                Item::Named(alias.value.clone(), term(expr)?)
            }
            SelectItem::UnnamedExpr(expr) => match expr {
                Expr::Identifier(id) => Item::Named(id.value.clone(), term(expr)?),
                other => {
                    return Err(format!(
                        "`{other}` in a nested query needs a name: `{other} AS name`"
                    ))
                }
            },
            other => return Err(format!("`{other}` is not supported in a nested query")),
        });
    }
    if value && items.len() != 1 {
        return Err("SELECT VALUE takes one expression (iot-sql-select)".into());
    }
    let filter = select.selection.as_ref().map(term).transpose()?;
    Ok((
        name.to_string(),
        Query {
            value,
            items,
            filter,
        },
    ))
}

fn args(e: &Expr, arguments: &FunctionArguments) -> Result<Vec<Term>, String> {
    let FunctionArguments::List(list) = arguments else {
        return Ok(Vec::new());
    };
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => term(x),
            _ => Err(format!("`{e}`: unsupported argument in a nested query")),
        })
        .collect()
}

fn term(e: &Expr) -> Result<Term, String> {
    Ok(match e {
        Expr::Identifier(id) => Term::Path(id.value.split('.').map(str::to_string).collect()),
        Expr::CompoundIdentifier(ids) => Term::Path(
            ids.iter()
                .flat_map(|id| id.value.split('.'))
                .map(str::to_string)
                .collect(),
        ),
        Expr::Value(v) => {
            Term::Literal(literal(&v.value).ok_or_else(|| format!("`{e}`: not a literal here"))?)
        }
        Expr::Nested(inner) => term(inner)?,
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match term(expr)? {
            Term::Literal(Value::Number(n)) => Term::Literal(
                match n.as_i64() {
                    Some(i) => i.checked_neg().map(Value::from),
                    None => n
                        .as_f64()
                        .and_then(|f| serde_json::Number::from_f64(-f))
                        .map(Value::Number),
                }
                .ok_or_else(|| format!("`{e}`: out of range"))?,
            ),
            other => Term::Op(Operator::Sub, vec![Term::Literal(Value::from(0)), other]),
        },
        Expr::Function(f) => {
            let name = f.name.to_string();
            let mut a = args(e, &f.args)?;
            if let Some(op) = Operator::ALL.iter().find(|o| o.udf_name() == name) {
                Term::Op(*op, a)
            } else if name == "iot_get" && a.len() == 2 {
                let key = a.pop().map(Box::new);
                let collection = a.pop().map(Box::new);
                match (collection, key) {
                    (Some(c), Some(k)) => Term::Get(c, k),
                    _ => return Err(format!("`{e}`: get takes two arguments")),
                }
            } else if name == NULL_UDF {
                Term::Literal(Value::Null)
            } else if name == ARRAY_UDF {
                Term::Array(a)
            } else if name == OBJECT_UDF {
                let mut fields = Vec::new();
                let mut it = a.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let Term::Literal(Value::String(k)) = k else {
                        return Err(format!("`{e}`: an object literal's keys are strings"));
                    };
                    fields.push((k, v));
                }
                Term::Object(fields)
            } else {
                let shown = name.strip_prefix("iot_").unwrap_or(&name);
                return Err(format!(
                    "{shown}() inside a nested query is not supported at the edge yet (fields, \
                     literals, operators and get() are)"
                ));
            }
        }
        other => {
            return Err(format!(
                "`{other}` is not supported inside a nested query yet"
            ))
        }
    })
}

fn literal(v: &SqlValue) -> Option<Value> {
    Some(match v {
        SqlValue::Number(n, _) => serde_json::from_str(n).ok()?,
        SqlValue::SingleQuotedString(s) | SqlValue::DoubleQuotedString(s) => {
            Value::from(s.as_str())
        }
        SqlValue::Boolean(b) => Value::Bool(*b),
        SqlValue::Null => Value::Null,
        _ => return None,
    })
}

fn eval(t: &Term, item: &Value) -> Option<Value> {
    match t {
        Term::Path(parts) => {
            let mut v = item;
            for p in parts {
                v = v.as_object()?.get(p)?;
            }
            Some(v.clone())
        }
        Term::Literal(v) => Some(v.clone()),
        Term::Op(op, a) => {
            let x = a.first().and_then(|t| eval(t, item));
            let y = a.get(1).and_then(|t| eval(t, item));
            apply(*op, x.as_ref(), y.as_ref())
        }
        Term::Get(c, k) => get(&eval(c, item)?, &eval(k, item)?),
        // An Undefined item or field is left out, as in the literals outside.
        Term::Array(a) => Some(Value::Array(
            a.iter().filter_map(|t| eval(t, item)).collect(),
        )),
        Term::Object(fields) => Some(Value::Object(
            fields
                .iter()
                .filter_map(|(k, t)| Some((k.clone(), eval(t, item)?)))
                .collect(),
        )),
    }
}

impl Query {
    /// The query on one message's field: an Array of the results for an Array, the one result
    /// for an Object, Undefined for anything else.
    pub(crate) fn run(&self, from: &Value) -> Option<Value> {
        let one = |item: &Value| -> Option<Value> {
            if let Some(f) = &self.filter {
                if !eval(f, item).as_ref().is_some_and(truthy) {
                    return None;
                }
            }
            if self.value {
                let Some(Item::Named(_, t)) = self.items.first() else {
                    return None;
                };
                return eval(t, item);
            }
            let mut out = Map::new();
            for i in &self.items {
                match i {
                    Item::Star => {
                        if let Value::Object(fields) = item {
                            out.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                        }
                    }
                    Item::Named(name, t) => {
                        if let Some(v) = eval(t, item) {
                            crate::batch::insert_path(&mut out, name, v);
                        }
                    }
                }
            }
            Some(Value::Object(out))
        };
        match from {
            Value::Array(items) => Some(Value::Array(items.iter().filter_map(one).collect())),
            Value::Object(_) => one(from),
            _ => None,
        }
    }
}
