//! A record: one row a rule (or a direct route) produced, with the identity of the device it
//! came from. It is what the spool stores and what every sink sends.

use bytes::Bytes;
use serde_json::{Map, Value};

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

    /// The self-describing JSON document sinks deliver: the row plus who, where and when.
    ///
    /// Kinesis, IoT Core and the file sink all write this same shape, so a consumer reads
    /// identity the same way wherever the record went.
    pub fn envelope(&self, site: &str) -> Value {
        let mut doc = Map::with_capacity(9);
        doc.insert("record_id".into(), Value::from(self.id));
        doc.insert("site".into(), Value::from(site));
        doc.insert("rule".into(), Value::from(self.rule.as_str()));
        doc.insert("thing_name".into(), Value::from(self.thing_name.as_str()));
        doc.insert("cert_id".into(), Value::from(self.cert_id.as_str()));
        doc.insert("topic".into(), Value::from(self.topic.as_str()));
        doc.insert("received_at".into(), Value::from(self.received_at_ms));
        match self.payload_json() {
            Some(json) => doc.insert("payload".into(), json),
            None => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(&self.payload);
                doc.insert("payload_base64".into(), Value::from(encoded))
            }
        };
        Value::Object(doc)
    }

    /// `envelope` serialized, ready to be one line of a file or one Kinesis record.
    pub fn envelope_bytes(&self, site: &str) -> Vec<u8> {
        // Serializing a `Value` built from valid parts cannot fail.
        serde_json::to_vec(&self.envelope(site)).unwrap_or_default()
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
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn envelope_embeds_json_and_encodes_the_rest() {
        let json = sample(7, "pump-1", r#"{"t":21.5}"#).envelope("plant-7");
        assert_eq!(json["payload"]["t"], 21.5);
        assert_eq!(json["thing_name"], "pump-1");
        assert_eq!(json["record_id"], 7);
        assert_eq!(json["site"], "plant-7");
        let binary = sample(8, "pump-1", "not json").envelope("plant-7");
        assert_eq!(binary["payload_base64"], "bm90IGpzb24=");
        assert!(binary.get("payload").is_none());
    }
}
