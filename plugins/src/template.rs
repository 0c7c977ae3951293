//! `${…}` templates for partition keys and topics.
//!
//! Parsed once when the sink is configured; rendering a record is then a walk over parts with
//! no parsing. Known names: `thing_name`, `cert_id`, `topic`, `topic(n)` (1-based level),
//! `site`, `rule`, `record_id`; any other name is looked up as a top-level column of the
//! record's JSON payload (empty when absent).

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
    Column(String),
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
            "" => return Err(format!("template {source:?}: empty `${{}}`")),
            _ => {
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
                } else if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    Part::Column(name.to_string())
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
                Part::Column(name) => match payload.and_then(|p| p.get(name)) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Null) | None => {}
                    Some(other) => out.push_str(&other.to_string()),
                },
            }
        }
        out
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
