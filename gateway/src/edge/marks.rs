//! The gateway's marks on a publish inside the router, and what identifies a delivery.
//!
//! Every publish the fabric hands to rumqttd carries them; a session reads and removes them
//! before its device sees a delivery, and the offline queues read them to decide what a
//! session that is away keeps.

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties, QoS};

/// User properties the gateway puts on a publish inside the router and takes off again before
/// a device sees it. rumqttd drops a link whose publish carries a subscription identifier and
/// keeps the flags of a publish private, so a user property is the one place left for what
/// the session needs to know of a delivery:
/// - `sitegate:qos0`: it was published at QoS 0. The router delivers at the subscription's
///   QoS; the session delivers at the lower of the two (§3.8.4).
/// - `sitegate:retain`: it was published with RETAIN. The router forwards it with RETAIN 0
///   (as MQTT-3.3.1-12 asks by default); a subscription with Retain As Published gets 1.
/// - `sitegate:from`, the publishing client id, while any session has used No Local
///   (§3.8.3.1): a session drops its own messages for its No Local subscriptions.
///
/// A device's own user properties with the `sitegate:` prefix are removed on the way in, so it
/// cannot fake a mark.
pub(super) const MARK_PREFIX: &str = "sitegate:";
pub(super) const QOS0_MARK: &str = "sitegate:qos0";
pub(super) const RETAIN_MARK: &str = "sitegate:retain";
pub(super) const FROM_MARK: &str = "sitegate:from";

pub(super) fn mark(props: &mut Option<PublishProperties>, name: &str) {
    props
        .get_or_insert_with(PublishProperties::default)
        .user_properties
        .push((name.to_owned(), String::new()));
}

/// The properties a publish enters the router with: `props` without a device's marks, marked
/// when it is at QoS 0 and with its publisher `from` when given. Every publish handed to the
/// fabric gets them (a device's, a will, a republish).
pub(crate) fn entering_properties(
    props: Option<PublishProperties>,
    qos: QoS,
    from: Option<&str>,
) -> Option<PublishProperties> {
    let mut props = props;
    if let Some(p) = props.as_mut() {
        p.user_properties
            .retain(|(k, _)| !k.starts_with(MARK_PREFIX));
    }
    if qos == QoS::AtMostOnce {
        mark(&mut props, QOS0_MARK);
    }
    if let Some(from) = from {
        props
            .get_or_insert_with(PublishProperties::default)
            .user_properties
            .push((FROM_MARK.to_owned(), from.to_owned()));
    }
    props
}

/// The MQTT 5 properties the rules may read of a device's publish (`get_mqtt_property`,
/// `get_user_properties`), without the gateway's marks; `None` when it has none of them. Copied
/// out of the read buffer, like the payload.
pub(crate) fn rule_properties(
    props: Option<&PublishProperties>,
) -> Option<std::sync::Arc<sitegate_rules::Properties>> {
    let p = props?;
    let user: Vec<(String, String)> = p
        .user_properties
        .iter()
        .filter(|(k, _)| !k.starts_with(MARK_PREFIX))
        .cloned()
        .collect();
    let any = p.payload_format_indicator.is_some()
        || p.content_type.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !user.is_empty();
    any.then(|| {
        std::sync::Arc::new(sitegate_rules::Properties {
            utf8_payload: p.payload_format_indicator.map(|f| f == 1),
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_deref().map(Bytes::copy_from_slice),
            user_properties: user,
        })
    })
}

/// What the gateway's marks said of a delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Marks {
    /// Published at QoS 0.
    pub qos0: bool,
    /// Published with RETAIN.
    pub retained: bool,
    /// Published by the client id the session is for.
    pub from_me: bool,
}

/// The QoS and packet id of a delivery (rumqttd keeps them private; its 5-byte header of an
/// emptied copy says them without copying the payload).
pub(super) fn qos_and_pkid(publish: &Publish) -> (QoS, u16) {
    let mut header = publish.clone();
    header.topic = Bytes::new();
    header.payload = Bytes::new();
    let raw = header.serialize();
    let qos = rumqttd::protocol::qos((raw[0] >> 1) & 0b11).unwrap_or(QoS::AtMostOnce);
    (qos, u16::from_be_bytes([raw[1], raw[2]]))
}

/// Takes the gateway's marks off `props` and says what they were.
pub(super) fn strip_marks(props: &mut Option<PublishProperties>, me: &str) -> Marks {
    let mut marks = Marks::default();
    let Some(p) = props.as_mut() else {
        return marks;
    };
    p.user_properties.retain(|(k, v)| match k.as_str() {
        QOS0_MARK => {
            marks.qos0 = true;
            false
        }
        RETAIN_MARK => {
            marks.retained = true;
            false
        }
        FROM_MARK => {
            marks.from_me = v == me;
            false
        }
        _ => true,
    });
    if *p == PublishProperties::default() {
        *props = None;
    }
    marks
}

/// Identifies a delivery by topic and payload, where packet ids do not: across a reconnect,
/// and between a message the offline queue took and the same one drained from the router.
pub(super) fn delivery_fingerprint(p: &Publish) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.topic.hash(&mut h);
    p.payload.hash(&mut h);
    h.finish()
}
