//! A record: one row a rule (or a direct route) produced, with the identity of the device it
//! came from. It is what the spool stores and what every sink sends.

use bytes::Bytes;
use serde_json::Value;

/// One unit of delivery to a sink: an [`Entry`] and the id the spool gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number in the sink's queue, assigned by the spool when the record became
    /// durable. Redelivery after a crash repeats the id, so consumers can drop duplicates.
    pub id: u64,
    pub entry: Entry,
}

/// What a record says: the row and who, where and when. Rules and routes make entries; the
/// spool makes them records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the gateway received the device's message (Unix milliseconds).
    pub received_at_ms: u64,
    /// Thing name of the device (certificate subject CN).
    pub thing_name: String,
    /// Certificate id of the device (hex SHA-256 of the certificate DER).
    pub cert_id: String,
    /// MQTT topic the device published on.
    pub topic: String,
    /// Name of the rule or route that produced the record.
    pub rule: String,
    /// The row: a JSON object for rule output, or the device's payload bytes for a direct route.
    pub payload: Bytes,
    /// The values of its sink's template expressions ([`crate::template::Template::expressions`])
    /// evaluated against the device's message by the rule that made it, in their string form;
    /// empty when nothing computed them (a direct route, a windowed statement).
    pub template_values: Vec<String>,
}

/// A record reads as its entry (`record.thing_name`), which it owns and never changes.
impl std::ops::Deref for Record {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Record {
    /// The payload as JSON when it is JSON; otherwise `None`.
    pub fn payload_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.payload).ok()
    }

    /// The self-describing JSON document sinks deliver, one line of a file or one Kinesis
    /// record: the row plus who, where and when, as `{"record_id", "site", "rule",
    /// "thing_name", "cert_id", "topic", "received_at", "payload"}`, or `"payload_base64"` when
    /// the payload is not JSON. Kinesis, IoT Core and the file sink all write this same shape,
    /// so a consumer reads identity the same way wherever the record went.
    ///
    /// Written directly, per record: a JSON payload is checked and copied with its
    /// insignificant whitespace left out (so the document stays one line), not parsed into a
    /// tree and printed again, which was a tenth of the gateway's CPU under load.
    pub fn envelope_bytes(&self, site: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            160 + site.len()
                + self.rule.len()
                + self.thing_name.len()
                + self.topic.len()
                + self.payload.len() * 4 / 3,
        );
        out.extend_from_slice(b"{\"record_id\":");
        out.extend_from_slice(self.id.to_string().as_bytes());
        for (key, value) in [
            ("site", site),
            ("rule", self.rule.as_str()),
            ("thing_name", self.thing_name.as_str()),
            ("cert_id", self.cert_id.as_str()),
            ("topic", self.topic.as_str()),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            string_into(value, &mut out);
        }
        out.extend_from_slice(b",\"received_at\":");
        out.extend_from_slice(self.received_at_ms.to_string().as_bytes());
        match serde_json::from_slice::<&serde_json::value::RawValue>(&self.payload) {
            Ok(raw) => {
                out.extend_from_slice(b",\"payload\":");
                minify_into(raw.get().as_bytes(), &mut out);
            }
            Err(_) => {
                use base64::Engine as _;
                out.extend_from_slice(b",\"payload_base64\":\"");
                let encoded = base64::engine::general_purpose::STANDARD.encode(&self.payload);
                out.extend_from_slice(encoded.as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'}');
        out
    }
}

/// `text` as a JSON string.
fn string_into(text: &str, out: &mut Vec<u8>) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Copies valid JSON `json` without the whitespace between its tokens (inside strings every
/// byte is kept; JSON strings hold no raw newlines).
fn minify_into(json: &[u8], out: &mut Vec<u8>) {
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
}

#[cfg(test)]
pub(crate) fn sample(id: u64, thing: &str, payload: &str) -> Record {
    Record {
        id,
        entry: Entry {
            received_at_ms: 1_700_000_000_000 + id,
            thing_name: thing.to_string(),
            cert_id: format!("{:064x}", id),
            topic: format!("dt/{thing}/temp"),
            rule: "raw".into(),
            payload: Bytes::from(payload.to_string()),
            template_values: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn envelope(record: &Record) -> Value {
        serde_json::from_slice(&record.envelope_bytes("plant-7")).unwrap()
    }

    #[test]
    fn envelope_embeds_json_and_encodes_the_rest() {
        let json = envelope(&sample(7, "pump-1", r#"{"t":21.5}"#));
        assert_eq!(json["payload"]["t"], 21.5);
        assert_eq!(json["thing_name"], "pump-1");
        assert_eq!(json["record_id"], 7);
        assert_eq!(json["site"], "plant-7");
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        let order = [
            "record_id",
            "site",
            "rule",
            "thing_name",
            "cert_id",
            "topic",
        ];
        assert_eq!(keys[..6], order);
        let binary = envelope(&sample(8, "pump-1", "not json"));
        assert_eq!(binary["payload_base64"], "bm90IGpzb24=");
        assert!(binary.get("payload").is_none());
        // JSON with trailing junk is not JSON.
        assert!(envelope(&sample(9, "p", r#"{"a":1} x"#))
            .get("payload_base64")
            .is_some());
    }

    #[test]
    fn a_payload_keeps_its_values_and_loses_its_line_breaks() {
        let device =
            "{\n  \"msg\": \"a b\\n\\\"q\\\" \\\\\",\r\n  \"n\": [1, 2.50, -3e2],\t\"o\": {}\n}\n";
        let record = sample(1, "pump-\"1", device);
        let bytes = record.envelope_bytes("plant-7");
        assert!(
            !bytes.contains(&b'\n'),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let want: Value = serde_json::from_str(device).unwrap();
        assert_eq!(json["payload"], want);
        assert_eq!(json["thing_name"], "pump-\"1");
    }

    proptest::proptest! {
        #[test]
        fn any_json_payload_comes_back_as_the_same_value(v in json_value()) {
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let record = sample(1, "t", &pretty);
            let back: Value = serde_json::from_slice(&record.envelope_bytes("s")).unwrap();
            proptest::prop_assert_eq!(&back["payload"], &v);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[ -~\\n\\t\\u{e9}\\u{1F600}\"\\\\]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z \"]{0,5}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
