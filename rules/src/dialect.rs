//! The AWS IoT SQL dialect, turned into DataFusion SQL over one table, `messages`.
//!
//! A rule file holds one or more `INSERT INTO <sink> SELECT … FROM '<topic filter>' [WHERE …]
//! [GROUP BY …]` statements. The rewrite works on sqlparser tokens, so string literals and
//! comments are never touched and lines stay where they were:
//! - `FROM 'dt/+/temp'` (or `"…"` as EMQX writes it) becomes `FROM messages`; the filter is
//!   kept to pick the messages the statement sees;
//! - `topic()`, `topic(n)`, `clientid()`, `principal()`, `timestamp()`, `thing_name()` become
//!   the metadata columns; `newuuid()` becomes `uuid()`;
//! - `a.b` becomes the column `"a.b"` (nested payload fields are flattened with dots);
//! - `first(x)` / `last(x)` become `first_value` / `last_value` ordered by the window's time;
//! - `TUMBLE(…)` / `HOP(…)` in `GROUP BY` define the window and leave the group list;
//! - function calls are looked up in [`crate::functions`]: IoT Core's meaning or a refusal;
//!   a double-quoted word is a string literal (except after `AS`);
//! - last, on the parsed statement, the comparison and logical operators become calls of the
//!   UDFs with IoT Core's operator tables ([`crate::operators::Operator`]).
//!
//! Directives in comments: `-- @schema temp DOUBLE, zone TEXT` fixes column types;
//! `-- @error_sink NAME` overrides `[rules] error_sink`.
//!
//! The [`Context`] a rule is read in adds what the configuration knows: the account
//! `accountid()` gives, and each sink's substitution-template expressions, which become
//! columns of every statement writing to that sink (`(upper(zone)) AS __sg_tpl_0`), so they
//! are evaluated against the original message as IoT Core does, not against the output row.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace, Word};

use crate::functions::Function;
use crate::values::CastTarget;

/// Metadata columns every message has.
pub const TOPIC: &str = "__topic";
pub const THING: &str = "__thing";
pub const CERT_ID: &str = "__cert_id";
pub const RECEIVED_AT: &str = "__received_at";
/// The message's MQTT 5 properties as a JSON object, for `get_mqtt_property` and
/// `get_user_properties` ([`crate::batch::Properties`]).
pub const MQTT: &str = "__mqtt";
/// The address the device connected from, for `sourceip()`.
pub const SOURCE_IP: &str = "__source_ip";
/// The message's trace id, for `traceid()`.
pub const TRACE_ID: &str = "__trace_id";
/// What `get_user_properties(key)` is called until the statement is parsed.
const USER_PROPERTIES_CALL: &str = "iot_user_properties";
/// The names `get_mqtt_property` takes (iot-sql-functions).
const MQTT_PROPERTIES: [&str; 4] = [
    "content_type",
    "format_indicator",
    "response_topic",
    "correlation_data",
];
/// The name of the column holding a statement's `i`-th substitution-template value.
pub fn template_column(i: usize) -> String {
    format!("{TEMPLATE_PREFIX}{i}")
}
/// What [`template_column`]s' names start with.
pub const TEMPLATE_PREFIX: &str = "__sg_tpl_";

/// What a rule is read against besides its own text: what the gateway's configuration knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The sinks a statement may name; `None`: any (a rule tried on its own).
    pub sinks: Option<Vec<String>>,
    /// Each sink's substitution-template expressions (iot-substitution-templates), in the
    /// order its template has them; a field name is one too.
    pub templates: BTreeMap<String, Vec<String>>,
    /// `[rules] account_id`: what `accountid()` gives.
    pub account_id: Option<String>,
}

/// The whole payload as bytes, for `*` as a function's argument (`encode(*, 'base64')`,
/// binary-payloads).
pub const PAYLOAD: &str = "__payload";
/// Placeholder for the ordering column of `first`/`last`, filled once the window is known.
const ORDER_PLACEHOLDER: &str = "__sg_order";

/// A rule file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RuleError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub reason: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.reason
        )
    }
}

/// Column types a rule may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Double,
    BigInt,
    Text,
    Boolean,
}

impl ColumnType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "DOUBLE" | "FLOAT" | "REAL" | "DECIMAL" => ColumnType::Double,
            "BIGINT" | "INT" | "INTEGER" | "LONG" => ColumnType::BigInt,
            "TEXT" | "STRING" | "VARCHAR" => ColumnType::Text,
            "BOOLEAN" | "BOOL" => ColumnType::Boolean,
            _ => return None,
        })
    }
}

/// A window over the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    pub size_ms: u64,
    /// Equal to `size_ms` for tumbling windows.
    pub slide_ms: u64,
    /// Payload column (Unix ms) for event time; `None` means processing time.
    pub time_column: Option<String>,
    /// How long after a window's end late events are still accepted (event time only).
    pub lateness_ms: u64,
}

/// One `INSERT INTO … SELECT …` of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementSpec {
    pub sink: String,
    /// MQTT topic filter of the FROM clause.
    pub source: String,
    /// DataFusion SQL over `messages`, with the identity columns appended.
    pub sql: String,
    pub window: Option<WindowSpec>,
    /// Columns the statement refers to (made present, as nulls, when a batch lacks them).
    pub columns: BTreeSet<String>,
    /// The statement selects `*`, so every payload field is decoded; otherwise only `columns`.
    pub whole_payload: bool,
    /// `*` is a function's argument (`encode(*, 'base64')`): the batch carries [`PAYLOAD`].
    pub payload_value: bool,
    /// It reads MQTT 5 properties: the batch carries [`MQTT`].
    pub mqtt_properties: bool,
    /// It calls `sourceip()`: the batch carries [`SOURCE_IP`].
    pub source_ip: bool,
    /// It calls `traceid()`: the batch carries [`TRACE_ID`].
    pub trace_id: bool,
    /// Its sink's template expressions it computes, as [`template_column`] `0..templates`.
    pub templates: usize,
    /// Its own text names a payload field (template expressions aside), so a payload that is
    /// not a JSON object makes no row.
    pub names_fields: bool,
    /// Line of the statement in the file.
    pub line: u64,
}

impl StatementSpec {
    /// Whether the statement names no payload field, so that a payload that is not a JSON
    /// object still makes a row: binary-payloads, "The SQL statement … must not refer to JSON
    /// names other than *".
    pub fn takes_binary(&self) -> bool {
        !self.names_fields
    }
}

/// A parsed rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub name: String,
    pub statements: Vec<StatementSpec>,
    pub declared: Vec<(String, ColumnType)>,
    pub error_sink: Option<String>,
}

fn err(file: &str, at: Option<&TokenWithSpan>, reason: impl Into<String>) -> RuleError {
    let (line, column) = at
        .map(|t| (t.span.start.line, t.span.start.column))
        .unwrap_or((1, 1));
    RuleError {
        file: file.to_string(),
        line,
        column,
        reason: reason.into(),
    }
}

fn is_trivia(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_))
}

fn word(t: &Token) -> Option<&Word> {
    match t {
        Token::Word(w) => Some(w),
        _ => None,
    }
}

fn ident(name: &str) -> Token {
    Token::Word(Word {
        value: name.to_string(),
        quote_style: None,
        keyword: Keyword::NoKeyword,
    })
}

fn quoted(name: &str) -> Token {
    Token::Word(Word {
        value: name.to_string(),
        quote_style: Some('"'),
        keyword: Keyword::NoKeyword,
    })
}

fn space() -> Token {
    Token::Whitespace(Whitespace::Space)
}

/// Parse rule `name` from `file` (its text), on its own.
pub fn parse(name: &str, file: &str, text: &str) -> Result<RuleSpec, RuleError> {
    parse_in(name, file, text, &Context::default())
}

/// Parse rule `name` from `file` (its text) in the gateway's `ctx`.
pub fn parse_in(name: &str, file: &str, text: &str, ctx: &Context) -> Result<RuleSpec, RuleError> {
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| RuleError {
            file: file.into(),
            line: e.location.line,
            column: e.location.column,
            reason: e.message,
        })?;
    let mut declared = Vec::new();
    let mut error_sink = None;
    for t in &tokens {
        if let Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) = &t.token {
            let c = comment.trim();
            if let Some(cols) = c.strip_prefix("@schema") {
                for part in cols.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let mut it = part.split_whitespace();
                    let (Some(col), Some(ty), None) = (it.next(), it.next(), it.next()) else {
                        return Err(err(
                            file,
                            Some(t),
                            format!("@schema entry {part:?}: write `column TYPE`"),
                        ));
                    };
                    let ty = ColumnType::parse(ty).ok_or_else(|| {
                        err(
                            file,
                            Some(t),
                            format!("@schema: unknown type {ty:?} (DOUBLE, BIGINT, TEXT, BOOLEAN)"),
                        )
                    })?;
                    declared.push((col.to_string(), ty));
                }
            } else if let Some(sink) = c.strip_prefix("@error_sink") {
                error_sink = Some(sink.trim().to_string());
            }
        }
    }
    // Split into statements at top-level INSERT keywords and semicolons.
    let mut statements: Vec<Vec<TokenWithSpan>> = Vec::new();
    let mut depth = 0i32;
    for t in tokens {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            _ => {}
        }
        if depth == 0 && word(&t.token).is_some_and(|w| w.keyword == Keyword::INSERT) {
            statements.push(Vec::new());
        }
        if matches!(t.token, Token::SemiColon) && depth == 0 {
            continue;
        }
        match statements.last_mut() {
            Some(s) => s.push(t),
            None if is_trivia(&t.token) => {}
            None => {
                return Err(err(
                    file,
                    Some(&t),
                    "expected `INSERT INTO <sink> SELECT …`",
                ))
            }
        }
    }
    if statements.is_empty() {
        return Err(RuleError {
            file: file.into(),
            line: 1,
            column: 1,
            reason: "no `INSERT INTO <sink> SELECT …` statement".into(),
        });
    }
    let statements = statements
        .into_iter()
        .map(|s| statement(file, s, ctx))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RuleSpec {
        name: name.to_string(),
        statements,
        declared,
        error_sink,
    })
}

fn statement(
    file: &str,
    tokens: Vec<TokenWithSpan>,
    ctx: &Context,
) -> Result<StatementSpec, RuleError> {
    let line = tokens.first().map(|t| t.span.start.line).unwrap_or(1);
    let significant: Vec<usize> = (0..tokens.len())
        .filter(|&i| !is_trivia(&tokens[i].token))
        .collect();
    let at = |k: usize| significant.get(k).map(|&i| &tokens[i]);
    let kw = |k: usize, keyword: Keyword| {
        at(k)
            .and_then(|t| word(&t.token))
            .is_some_and(|w| w.keyword == keyword)
    };
    if !kw(1, Keyword::INTO) {
        return Err(err(file, at(1).or(at(0)), "expected INTO after INSERT"));
    }
    let sink = at(2)
        .and_then(|t| word(&t.token))
        .map(|w| w.value.clone())
        .ok_or_else(|| {
            err(
                file,
                at(2).or(at(1)),
                "expected a sink name after INSERT INTO",
            )
        })?;
    let (body, vars): (Vec<TokenWithSpan>, Variables) = if kw(3, Keyword::SET) {
        set_clause(file, &tokens[significant[3]..])?
    } else if kw(3, Keyword::SELECT) {
        (tokens[significant[3]..].to_vec(), Vec::new())
    } else {
        return Err(err(
            file,
            at(3).or(at(2)),
            "expected SELECT (or SET) after the sink name",
        ));
    };
    let body = &body[..];
    let mut rewrite = Rewrite {
        account_id: ctx.account_id.clone(),
        ..Rewrite::default()
    };
    rewrite.run(file, body)?;
    let source = rewrite
        .source
        .clone()
        .ok_or_else(|| err(file, body.first(), "expected FROM '<topic filter>'"))?;
    if !sitegate_plugins::topic::valid_filter(&source) {
        return Err(err(
            file,
            rewrite.source_at.as_ref(),
            format!("{source:?} is not an MQTT topic filter"),
        ));
    }
    let (mut out, window) = extract_window(file, std::mem::take(&mut rewrite.out), body)?;
    let selects_value = select_value(file, &mut out, body)?;
    if selects_value {
        rewrite.columns.remove("VALUE");
        rewrite.columns.remove("value");
    }
    let order = match &window {
        Some(WindowSpec {
            time_column: Some(c),
            ..
        }) => quoted(c),
        _ => ident(RECEIVED_AT),
    };
    for t in out.iter_mut() {
        if word(t).is_some_and(|w| w.value == ORDER_PLACEHOLDER) {
            *t = order.clone();
        }
    }
    let names_fields = !rewrite.columns.is_empty();
    let templates = ctx.templates.get(&sink).map(Vec::as_slice).unwrap_or(&[]);
    let mut template_count = 0;
    if window.is_some() {
        // A window's row comes from many messages: a field is read from the output row when
        // the sink renders it; nothing else has one message to be evaluated against.
        if let Some(e) = templates
            .iter()
            .find(|e| !sitegate_plugins::template::is_field_path(e))
        {
            return Err(err(
                file,
                body.first(),
                format!(
                    "sink {sink:?}: its template's `${{{e}}}` is evaluated against each message \
                     (iot-substitution-templates), and a windowed statement's rows come from \
                     many; a template here may use field names of the output and the \
                     message's identity"
                ),
            ));
        }
    } else if !templates.is_empty() {
        let mut extra = Vec::new();
        for (i, e) in templates.iter().enumerate() {
            let at = (file, body.first(), sink.as_str());
            let tokens = template_expression(at, e, &vars, &mut rewrite)?;
            extra.extend([Token::Comma, space(), Token::LParen]);
            extra.extend(tokens);
            extra.extend([
                Token::RParen,
                space(),
                ident("AS"),
                space(),
                ident(&template_column(i)),
                space(),
            ]);
        }
        if let Some(from) = top_level_from(&out) {
            out.splice(from..from, extra);
            template_count = templates.len();
        }
    }
    append_identity(&mut out, window.is_some());
    let sql: String = out.iter().map(sql_text).collect();
    let sql = lower_operators(&sql).map_err(|e| err(file, body.first(), e))?;
    let mut columns = rewrite.columns;
    if let Some(WindowSpec {
        time_column: Some(c),
        ..
    }) = &window
    {
        columns.insert(c.clone());
    }
    Ok(StatementSpec {
        sink,
        source,
        sql,
        window,
        columns,
        whole_payload: selects_star(body),
        payload_value: rewrite.payload_value,
        mqtt_properties: rewrite.mqtt_properties,
        source_ip: rewrite.source_ip,
        trace_id: rewrite.trace_id,
        templates: template_count,
        names_fields,
        line,
    })
}

/// `a > b` (and every other operator: `<`, `>=`, `<=`, `=`, `<>`, `AND`, `OR`, `NOT`, `+`, `-`,
/// `*`, `/`, `%`, and `-x`) as calls of the UDFs with IoT Core's operator tables
/// ([`crate::operators::Operator`]), instead of DataFusion's coercions; likewise `NULL` (a
/// Null value, not Undefined), `CASE` (each branch keeps its type), Array and Object literals,
/// and `x[i]`, `f(x).key` (iot-sql-json: `get`). `IS NULL` is refused: IoT SQL has `isNull()` and `isUndefined()`.
fn lower_operators(sql: &str) -> Result<String, String> {
    use crate::operators::Operator;
    use datafusion::sql::sqlparser::ast::{
        visit_expressions_mut, BinaryOperator, Expr, UnaryOperator,
    };
    use datafusion::sql::sqlparser::parser::Parser;
    use std::ops::ControlFlow;
    let dialect = GenericDialect {};
    let mut statements = Parser::parse_sql(&dialect, sql).map_err(|e| e.to_string())?;
    let mut failed = None;
    let _ = visit_expressions_mut(&mut statements, |e: &mut Expr| {
        // LIKE matches a value's string form (iot-sql-data-types, "To string").
        if let Expr::Like { expr, .. } | Expr::ILike { expr, .. } = e {
            let text = format!("{}({expr}, 'string')", crate::functions::CAST_UDF);
            match Parser::new(&dialect)
                .try_with_sql(&text)
                .and_then(|mut p| p.parse_expr())
            {
                Ok(lowered) => **expr = lowered,
                Err(err) => failed = Some(err.to_string()),
            }
            return ControlFlow::<()>::Continue(());
        }
        if let Some(form) = iot_form(e) {
            match form {
                Ok(call) => lower(&dialect, e, &call, &mut failed),
                Err(why) => failed = Some(why),
            }
            return ControlFlow::Continue(());
        }
        if let Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } = e
        {
            let call = format!("{}({expr})", Operator::Not.udf_name());
            lower(&dialect, e, &call, &mut failed);
            return ControlFlow::<()>::Continue(());
        }
        // A negative number stays a literal; `-x` is `0 - x`, by the `-` table.
        if let Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } = e
        {
            if !matches!(**expr, Expr::Value(_)) {
                let call = format!("{}(0, {expr})", Operator::Sub.udf_name());
                lower(&dialect, e, &call, &mut failed);
            }
            return ControlFlow::<()>::Continue(());
        }
        let Expr::BinaryOp { left, op, right } = e else {
            return ControlFlow::<()>::Continue(());
        };
        let op = match op {
            BinaryOperator::And => Operator::And,
            BinaryOperator::Or => Operator::Or,
            BinaryOperator::Gt => Operator::Gt,
            BinaryOperator::Lt => Operator::Lt,
            BinaryOperator::GtEq => Operator::GtEq,
            BinaryOperator::LtEq => Operator::LtEq,
            BinaryOperator::Eq => Operator::Eq,
            BinaryOperator::NotEq => Operator::NotEq,
            BinaryOperator::Plus => Operator::Add,
            BinaryOperator::Minus => Operator::Sub,
            BinaryOperator::Multiply => Operator::Mul,
            BinaryOperator::Divide => Operator::Div,
            BinaryOperator::Modulo => Operator::Mod,
            _ => return ControlFlow::Continue(()),
        };
        let call = format!("{}({left}, {right})", op.udf_name());
        lower(&dialect, e, &call, &mut failed);
        ControlFlow::Continue(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(statements
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("; "))
}

/// A token as SQL text. The tokenizer unescapes `''` in a string literal and its `Display` does
/// not escape it again, so a quote inside a string (`'it''s'`, `"yyyy 'at' HH"`) is doubled here.
fn sql_text(t: &Token) -> String {
    match t {
        Token::SingleQuotedString(s) => text_literal(s),
        other => other.to_string(),
    }
}

/// The longest variable name the SET clause takes (iot-sql-set), `@` not counted.
const MAX_VARIABLE: usize = 64;

/// `SET @a = expr, @b = expr SELECT …` (iot-sql-set): the statement from its SELECT on, each
/// `@name` replaced by its expression in parentheses (a variable may use the ones before it).
/// A variable set twice, a bad name, or one used but not set is refused.
/// A statement's SET variables: each name with its expression's tokens.
type Variables = Vec<(String, Vec<TokenWithSpan>)>;

/// `@name` in `t`, if it is a variable.
fn variable(t: &Token) -> Option<String> {
    word(t)
        .filter(|w| w.quote_style.is_none())
        .and_then(|w| w.value.strip_prefix('@').map(str::to_string))
}

/// Pushes `t` onto `out`, a variable as its expression in parentheses.
fn substitute(
    file: &str,
    out: &mut Vec<TokenWithSpan>,
    t: &TokenWithSpan,
    vars: &[(String, Vec<TokenWithSpan>)],
) -> Result<(), RuleError> {
    let Some(name) = variable(&t.token) else {
        out.push(t.clone());
        return Ok(());
    };
    let Some((_, expr)) = vars.iter().find(|(n, _)| *n == name) else {
        return Err(err(
            file,
            Some(t),
            format!("@{name} is not set in this statement's SET clause"),
        ));
    };
    out.push(TokenWithSpan::new(Token::LParen, t.span));
    out.extend(expr.iter().cloned());
    out.push(TokenWithSpan::new(Token::RParen, t.span));
    Ok(())
}

/// `SET @a = …, @b = … SELECT …` (iot-sql-set): the body from SELECT on with every variable
/// replaced by its expression, and the variables (for the sink's templates).
fn set_clause(
    file: &str,
    tokens: &[TokenWithSpan],
) -> Result<(Vec<TokenWithSpan>, Variables), RuleError> {
    let mut vars: Vec<(String, Vec<TokenWithSpan>)> = Vec::new();
    let mut i = 1;
    loop {
        let Some(n) = next_sig(tokens, i) else {
            return Err(err(
                file,
                tokens.last(),
                "expected SELECT after the SET clause",
            ));
        };
        let Some(name) = variable(&tokens[n].token) else {
            return Err(err(
                file,
                Some(&tokens[n]),
                "SET takes @name = expression (iot-sql-set)",
            ));
        };
        let valid = !name.is_empty()
            && name.len() <= MAX_VARIABLE
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(err(
                file,
                Some(&tokens[n]),
                format!("@{name}: a variable name is letters, digits and _, up to {MAX_VARIABLE}"),
            ));
        }
        if vars.iter().any(|(v, _)| *v == name) {
            return Err(err(
                file,
                Some(&tokens[n]),
                format!("@{name} is set twice: variables are immutable"),
            ));
        }
        let eq = next_sig(tokens, n + 1).filter(|&j| tokens[j].token == Token::Eq);
        let Some(eq) = eq else {
            return Err(err(
                file,
                Some(&tokens[n]),
                format!("expected = after @{name}"),
            ));
        };
        // The expression runs to a comma or the SELECT at depth 0.
        let (mut depth, mut j, mut expr) = (0i32, eq + 1, Vec::new());
        let end = loop {
            let Some(t) = tokens.get(j) else {
                return Err(err(
                    file,
                    tokens.last(),
                    "expected SELECT after the SET clause",
                ));
            };
            match &t.token {
                Token::LParen | Token::LBracket | Token::LBrace => depth += 1,
                Token::RParen | Token::RBracket | Token::RBrace => depth -= 1,
                Token::Comma if depth == 0 => break j,
                Token::Word(w) if depth == 0 && w.keyword == Keyword::SELECT => break j,
                _ => {}
            }
            substitute(file, &mut expr, t, &vars)?;
            j += 1;
        };
        if !expr.iter().any(|t| !is_trivia(&t.token)) {
            return Err(err(
                file,
                Some(&tokens[eq]),
                format!("@{name} has no expression"),
            ));
        }
        vars.push((name, expr));
        if tokens[end].token == Token::Comma {
            i = end + 1;
            continue;
        }
        let mut body = Vec::with_capacity(tokens.len() - end);
        for t in &tokens[end..] {
            substitute(file, &mut body, t, &vars)?;
        }
        return Ok((body, vars));
    }
}

/// The output column of `SELECT VALUE x`: the row is that value ([`crate::batch::Row`]).
pub const VALUE_COLUMN: &str = "__sg_value";

/// `SELECT VALUE x FROM …` (iot-sql-select: the output is `x` itself, not an object) becomes
/// `SELECT x AS __sg_value FROM …`. Returns whether the statement selects a value.
fn select_value(
    file: &str,
    out: &mut Vec<Token>,
    body: &[TokenWithSpan],
) -> Result<bool, RuleError> {
    let Some(first) = (1..out.len()).find(|&j| !is_trivia(&out[j])) else {
        return Ok(false);
    };
    let is_value = word(&out[first])
        .is_some_and(|w| w.quote_style.is_none() && w.value.eq_ignore_ascii_case("value"));
    if !is_value {
        return Ok(false);
    }
    // `SELECT value FROM`, `SELECT value, t`, `SELECT value AS v`, `SELECT value.x`,
    // `SELECT value[0]`: a field named value (payloads often have one), since SELECT VALUE
    // needs an expression after it (`SELECT VALUE [a, b]` has a space before its Array).
    let touching = matches!(out.get(first + 1), Some(Token::Period | Token::LBracket));
    let next = (first + 1..out.len()).find(|&j| !is_trivia(&out[j]));
    let a_field = touching
        || next.is_none_or(|j| match &out[j] {
            Token::Comma => true,
            Token::Word(w) => w.keyword == Keyword::FROM || w.keyword == Keyword::AS,
            _ => false,
        });
    if a_field {
        return Ok(false);
    }
    let mut depth = 0;
    let mut from = None;
    for (j, t) in out.iter().enumerate().skip(first + 1) {
        match t {
            Token::LParen | Token::LBracket | Token::LBrace => depth += 1,
            Token::RParen | Token::RBracket | Token::RBrace => depth -= 1,
            Token::Comma if depth == 0 => {
                return Err(err(
                    file,
                    body.first(),
                    "SELECT VALUE takes one expression (iot-sql-select)",
                ))
            }
            Token::Word(w) if depth == 0 && w.keyword == Keyword::FROM => {
                from = Some(j);
                break;
            }
            _ => {}
        }
    }
    let Some(from) = from else {
        return Ok(false);
    };
    out.splice(
        from..from,
        [space(), ident("AS"), space(), ident(VALUE_COLUMN), space()],
    );
    out.remove(first);
    Ok(true)
}

/// `call` under `NOT` when `negated` (`NOT BETWEEN`, `NOT IN`).
fn negate(call: String, negated: bool) -> String {
    if negated {
        format!("{}({call})", crate::operators::Operator::Not.udf_name())
    } else {
        call
    }
}

/// `text` as a single-quoted SQL string literal.
pub(crate) fn text_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `sum(x)`, `avg(x)`, `min(x)`, `max(x)` with one plain argument, not yet wrapped: their
/// argument is taken by [`crate::value_functions::AGGREGATE_ARG_UDF`].
fn aggregate_over_values(f: &datafusion::sql::sqlparser::ast::Function) -> bool {
    use datafusion::sql::sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments};
    let name = f.name.to_string().to_ascii_lowercase();
    let FunctionArguments::List(l) = &f.args else {
        return false;
    };
    ["sum", "avg", "min", "max"].contains(&name.as_str())
        && f.filter.is_none()
        && f.over.is_none()
        && l.duplicate_treatment.is_none()
        && l.clauses.is_empty()
        && matches!(l.args.as_slice(), [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))]
            if !x.to_string().starts_with(crate::value_functions::AGGREGATE_ARG_UDF))
}

/// The IoT form of `e` as the text of a call, when it has one (the arms of
/// [`lower_operators`] other than the operators), or why `e` is refused.
fn iot_form(e: &datafusion::sql::sqlparser::ast::Expr) -> Option<Result<String, String>> {
    use crate::operators::Operator;
    use crate::value_functions::{
        AGGREGATE_ARG_UDF, ARRAY_UDF, CASE_UDF, CASE_WHEN_UDF, NULL_UDF, OBJECT_UDF,
    };
    use datafusion::sql::sqlparser::ast::{
        AccessExpr, Expr, FunctionArguments, Subscript, Value as SqlValue,
    };
    Some(match e {
        Expr::Value(v) if v.value == SqlValue::Null => Ok(format!("{NULL_UDF}()")),
        Expr::IsNull(_) | Expr::IsNotNull(_) => Err(format!(
            "`{e}`: IS NULL is not AWS IoT SQL; use isNull(x) for a null value or \
                 isUndefined(x) for a missing one"
        )),
        Expr::Function(f) if f.name.to_string() == USER_PROPERTIES_CALL => match &f.args {
            FunctionArguments::List(l) if l.args.len() == 1 => Ok(format!(
                "iot_get(iot_get({MQTT}, 'user_properties'), {})",
                l.args[0]
            )),
            _ => Err("get_user_properties() takes one key".into()),
        },
        Expr::Subquery(query) => crate::nested::lower(query),
        Expr::Function(f) if aggregate_over_values(f) => {
            let FunctionArguments::List(l) = &f.args else {
                return None;
            };
            let name = f.name.to_string().to_ascii_lowercase();
            Ok(format!(
                "{}({AGGREGATE_ARG_UDF}({}, '{name}'))",
                f.name, l.args[0]
            ))
        }
        Expr::CompoundFieldAccess { root, access_chain } => {
            let mut call = root.to_string();
            for access in access_chain.iter() {
                let keys: Vec<String> = match access {
                    AccessExpr::Subscript(Subscript::Index { index }) => {
                        vec![index.to_string()]
                    }
                    AccessExpr::Dot(Expr::Identifier(id)) => {
                        id.value.split('.').map(text_literal).collect()
                    }
                    AccessExpr::Dot(Expr::CompoundIdentifier(ids)) => ids
                        .iter()
                        .flat_map(|id| id.value.split('.'))
                        .map(text_literal)
                        .collect(),
                    other => {
                        return Some(Err(format!(
                            "`{e}`: {other} is not a field name or an index",
                            e = root
                        )));
                    }
                };
                for key in keys {
                    call = format!("iot_get({call}, {key})");
                }
            }
            Ok(call)
        }
        // Not on IoT SQL's operators page; built from the operators that are, so that they
        // take values of any type by the same tables.
        Expr::Between {
            expr,
            negated,
            low,
            high,
        } => {
            let call = format!(
                "{}({}({expr}, {low}), {}({expr}, {high}))",
                Operator::And.udf_name(),
                Operator::GtEq.udf_name(),
                Operator::LtEq.udf_name()
            );
            let call = negate(call, *negated);
            Ok(call)
        }
        Expr::InList {
            expr,
            list,
            negated,
        } => {
            let mut call = String::new();
            for item in list.iter() {
                let eq = format!("{}({expr}, {item})", Operator::Eq.udf_name());
                call = if call.is_empty() {
                    eq
                } else {
                    format!("{}({call}, {eq})", Operator::Or.udf_name())
                };
            }
            if call.is_empty() {
                return Some(Err(format!("`{e}`: IN takes at least one value")));
            }
            let call = negate(call, *negated);
            Ok(call)
        }
        Expr::Array(array) => {
            let items: Vec<String> = array.elem.iter().map(|x| x.to_string()).collect();
            Ok(format!("{ARRAY_UDF}({})", items.join(", ")))
        }
        Expr::Dictionary(fields) => {
            let args: Vec<String> = fields
                .iter()
                .map(|f| format!("{}, {}", text_literal(&f.key.value), f.value))
                .collect();
            Ok(format!("{OBJECT_UDF}({})", args.join(", ")))
        }
        Expr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            let mut args: Vec<String> = Vec::new();
            if let Some(v) = operand {
                args.push(v.to_string());
            }
            for w in conditions.iter() {
                args.push(w.condition.to_string());
                args.push(w.result.to_string());
            }
            if let Some(other) = else_result {
                args.push(other.to_string());
            }
            let udf = if operand.is_some() {
                CASE_UDF
            } else {
                CASE_WHEN_UDF
            };
            Ok(format!("{udf}({})", args.join(", ")))
        }
        _ => return None,
    })
}

/// Replace `e` with the expression `call` (a UDF call written out), or note why it did not parse.
fn lower(
    dialect: &GenericDialect,
    e: &mut datafusion::sql::sqlparser::ast::Expr,
    call: &str,
    failed: &mut Option<String>,
) {
    use datafusion::sql::sqlparser::parser::Parser;
    match Parser::new(dialect)
        .try_with_sql(call)
        .and_then(|mut p| p.parse_expr())
    {
        Ok(lowered) => *e = lowered,
        Err(err) => *failed = Some(err.to_string()),
    }
}

/// Whether a `*` in `body` means "every column" (after SELECT, DISTINCT, a comma or a period)
/// rather than multiplication or `count(*)`.
fn selects_star(body: &[TokenWithSpan]) -> bool {
    let mut previous: Option<&Token> = None;
    for t in body.iter().map(|t| &t.token).filter(|t| !is_trivia(t)) {
        if matches!(t, Token::Mul) {
            let star = match previous {
                Some(Token::Comma | Token::Period) => true,
                Some(Token::Word(w)) => matches!(
                    w.keyword,
                    Keyword::SELECT | Keyword::DISTINCT | Keyword::ALL
                ),
                _ => false,
            };
            if star {
                return true;
            }
        }
        previous = Some(t);
    }
    false
}

#[derive(Default)]
struct Rewrite {
    out: Vec<Token>,
    source: Option<String>,
    source_at: Option<TokenWithSpan>,
    columns: BTreeSet<String>,
    /// A `*` was a function's argument, now [`PAYLOAD`].
    payload_value: bool,
    /// `get_mqtt_property` or `get_user_properties` was called.
    mqtt_properties: bool,
    /// `sourceip()` was called.
    source_ip: bool,
    /// `traceid()` was called.
    trace_id: bool,
    /// What `accountid()` gives ([`Context::account_id`]).
    account_id: Option<String>,
}

/// Keywords that are SQL structure, never a payload field. Any other word (even one sqlparser
/// knows as a keyword, such as `temp`) may name a field.
const STRUCTURAL: &[Keyword] = &[
    Keyword::SELECT,
    Keyword::FROM,
    Keyword::WHERE,
    Keyword::GROUP,
    Keyword::BY,
    Keyword::ORDER,
    Keyword::HAVING,
    Keyword::LIMIT,
    Keyword::OFFSET,
    Keyword::AS,
    Keyword::AND,
    Keyword::OR,
    Keyword::NOT,
    Keyword::IS,
    Keyword::NULL,
    Keyword::TRUE,
    Keyword::FALSE,
    Keyword::CASE,
    Keyword::WHEN,
    Keyword::THEN,
    Keyword::ELSE,
    Keyword::END,
    Keyword::IN,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::BETWEEN,
    Keyword::DISTINCT,
    Keyword::ASC,
    Keyword::DESC,
    Keyword::INTERVAL,
    Keyword::INSERT,
    Keyword::INTO,
    Keyword::CAST,
    Keyword::ALL,
    Keyword::EXISTS,
    Keyword::NULLS,
    Keyword::UNION,
    Keyword::ESCAPE,
    Keyword::SIMILAR,
    Keyword::MILLISECOND,
    Keyword::SECOND,
    Keyword::MINUTE,
    Keyword::HOUR,
    Keyword::DAY,
];

/// The units of `INTERVAL '1' MINUTE`, keywords there only.
const TIME_UNITS: &[Keyword] = &[
    Keyword::MILLISECOND,
    Keyword::SECOND,
    Keyword::MINUTE,
    Keyword::HOUR,
    Keyword::DAY,
];

/// The functions of a message's metadata, rewritten here into its columns (`topic()` → the
/// topic column), never looked up in `functions`.
pub(crate) const METADATA_FUNCTIONS: &[&str] = &[
    "topic",
    "clientid",
    "principal",
    "timestamp",
    "newuuid",
    "thing_name",
    "sql_version",
    "sourceip",
    "traceid",
    "accountid",
];

impl Rewrite {
    fn run(&mut self, file: &str, body: &[TokenWithSpan]) -> Result<(), RuleError> {
        let mut i = 0;
        let mut depth = 0i32;
        // Paren depths at which a first()/last() call needs its ORDER BY.
        let mut ordered_calls: Vec<i32> = Vec::new();
        let mut after_as = false;
        // Paren depths of the cast() calls open here: their AS introduces the type.
        let mut casts: Vec<i32> = Vec::new();
        // Paren depths of the nested `SELECT VALUE`s open here.
        let mut value_selects: Vec<i32> = Vec::new();
        while i < body.len() {
            let t = &body[i].token;
            match t {
                Token::LParen => {
                    depth += 1;
                    self.out.push(t.clone());
                    i += 1;
                    continue;
                }
                Token::RParen => {
                    if ordered_calls.last() == Some(&depth) {
                        ordered_calls.pop();
                        self.out.extend([
                            space(),
                            ident("ORDER"),
                            space(),
                            ident("BY"),
                            space(),
                            ident(ORDER_PLACEHOLDER),
                        ]);
                    }
                    if casts.last() == Some(&depth) {
                        casts.pop();
                    }
                    depth -= 1;
                    self.out.push(t.clone());
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let Some(w) = word(t) else {
                if !is_trivia(t) {
                    after_as = false;
                }
                if let (Token::Mul, Some(encode)) = (t, self.star_is_an_argument()) {
                    // `encode(*, …)` takes the bytes as they came; any other function the
                    // payload as a value.
                    if encode {
                        self.out.push(ident(PAYLOAD));
                    } else {
                        self.out.extend([
                            ident(crate::value_functions::PAYLOAD_UDF),
                            Token::LParen,
                            ident(PAYLOAD),
                            Token::RParen,
                        ]);
                    }
                    self.payload_value = true;
                    i += 1;
                    continue;
                }
                self.out.push(t.clone());
                i += 1;
                continue;
            };
            let next = next_sig(body, i + 1);
            let next_tok = next.map(|j| &body[j].token);
            if w.keyword == Keyword::AS && casts.last() == Some(&depth) {
                // `cast(x AS Decimal)` is `iot_cast(x, 'decimal')`.
                let target = next
                    .and_then(|j| word(&body[j].token))
                    .and_then(|t| CastTarget::parse(&t.value));
                let Some(target) = target else {
                    return Err(err(
                        file,
                        Some(&body[next.unwrap_or(i)]),
                        format!(
                            "cast() takes one of these types after AS: {}",
                            CastTarget::KEYWORDS
                        ),
                    ));
                };
                self.out.push(Token::Comma);
                self.out
                    .push(Token::SingleQuotedString(target.name().to_owned()));
                i = next.map_or(i, |j| j + 1);
                continue;
            }
            // A nested query's `SELECT VALUE x FROM` is `SELECT x AS __sg_value FROM`
            // (crate::nested reads the alias).
            if w.keyword == Keyword::SELECT && depth > 0 {
                let value = next.filter(|&j| {
                    word(&body[j].token).is_some_and(|v| {
                        v.quote_style.is_none() && v.value.eq_ignore_ascii_case("value")
                    })
                });
                self.out.push(t.clone());
                if let Some(j) = value {
                    value_selects.push(depth);
                    i = j + 1;
                } else {
                    i += 1;
                }
                continue;
            }
            if w.keyword == Keyword::FROM && depth > 0 && value_selects.last() == Some(&depth) {
                value_selects.pop();
                self.out
                    .extend([space(), ident("AS"), space(), ident(VALUE_COLUMN), space()]);
            }
            if w.keyword == Keyword::FROM && depth == 0 && self.source.is_none() {
                i = self.source_clause(file, body, i, next)?;
                continue;
            }
            let call = matches!(next_tok, Some(Token::LParen));
            if w.quote_style.is_none()
                && call
                && (!STRUCTURAL.contains(&w.keyword) || w.keyword == Keyword::CAST)
            {
                let lower = w.value.to_ascii_lowercase();
                if lower == "get_mqtt_property" || lower == "get_user_properties" {
                    let at = (body, i, next.unwrap_or(i));
                    i = self.mqtt_property_call(file, at, lower == "get_user_properties")?;
                    continue;
                }
                if METADATA_FUNCTIONS.contains(&lower.as_str()) {
                    i = self.metadata_call(file, body, i, &lower, next.unwrap_or(i))?;
                    continue;
                }
                if lower == "cast" {
                    self.out.push(ident(crate::functions::CAST_UDF));
                    casts.push(depth + 1);
                    i += 1;
                    continue;
                }
                if lower == "first" || lower == "last" {
                    self.out.push(ident(if lower == "first" {
                        "first_value"
                    } else {
                        "last_value"
                    }));
                    ordered_calls.push(depth + 1);
                    i += 1;
                    continue;
                }
                // Another function call: IoT Core's function of that name, or refused.
                match crate::functions::lookup(&lower) {
                    Some(Function::Aggregate) => self.out.push(t.clone()),
                    Some(Function::Iot) => {
                        self.out.push(ident(&crate::functions::udf_name(&lower)))
                    }
                    Some(Function::Renamed(to)) => self.out.push(ident(to)),
                    Some(Function::External(service)) => {
                        return Err(err(
                            file,
                            Some(&body[i]),
                            format!(
                                "{}() calls {service}, which sitegate does not call from the edge",
                                w.value
                            ),
                        ))
                    }
                    Some(Function::NotYet(why)) => {
                        return Err(err(
                            file,
                            Some(&body[i]),
                            format!("{}() is not supported at the edge yet: {why}", w.value),
                        ))
                    }
                    None => {
                        return Err(err(
                            file,
                            Some(&body[i]),
                            format!("{}() is not an AWS IoT SQL function", w.value),
                        ))
                    }
                }
                i += 1;
                continue;
            }
            // The IoT SQL reference writes string literals in double quotes as well
            // (`WHERE s = "myValue"`); after AS a double-quoted word is still a name.
            if w.quote_style == Some('"') && !after_as {
                self.out.push(Token::SingleQuotedString(w.value.clone()));
                i += 1;
                continue;
            }
            // A time unit is a keyword only as `INTERVAL '1' MINUTE`'s unit: elsewhere `hour`
            // or `day` is a field, as payloads often have.
            let unit = TIME_UNITS.contains(&w.keyword);
            if w.quote_style.is_some()
                || !STRUCTURAL.contains(&w.keyword)
                || (unit && !self.after_interval_literal())
            {
                i = self.column(body, i, w, after_as);
                after_as = false;
                continue;
            }
            after_as = w.keyword == Keyword::AS;
            self.out.push(t.clone());
            i += 1;
        }
        Ok(())
    }

    /// Whether the last tokens written are `INTERVAL '…'`, so a time unit comes next.
    fn after_interval_literal(&self) -> bool {
        let mut sig = self.out.iter().rev().filter(|t| !is_trivia(t));
        matches!(
            (sig.next(), sig.next()),
            (Some(Token::SingleQuotedString(_)), Some(Token::Word(w))) if w.keyword == Keyword::INTERVAL
        )
    }

    /// Whether a `*` about to be written is a function's first argument (`encode(*, 'base64')`,
    /// `get(*, 'order')`): it follows `(` of a call other than `count(*)`. `Some(true)` when that
    /// call is `encode`.
    fn star_is_an_argument(&self) -> Option<bool> {
        let mut sig = self.out.iter().rev().filter(|t| !is_trivia(t));
        match (sig.next(), sig.next()) {
            (Some(Token::LParen), Some(Token::Word(f)))
                if !f.value.eq_ignore_ascii_case("count") =>
            {
                // The name is written already, lowered to its UDF's.
                Some(
                    f.value.eq_ignore_ascii_case("encode")
                        || f.value == crate::functions::udf_name("encode"),
                )
            }
            _ => None,
        }
    }

    /// `FROM 'filter'` at `i` (its filter at `next`): the rule's source, and the table in SQL.
    /// Returns the index after it.
    fn source_clause(
        &mut self,
        file: &str,
        body: &[TokenWithSpan],
        i: usize,
        next: Option<usize>,
    ) -> Result<usize, RuleError> {
        let Some(j) = next else {
            return Err(err(file, Some(&body[i]), "FROM needs a topic filter"));
        };
        let filter = match &body[j].token {
            Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => s.clone(),
            Token::Word(Word {
                value,
                quote_style: Some(_),
                ..
            }) => value.clone(),
            _ => {
                return Err(err(
                    file,
                    Some(&body[j]),
                    "FROM takes a quoted topic filter, e.g. FROM 'dt/+/temp'",
                ))
            }
        };
        self.source = Some(filter);
        self.source_at = Some(body[j].clone());
        self.out
            .extend([body[i].token.clone(), space(), ident("messages")]);
        Ok(j + 1)
    }

    /// `get_mqtt_property('content_type')` becomes `iot_get(__mqtt, 'content_type')`, its name
    /// checked here; `get_user_properties(key)` becomes [`USER_PROPERTIES_CALL`], which
    /// `lower_operators` makes `iot_get(iot_get(__mqtt, 'user_properties'), key)`: the key's
    /// values, an Array.
    /// Returns the index after what it consumed.
    fn mqtt_property_call(
        &mut self,
        file: &str,
        (body, i, open): (&[TokenWithSpan], usize, usize),
        user: bool,
    ) -> Result<usize, RuleError> {
        self.mqtt_properties = true;
        if user {
            // Its argument is any expression: the call is completed on the parsed statement.
            self.out.push(ident(USER_PROPERTIES_CALL));
            return Ok(i + 1);
        }
        let arg = next_sig(body, open + 1);
        let name = arg.and_then(|a| match &body[a].token {
            Token::SingleQuotedString(s) => Some(s.clone()),
            Token::Word(w) if w.quote_style == Some('"') => Some(w.value.clone()),
            _ => None,
        });
        let close = arg
            .and_then(|a| next_sig(body, a + 1))
            .filter(|&c| body[c].token == Token::RParen);
        let valid = name
            .as_deref()
            .filter(|n| MQTT_PROPERTIES.contains(n))
            .zip(close);
        let Some((property, close)) = valid else {
            let shown = name.as_ref().map(|n| format!("{n:?}")).unwrap_or_default();
            return Err(err(
                file,
                Some(&body[i]),
                format!(
                    "get_mqtt_property({shown}): the property is one of {}",
                    MQTT_PROPERTIES.join(", ")
                ),
            ));
        };
        self.out.extend([
            ident("iot_get"),
            Token::LParen,
            ident(MQTT),
            Token::Comma,
            Token::SingleQuotedString(property.to_string()),
            Token::RParen,
        ]);
        Ok(close + 1)
    }

    /// A metadata function (`topic()`, `clientid()`, `topic(n)`, …) at `i`, its `(` at `open`:
    /// the column or expression it stands for. Returns the index after its `)`.
    fn metadata_call(
        &mut self,
        file: &str,
        body: &[TokenWithSpan],
        i: usize,
        lower: &str,
        open: usize,
    ) -> Result<usize, RuleError> {
        let w = word(&body[i].token).map(|w| w.value.as_str()).unwrap_or("");
        let arg = next_sig(body, open + 1);
        let (replacement, end) = match (lower, arg.map(|a| &body[a].token)) {
            (_, Some(Token::RParen)) => {
                let r = match lower {
                    "topic" => vec![ident(TOPIC)],
                    "clientid" | "thing_name" => vec![ident(THING)],
                    "principal" => vec![ident(CERT_ID)],
                    "timestamp" => vec![ident(RECEIVED_AT)],
                    "sourceip" => {
                        self.source_ip = true;
                        vec![ident(SOURCE_IP)]
                    }
                    "traceid" => {
                        self.trace_id = true;
                        vec![ident(TRACE_ID)]
                    }
                    "accountid" => match &self.account_id {
                        Some(account) => vec![Token::SingleQuotedString(account.clone())],
                        None => {
                            return Err(err(
                                file,
                                Some(&body[i]),
                                format!(
                                    "{w}(): the account that owns the rules is not known at \
                                     the edge; set [rules] account_id"
                                ),
                            ))
                        }
                    },
                    // The version whose semantics sitegate implements (iot-sql-functions).
                    "sql_version" => vec![Token::SingleQuotedString("2016-03-23".into())],
                    _ => vec![ident("uuid"), Token::LParen, Token::RParen],
                };
                (r, arg.unwrap_or(open))
            }
            ("topic", Some(Token::Number(n, _))) => {
                let close = next_sig(body, arg.unwrap_or(open) + 1);
                if !close.is_some_and(|c| matches!(body[c].token, Token::RParen)) {
                    return Err(err(file, Some(&body[i]), "topic(n) takes one level number"));
                }
                let level: u64 = n
                    .parse()
                    .map_err(|_| err(file, Some(&body[i]), "topic(n) takes a whole number"))?;
                if level == 0 {
                    return Err(err(file, Some(&body[i]), "topic levels count from 1"));
                }
                let r = vec![
                    ident("split_part"),
                    Token::LParen,
                    ident(TOPIC),
                    Token::Comma,
                    space(),
                    Token::SingleQuotedString("/".into()),
                    Token::Comma,
                    space(),
                    Token::Number(level.to_string(), false),
                    Token::RParen,
                ];
                (r, close.unwrap_or(open))
            }
            _ => {
                return Err(err(
                    file,
                    Some(&body[i]),
                    format!("{w}() takes no arguments here"),
                ))
            }
        };
        self.out.extend(replacement);
        Ok(end + 1)
    }

    /// A column name at `i`: `a.b.c` becomes `"a.b.c"` unless it names the table; names read
    /// (not those after AS) are remembered. Returns the index after it.
    fn column(&mut self, body: &[TokenWithSpan], i: usize, w: &Word, after_as: bool) -> usize {
        let mut parts = vec![w.value.clone()];
        let mut j = i + 1;
        while j + 1 < body.len() && matches!(body[j].token, Token::Period) {
            match &body[j + 1].token {
                Token::Word(part) => {
                    parts.push(part.value.clone());
                    j += 2;
                }
                _ => break,
            }
        }
        if parts.len() > 1 && parts[0] != "messages" {
            let name = parts.join(".");
            if !after_as {
                self.columns.insert(name.clone());
            }
            self.out.push(quoted(&name));
            return j;
        }
        if !after_as && !w.value.starts_with("__") {
            self.columns.insert(w.value.clone());
        }
        self.out.push(body[i].token.clone());
        i + 1
    }
}

fn interval_ms(file: &str, at: &TokenWithSpan, args: &[Token]) -> Result<u64, RuleError> {
    // INTERVAL '1' MINUTE  or  INTERVAL '1 minute'
    let sig: Vec<&Token> = args.iter().filter(|t| !is_trivia(t)).collect();
    let text = match sig.as_slice() {
        [Token::Word(w), Token::SingleQuotedString(n), Token::Word(unit)]
            if w.keyword == Keyword::INTERVAL =>
        {
            format!("{n} {}", unit.value)
        }
        [Token::Word(w), Token::SingleQuotedString(s)] if w.keyword == Keyword::INTERVAL => {
            s.clone()
        }
        _ => {
            return Err(err(
                file,
                Some(at),
                "window sizes are written INTERVAL '1' MINUTE",
            ))
        }
    };
    let mut it = text.split_whitespace();
    let n: u64 = it.next().and_then(|n| n.parse().ok()).ok_or_else(|| {
        err(
            file,
            Some(at),
            format!("interval {text:?} needs a whole number"),
        )
    })?;
    let unit = it.next().unwrap_or("second").to_ascii_lowercase();
    let ms = match unit.trim_end_matches('s') {
        "millisecond" => 1,
        "second" => 1_000,
        "minute" => 60_000,
        "hour" => 3_600_000,
        "day" => 86_400_000,
        _ => {
            return Err(err(
                file,
                Some(at),
                format!("unknown interval unit {unit:?}"),
            ))
        }
    };
    if n == 0 {
        return Err(err(
            file,
            Some(at),
            "a window interval must be longer than 0",
        ));
    }
    Ok(n * ms)
}

/// Take `TUMBLE(…)`/`HOP(…)` out of the GROUP BY list.
fn extract_window(
    file: &str,
    mut out: Vec<Token>,
    body: &[TokenWithSpan],
) -> Result<(Vec<Token>, Option<WindowSpec>), RuleError> {
    let at = body.first();
    let pos = out.iter().position(|t| {
        word(t).is_some_and(|w| matches!(w.value.to_ascii_uppercase().as_str(), "TUMBLE" | "HOP"))
    });
    let Some(start) = pos else {
        return Ok((out, None));
    };
    let hop = word(&out[start]).is_some_and(|w| w.value.eq_ignore_ascii_case("HOP"));
    let open = (start + 1..out.len())
        .find(|&j| !is_trivia(&out[j]))
        .filter(|&j| matches!(out[j], Token::LParen));
    let Some(open) = open else {
        return Err(err(file, at, "TUMBLE/HOP need arguments"));
    };
    let Some((args, close)) = call_args(&out, open) else {
        return Err(err(file, at, "unclosed TUMBLE/HOP"));
    };
    let at_ref = at.ok_or_else(|| err(file, None, "empty statement"))?;
    let spec = window_spec(file, at_ref, hop, args)?;
    remove_call(&mut out, start, close);
    Ok((out, Some(spec)))
}

/// The arguments of the call whose `(` is at `open`, split at its top-level commas, and the
/// index of its `)`; `None` when it is not closed.
fn call_args(out: &[Token], open: usize) -> Option<(Vec<Vec<Token>>, usize)> {
    let mut depth = 0;
    let mut args: Vec<Vec<Token>> = vec![Vec::new()];
    for (j, t) in out.iter().enumerate().skip(open) {
        match t {
            Token::LParen => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    return Some((args, j));
                }
            }
            Token::Comma if depth == 1 => {
                args.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(a) = args.last_mut() {
            a.push(t.clone());
        }
    }
    None
}

/// The window that TUMBLE (`hop` false) or HOP's arguments describe.
fn window_spec(
    file: &str,
    at_ref: &TokenWithSpan,
    hop: bool,
    mut args: Vec<Vec<Token>>,
) -> Result<WindowSpec, RuleError> {
    // Optional first argument: the event-time column (or timestamp() for processing time).
    let first_is_interval = args
        .first()
        .and_then(|a| a.iter().find(|t| !is_trivia(t)))
        .and_then(word)
        .is_some_and(|w| w.keyword == Keyword::INTERVAL);
    let time_column = if first_is_interval {
        None
    } else {
        let col = args.remove(0);
        let names: Vec<String> = col
            .iter()
            .filter(|t| !is_trivia(t))
            .filter_map(word)
            .map(|w| w.value.clone())
            .collect();
        match names.as_slice() {
            [c] if c == RECEIVED_AT => None,
            [c] => Some(c.clone()),
            _ => {
                return Err(err(
                    file,
                    Some(at_ref),
                    "the window's time argument is a column name or timestamp()",
                ))
            }
        }
    };
    let intervals = args
        .iter()
        .map(|a| interval_ms(file, at_ref, a))
        .collect::<Result<Vec<_>, _>>()?;
    let (size_ms, slide_ms, lateness_ms) = match (hop, intervals.as_slice()) {
        (false, [size]) => (*size, *size, 0),
        (false, [size, late]) => (*size, *size, *late),
        (true, [size, slide]) => (*size, *slide, 0),
        (true, [size, slide, late]) => (*size, *slide, *late),
        _ => {
            return Err(err(
                file,
                Some(at_ref),
                "TUMBLE([time,] size [, lateness]) or HOP([time,] size, slide [, lateness])",
            ))
        }
    };
    if slide_ms > size_ms {
        return Err(err(
            file,
            Some(at_ref),
            "a hopping window's slide must not exceed its size",
        ));
    }
    Ok(WindowSpec {
        size_ms,
        slide_ms,
        time_column,
        lateness_ms,
    })
}

/// Removes the window call `start..=close` and one adjacent comma from the statement, and its
/// GROUP BY if nothing is left of it.
fn remove_call(out: &mut Vec<Token>, start: usize, close: usize) {
    let before = (0..start).rev().find(|&j| !is_trivia(&out[j]));
    let after = (close + 1..out.len()).find(|&j| !is_trivia(&out[j]));
    let (from, to) = match (before.map(|b| &out[b]), after.map(|a| &out[a])) {
        (Some(Token::Comma), _) => (before.unwrap_or(start), close),
        (_, Some(Token::Comma)) => (start, after.unwrap_or(close)),
        _ => (start, close),
    };
    out.drain(from..=to);
    // GROUP BY with nothing after it (before HAVING/ORDER/LIMIT or the end) goes too.
    if let Some(g) = out
        .iter()
        .position(|t| word(t).is_some_and(|w| w.keyword == Keyword::GROUP))
    {
        let by = (g + 1..out.len()).find(|&j| !is_trivia(&out[j]));
        let next = by.and_then(|b| (b + 1..out.len()).find(|&j| !is_trivia(&out[j])));
        let empty = match next.map(|n| &out[n]) {
            None => true,
            Some(t) => word(t).is_some_and(|w| {
                matches!(w.keyword, Keyword::HAVING | Keyword::ORDER | Keyword::LIMIT)
            }),
        };
        if empty {
            out.drain(g..=by.unwrap_or(g));
        }
    }
}

/// One substitution-template expression of `sink`, rewritten like a select item of the
/// statement it joins (whose `rewrite` learns the fields and metadata it reads), its `@v` the
/// statement's SET variables (iot-sql-set: "Reference these variables in … substitution
/// templates"). Its errors name the sink and the expression: the text is the configuration's,
/// not the rule file's.
fn template_expression(
    (file, at, sink): (&str, Option<&TokenWithSpan>, &str),
    expr: &str,
    vars: &[(String, Vec<TokenWithSpan>)],
    rewrite: &mut Rewrite,
) -> Result<Vec<Token>, RuleError> {
    let fail = |reason: String| {
        err(
            file,
            at,
            format!("sink {sink:?}: its template's `${{{expr}}}`: {reason}"),
        )
    };
    let raw = Tokenizer::new(&GenericDialect {}, expr)
        .tokenize_with_location()
        .map_err(|e| fail(e.message))?;
    let mut tokens = Vec::with_capacity(raw.len());
    for t in &raw {
        substitute(file, &mut tokens, t, vars).map_err(|e| fail(e.reason))?;
    }
    let mut depth = 0i32;
    for t in &raw {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Comma if depth == 0 => return Err(fail("one expression per `${…}`".into())),
            Token::Word(w) if depth == 0 && w.quote_style.is_none() => {
                if matches!(w.keyword, Keyword::FROM | Keyword::SELECT | Keyword::WHERE) {
                    return Err(fail("a template holds one expression".into()));
                }
            }
            _ => {}
        }
    }
    let mut r = Rewrite {
        account_id: rewrite.account_id.clone(),
        ..Rewrite::default()
    };
    r.run(file, &tokens).map_err(|e| fail(e.reason))?;
    rewrite.columns.extend(r.columns);
    rewrite.payload_value |= r.payload_value;
    rewrite.mqtt_properties |= r.mqtt_properties;
    rewrite.source_ip |= r.source_ip;
    rewrite.trace_id |= r.trace_id;
    Ok(r.out)
}

/// Where the select list ends: the top-level FROM.
fn top_level_from(out: &[Token]) -> Option<usize> {
    let mut depth = 0;
    for (j, t) in out.iter().enumerate() {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w) if depth == 0 && w.keyword == Keyword::FROM => return Some(j),
            _ => {}
        }
    }
    None
}

/// Append the identity columns to the select list (before the top-level FROM).
fn append_identity(out: &mut Vec<Token>, aggregated: bool) {
    let Some(from) = top_level_from(out) else {
        return;
    };
    let grouped_by_thing = aggregated
        && out
            .iter()
            .any(|t| word(t).is_some_and(|w| w.value == THING))
        && {
            // Only when the thing is a group key; otherwise an aggregate spans devices.
            let g = out
                .iter()
                .position(|t| word(t).is_some_and(|w| w.keyword == Keyword::GROUP));
            g.is_some_and(|g| {
                out[g..]
                    .iter()
                    .any(|t| word(t).is_some_and(|w| w.value == THING))
            })
        };
    let cols: Vec<(String, &str)> = if !aggregated {
        vec![
            (THING.into(), "__sg_thing"),
            (CERT_ID.into(), "__sg_cert_id"),
            (TOPIC.into(), "__sg_topic"),
            (RECEIVED_AT.into(), "__sg_received_at"),
        ]
    } else if grouped_by_thing {
        vec![
            (THING.into(), "__sg_thing"),
            (format!("max({CERT_ID})"), "__sg_cert_id"),
        ]
    } else {
        Vec::new()
    };
    let mut extra: Vec<Token> = Vec::new();
    for (expr, alias) in cols {
        extra.push(Token::Comma);
        extra.push(space());
        extra.push(ident(&expr));
        extra.extend([space(), ident("AS"), space(), ident(alias)]);
    }
    extra.push(space());
    out.splice(from..from, extra);
}

/// The first token at or after `from` that is not whitespace or a comment.
fn next_sig(body: &[TokenWithSpan], from: usize) -> Option<usize> {
    (from..body.len()).find(|&j| !is_trivia(&body[j].token))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn iot_core_rule_becomes_datafusion_sql() {
        let r = parse("alerts", "alerts.sql", "-- hot freezers\nINSERT INTO alerts\nSELECT thing_name() AS thing, principal() AS cert, temp, topic(2) AS zone, a.b AS nested\nFROM 'dt/+/freezer'\nWHERE temp > -10").unwrap();
        let s = &r.statements[0];
        assert_eq!(s.sink, "alerts");
        assert_eq!(s.source, "dt/+/freezer");
        assert!(s.sql.contains("__thing AS thing"), "{}", s.sql);
        assert!(
            s.sql.contains("split_part(__topic, '/', 2) AS zone"),
            "{}",
            s.sql
        );
        assert!(s.sql.contains("\"a.b\" AS nested"), "{}", s.sql);
        assert!(s.sql.contains("FROM messages"), "{}", s.sql);
        assert!(s.sql.contains("__sg_thing"), "{}", s.sql);
        assert!(s.columns.contains("temp") && s.columns.contains("a.b"));
        assert!(
            !s.columns.contains("thing"),
            "aliases are not columns: {:?}",
            s.columns
        );
        assert_eq!(s.line, 2);
        assert!(!s.whole_payload);
    }

    #[test]
    fn star_means_the_whole_payload_but_not_multiplication_or_count() {
        let whole = |select: &str| {
            let text = format!("INSERT INTO out SELECT {select} FROM 'x'");
            parse("r", "r.sql", &text).unwrap().statements[0].whole_payload
        };
        assert!(whole("*"));
        assert!(whole("thing_name() AS thing, *"));
        assert!(whole("messages.*"));
        assert!(!whole("temp * 2 AS double"));
        assert!(!whole("count(*) AS n"));
        assert!(!whole("temp"));
    }

    #[test]
    fn emqx_double_quoted_source_and_several_statements() {
        let r = parse(
            "two",
            "two.sql",
            "INSERT INTO a SELECT * FROM \"t/#\";\nINSERT INTO b SELECT x FROM \"t/#\" WHERE x = 1",
        )
        .unwrap();
        assert_eq!(r.statements.len(), 2);
        assert_eq!(r.statements[1].sink, "b");
        assert_eq!(r.statements[1].source, "t/#");
    }

    #[test]
    fn windows_leave_the_group_list() {
        let r = parse("w", "w.sql", "INSERT INTO s SELECT thing_name() AS thing, avg(temp) AS t, last(temp) AS latest FROM 'dt/#' GROUP BY thing_name(), TUMBLE(ts, INTERVAL '1' MINUTE, INTERVAL '5' SECOND)").unwrap();
        let s = &r.statements[0];
        assert_eq!(
            s.window,
            Some(WindowSpec {
                size_ms: 60_000,
                slide_ms: 60_000,
                time_column: Some("ts".into()),
                lateness_ms: 5_000
            })
        );
        assert!(s.sql.contains("GROUP BY __thing"), "{}", s.sql);
        assert!(!s.sql.to_uppercase().contains("TUMBLE"), "{}", s.sql);
        assert!(
            s.sql.contains("last_value(temp ORDER BY \"ts\")"),
            "{}",
            s.sql
        );
        let hop = parse("h", "h.sql", "INSERT INTO s SELECT count(*) AS n FROM 'dt/#' GROUP BY HOP(INTERVAL '10' SECOND, INTERVAL '5' SECOND)").unwrap();
        let s = &hop.statements[0];
        assert_eq!(
            s.window
                .as_ref()
                .map(|w| (w.size_ms, w.slide_ms, w.time_column.clone())),
            Some((10_000, 5_000, None))
        );
        assert!(!s.sql.contains("GROUP"), "{}", s.sql);
    }

    #[test]
    fn errors_carry_file_line_and_column() {
        let e = parse("bad", "bad.sql", "INSERT INTO a\nSELECT x FROM dt").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("bad.sql", 2));
        assert!(e.reason.contains("quoted topic filter"), "{e}");
        let e = parse("bad", "bad.sql", "SELECT 1").unwrap_err();
        assert!(e.reason.contains("INSERT INTO"), "{e}");
        let e = parse("bad", "bad.sql", "INSERT INTO a SELECT x FROM 'dt/#/x'").unwrap_err();
        assert!(e.reason.contains("not an MQTT topic filter"), "{e}");
        assert_eq!(e.column, 29);
    }

    #[test]
    fn directives_declare_types_and_the_error_sink() {
        let r = parse("d", "d.sql", "-- @schema temp DOUBLE, zone TEXT\n-- @error_sink errors\nINSERT INTO a SELECT temp FROM 'x'").unwrap();
        assert_eq!(
            r.declared,
            vec![
                ("temp".into(), ColumnType::Double),
                ("zone".into(), ColumnType::Text)
            ]
        );
        assert_eq!(r.error_sink.as_deref(), Some("errors"));
    }
}
