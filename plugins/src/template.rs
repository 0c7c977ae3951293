//! `${…}` templates for partition keys and topics.
//!
//! Parsed once when the sink is configured; rendering a record is then a walk over parts with
//! no parsing. The message's identity is rendered from the record: `thing_name`, `cert_id`,
//! `topic`, `topic(n)` (1-based level), `site`, `rule`, `record_id`, and AWS IoT's forms of
//! them (the `iot-substitution-templates` page): `${topic()}`, `${topic(n)}`, `${clientid()}`
//! (the thing name: a device's client id must be its thing name), `${principal()}` (the
//! certificate id), `${timestamp()}` (when the gateway received the message, which stays the
//! same when a record is resent after an outage) and `${newuuid()}` (a random version 4 UUID
//! each time a record is rendered, as the page's Kinesis partition-key example uses it).
//!
//! Anything else is an IoT SQL expression (`${upper(zone)}`, `${coords.lat}`,
//! `${get(*, 'order')}`). As on that page, it is "evaluated separately from the SELECT
//! statement" against the original message: the rule engine computes [`Template::expressions`]
//! as extra columns of every statement writing to the sink, and the record carries the results
//! ([`crate::Entry::template_values`]), in order. A record without them (a direct route, whose
//! payload is the original message; a windowed statement, whose row comes from many; the error
//! sink's records) renders a field name from its payload, and the configuration refuses any
//! other expression for such a sink.

use serde_json::Value;

use crate::record::Record;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
    /// The expressions' texts, in the order of [`Part::Expression`]'s indexes.
    expressions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    ThingName,
    CertId,
    Topic,
    TopicLevel(usize),
    Site,
    Rule,
    RecordId,
    ReceivedAt,
    NewUuid,
    /// The `index`-th expression; `path` when it is a field name (`a.b` is `["a", "b"]`), read
    /// from the payload when the record carries no values.
    Expression {
        index: usize,
        path: Option<Vec<String>>,
    },
}

/// The most `${…}` expressions one template may have.
pub const MAX_EXPRESSIONS: usize = 8;

impl Template {
    /// Parse `source`; the error names the offending part.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut expressions: Vec<String> = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = closing_brace(after)
                .ok_or_else(|| format!("template {source:?}: `${{` without a closing `}}`"))?;
            let text = after[..end].trim();
            let part = match Self::identity(source, text)? {
                Some(p) => p,
                None => {
                    // The same expression twice is computed once.
                    let index = match expressions.iter().position(|e| e == text) {
                        Some(i) => i,
                        None => {
                            expressions.push(text.to_string());
                            expressions.len() - 1
                        }
                    };
                    if expressions.len() > MAX_EXPRESSIONS {
                        return Err(format!(
                            "template {source:?}: more than {MAX_EXPRESSIONS} expressions"
                        ));
                    }
                    let path =
                        is_field_path(text).then(|| text.split('.').map(str::to_string).collect());
                    Part::Expression { index, path }
                }
            };
            parts.push(part);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
            expressions,
        })
    }

    /// The part for one of the identity forms the record carries; `None` for an expression.
    fn identity(source: &str, name: &str) -> Result<Option<Part>, String> {
        Ok(Some(match name {
            "thing_name" => Part::ThingName,
            "cert_id" => Part::CertId,
            "topic" => Part::Topic,
            "site" => Part::Site,
            "rule" => Part::Rule,
            "record_id" => Part::RecordId,
            // AWS IoT's forms (see the module docs).
            "topic()" => Part::Topic,
            "clientid()" | "thing_name()" => Part::ThingName,
            "principal()" => Part::CertId,
            "timestamp()" => Part::ReceivedAt,
            "newuuid()" => Part::NewUuid,
            "" => return Err(format!("template {source:?}: empty `${{}}`")),
            _ => {
                let Some(level) = name
                    .strip_prefix("topic(")
                    .and_then(|r| r.strip_suffix(')'))
                    .filter(|l| l.trim().chars().all(|c| c.is_ascii_digit()))
                else {
                    return Ok(None);
                };
                let n: usize = level.trim().parse().map_err(|_| {
                    format!("template {source:?}: `topic({level})` needs a level number")
                })?;
                if n == 0 {
                    return Err(format!("template {source:?}: topic levels count from 1"));
                }
                Part::TopicLevel(n)
            }
        }))
    }

    /// A template that renders `text` as is.
    pub fn literal(text: &str) -> Self {
        Template {
            source: text.replace('$', "$$"),
            parts: vec![Part::Literal(text.to_string())],
            expressions: Vec::new(),
        }
    }

    /// The text the template was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Its IoT SQL expressions, each once, in the order a record's
    /// [`crate::Entry::template_values`] hold their values.
    pub fn expressions(&self) -> &[String] {
        &self.expressions
    }

    /// Render for `record`. Its payload is parsed only for a field name the record carries no
    /// value of.
    pub fn render(&self, record: &Record, site: &str) -> String {
        let mut out = String::with_capacity(64);
        // Values computed for another template (records spooled before it changed) are not
        // this one's.
        let values = (record.template_values.len() == self.expressions.len())
            .then_some(&record.template_values);
        let payload = match values {
            None if self
                .parts
                .iter()
                .any(|p| matches!(p, Part::Expression { path: Some(_), .. })) =>
            {
                record.payload_json()
            }
            _ => None,
        };
        let payload = payload.as_ref();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::ThingName => out.push_str(&record.thing_name),
                Part::CertId => out.push_str(&record.cert_id),
                Part::Topic => out.push_str(&record.topic),
                Part::TopicLevel(n) => {
                    out.push_str(record.topic.split('/').nth(n - 1).unwrap_or_default())
                }
                Part::Site => out.push_str(site),
                Part::Rule => out.push_str(&record.rule),
                Part::RecordId => out.push_str(&record.id.to_string()),
                Part::ReceivedAt => out.push_str(&record.received_at_ms.to_string()),
                Part::NewUuid => new_uuid_into(&mut out),
                Part::Expression { index, path } => match (values, path) {
                    (Some(v), _) => out.push_str(v.get(*index).map_or("", String::as_str)),
                    (None, Some(path)) => {
                        match payload.and_then(|p| path.iter().try_fold(p, |v, key| v.get(key))) {
                            Some(Value::String(s)) => out.push_str(s),
                            Some(Value::Null) | None => {}
                            Some(other) => out.push_str(&other.to_string()),
                        }
                    }
                    (None, None) => {}
                },
            }
        }
        out
    }
}

/// Whether a template expression is a payload field's name (`zone`, `coords.lat`): what a
/// record no rule computed values for can still render, from its payload.
pub fn is_field_path(expr: &str) -> bool {
    expr.split('.').all(|k| {
        k.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Where the `}` closing a `${` is in `after` (the text after `${`): the first `}` outside
/// quotes and Object literals' braces, so `${get({'a': 1}, 'a')}` is one expression.
fn closing_brace(after: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for (i, c) in after.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '{') => depth += 1,
            (None, '}') if depth == 0 => return Some(i),
            (None, '}') => depth -= 1,
            _ => {}
        }
    }
    None
}

/// A random (version 4) UUID in its hyphenated lowercase form.
fn new_uuid_into(out: &mut String) {
    uuid_v4_into(rand::random(), out);
}

/// `random` as a version 4 UUID (RFC 9562 §5.4: its version and variant bits set) in its
/// hyphenated lowercase form: `newuuid()` here, and the rules' `traceid()`.
pub fn uuid_v4(random: u128) -> String {
    let mut out = String::with_capacity(36);
    uuid_v4_into(random, &mut out);
    out
}

fn uuid_v4_into(random: u128, out: &mut String) {
    let mut b = random.to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        use std::fmt::Write as _;
        let _ = write!(out, "{byte:02x}");
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Template::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::record::sample;

    #[test]
    fn renders_identity_topic_levels_and_columns() {
        let t = Template::parse("sitegate/${site}/${thing_name}/${topic(3)}/${zone}").unwrap();
        let rec = sample(1, "freezer-4", r#"{"zone":"B","t":-18}"#);
        assert_eq!(
            t.render(&rec, "plant-7"),
            "sitegate/plant-7/freezer-4/temp/B"
        );
    }

    /// iot-substitution-templates: the page's `${topic()}/republish`, and the other IoT forms
    /// whose value a record carries.
    #[test]
    fn aws_iot_forms_render_from_the_record() {
        let rec = sample(1, "freezer-4", r#"{"coords":{"latitude":47.6},"t":-18}"#);
        let t = Template::parse("${topic()}/republish").unwrap();
        assert_eq!(t.render(&rec, "s"), format!("{}/republish", rec.topic));
        let t = Template::parse(
            "${clientid()}|${principal()}|${timestamp()}|${coords.latitude}|${coords.nope}",
        )
        .unwrap();
        assert_eq!(
            t.render(&rec, "s"),
            format!("freezer-4|{}|{}|47.6|", rec.cert_id, rec.received_at_ms)
        );
        // The page's Kinesis example: `"partitionKey": "${newuuid()}"`.
        let t = Template::parse("${newuuid()}").unwrap();
        let (a, b) = (t.render(&rec, "s"), t.render(&rec, "s"));
        assert_ne!(a, b, "a new one each time");
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert_eq!(&a[14..15], "4", "version 4: {a}");
        assert!("89ab".contains(&a[19..20]), "RFC variant: {a}");
    }

    /// iot-substitution-templates: anything but the identity forms is an expression the rule
    /// engine evaluates against the original message; the record carries the values in the
    /// order of `expressions()`, each expression once.
    #[test]
    fn expressions_render_from_the_values_a_rule_computed() {
        let t = Template::parse(
            "${topic()}/${upper(zone)}/${coords.lat}/${get({'a': '}'}, 'a')}/${upper(zone)}",
        )
        .unwrap();
        assert_eq!(
            t.expressions(),
            ["upper(zone)", "coords.lat", "get({'a': '}'}, 'a')"]
        );
        let mut rec = sample(1, "f", r#"{"coords":{"lat":5}}"#);
        rec.entry.template_values = vec!["B".into(), "47.6".into(), "}".into()];
        assert_eq!(t.render(&rec, "s"), format!("{}/B/47.6/}}/B", rec.topic));
        // No values (a route's record, a window's row): a field name is read from the
        // payload, another expression renders empty; so do values made for another template.
        rec.entry.template_values.clear();
        assert_eq!(t.render(&rec, "s"), format!("{}//5//", rec.topic));
        rec.entry.template_values = vec!["x".into()];
        assert_eq!(t.render(&rec, "s"), format!("{}//5//", rec.topic));
        assert!(Template::parse("${topic(2)}")
            .unwrap()
            .expressions()
            .is_empty());
        let many: String = (0..=MAX_EXPRESSIONS)
            .map(|i| format!("${{f{i}}}"))
            .collect();
        assert!(Template::parse(&many).unwrap_err().contains("more than"));
    }

    #[test]
    fn missing_levels_and_columns_render_empty() {
        let t = Template::parse("${topic(9)}-${nope}").unwrap();
        assert_eq!(t.render(&sample(1, "a", "{}"), "s"), "-");
    }

    #[test]
    fn bad_templates_name_the_problem() {
        assert!(Template::parse("a/${thing_name")
            .unwrap_err()
            .contains("closing"));
        assert!(Template::parse("${topic(0)}")
            .unwrap_err()
            .contains("count from 1"));
        assert!(Template::parse("${}").unwrap_err().contains("empty"));
        assert!(Template::parse("${concat('}')")
            .unwrap_err()
            .contains("closing"));
    }
}
