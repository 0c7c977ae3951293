//! `${…}` templates for partition keys and topics.
//!
//! Parsed once when the sink is configured; rendering a record is then a walk over parts with
//! no parsing. Known names: `thing_name`, `cert_id`, `topic`, `topic(n)` (1-based level),
//! `site`, `rule`, `record_id`; any other name, or a dotted path (`coords.lat`), is looked up
//! in the record's JSON payload (empty when absent).
//!
//! AWS IoT's substitution templates (the `iot-substitution-templates` page) are read too, so a
//! template copied from a cloud rule action works unchanged where its value is known here:
//! `${topic()}`, `${topic(n)}`, `${clientid()}` (the thing name: a device's client id must be
//! its thing name), `${principal()}` (the certificate id), `${timestamp()}` (when the
//! gateway received the message, which stays the same when a record is resent after an
//! outage) and `${newuuid()}` (a random version 4 UUID each time a record is rendered, as
//! the page's Kinesis partition-key example uses it). Any other expression is refused with its
//! text. One difference remains: IoT Core
//! evaluates a field name against the original message, sitegate against the rule's output
//! row, so a field the rule does not select renders empty.

use serde_json::Value;

use crate::record::Record;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
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
    /// A path of keys into the payload object (`a.b` is `["a", "b"]`).
    Column(Vec<String>),
}

impl Template {
    /// Parse `source`; the error names the offending part.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("template {source:?}: `${{` without a closing `}}`"))?;
            parts.push(Self::variable(source, after[..end].trim())?);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    fn variable(source: &str, name: &str) -> Result<Part, String> {
        Ok(match name {
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
                let key = |k: &str| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                };
                if let Some(level) = name
                    .strip_prefix("topic(")
                    .and_then(|r| r.strip_suffix(')'))
                {
                    let n: usize = level.trim().parse().map_err(|_| {
                        format!("template {source:?}: `topic({level})` needs a level number")
                    })?;
                    if n == 0 {
                        return Err(format!("template {source:?}: topic levels count from 1"));
                    }
                    Part::TopicLevel(n)
                } else if name.split('.').all(key) {
                    Part::Column(name.split('.').map(str::to_string).collect())
                } else if name.contains('(') {
                    return Err(format!(
                        "template {source:?}: `${{{name}}}` is not evaluated at the edge; a \
                         template may use topic(), topic(n), clientid(), principal(), \
                         timestamp(), newuuid() and field names"
                    ));
                } else {
                    return Err(format!("template {source:?}: unknown variable `{name}`"));
                }
            }
        })
    }

    /// A template that renders `text` as is.
    pub fn literal(text: &str) -> Self {
        Template {
            source: text.replace('$', "$$"),
            parts: vec![Part::Literal(text.to_string())],
        }
    }

    /// The text the template was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether rendering needs the record's payload parsed as JSON.
    pub fn uses_columns(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Column(_)))
    }

    /// Render for `record`. `payload` is the record's parsed JSON payload when `uses_columns`.
    pub fn render(&self, record: &Record, site: &str, payload: Option<&Value>) -> String {
        let mut out = String::with_capacity(64);
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
                Part::Column(path) => {
                    match payload.and_then(|p| path.iter().try_fold(p, |v, key| v.get(key))) {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Null) | None => {}
                        Some(other) => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        out
    }
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
        let payload = rec.payload_json();
        assert!(t.uses_columns());
        assert_eq!(
            t.render(&rec, "plant-7", payload.as_ref()),
            "sitegate/plant-7/freezer-4/temp/B"
        );
    }

    /// iot-substitution-templates: the page's `${topic()}/republish`, and the other IoT forms
    /// whose value a record carries.
    #[test]
    fn aws_iot_forms_render_from_the_record() {
        let rec = sample(1, "freezer-4", r#"{"coords":{"latitude":47.6},"t":-18}"#);
        let payload = rec.payload_json();
        let t = Template::parse("${topic()}/republish").unwrap();
        assert_eq!(
            t.render(&rec, "s", None),
            format!("{}/republish", rec.topic)
        );
        let t = Template::parse(
            "${clientid()}|${principal()}|${timestamp()}|${coords.latitude}|${coords.nope}",
        )
        .unwrap();
        assert_eq!(
            t.render(&rec, "s", payload.as_ref()),
            format!("freezer-4|{}|{}|47.6|", rec.cert_id, rec.received_at_ms)
        );
        // The page's Kinesis example: `"partitionKey": "${newuuid()}"`.
        let t = Template::parse("${newuuid()}").unwrap();
        let (a, b) = (t.render(&rec, "s", None), t.render(&rec, "s", None));
        assert_ne!(a, b, "a new one each time");
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert_eq!(&a[14..15], "4", "version 4: {a}");
        assert!("89ab".contains(&a[19..20]), "RFC variant: {a}");
        let err = Template::parse("${get_thing_shadow('x')}").unwrap_err();
        assert!(err.contains("not evaluated at the edge"), "{err}");
        assert!(Template::parse("${a..b}").is_err());
    }

    #[test]
    fn missing_levels_and_columns_render_empty() {
        let t = Template::parse("${topic(9)}-${nope}").unwrap();
        assert_eq!(t.render(&sample(1, "a", "{}"), "s", None), "-");
    }

    #[test]
    fn bad_templates_name_the_problem() {
        assert!(Template::parse("a/${thing_name")
            .unwrap_err()
            .contains("closing"));
        assert!(Template::parse("${topic(0)}")
            .unwrap_err()
            .contains("count from 1"));
        assert!(Template::parse("${a b}")
            .unwrap_err()
            .contains("unknown variable `a b`"));
    }
}
