//! A device's own AWS IoT Jobs and shadow topics, relayed to and from IoT Core.
//!
//! A device uses the topics it would use against IoT Core (`$aws/things/<thing>/jobs/…`,
//! `$aws/things/<thing>/shadow/…`). Whether or not a relay is configured, a topic or filter
//! under `$aws/things/` is only ever its own thing's: another thing's, or a wildcard in the
//! thing's level, is refused before the policy is asked, so no policy can open one device's
//! jobs or shadow to another. With `[relay]`, publishes on the relayed kinds go up on the cloud
//! link (never into the router or the pipeline), named by the device's identity in user
//! properties; a granted filter of those kinds is also subscribed on the cloud link, whose
//! answers the downlink hands to the router on the same topic, where only this device can hold
//! a filter that matches it.
//!
//! [`ShadowCache`] keeps the last document IoT Core answered each shadow's `get` with, so a
//! device that asks while the cloud link is down is answered from it.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use sitegate_plugins::iotcore::{CloudLink, UpError, Upward};

/// Where every thing's reserved topics start.
pub const THINGS_PREFIX: &str = "$aws/things/";
/// The kinds of reserved topic the relay carries.
pub(super) const JOBS: &str = "jobs";
pub(super) const SHADOW: &str = "shadow";

/// What a topic or filter under `$aws/things/` is to the device using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThingTopic<'t> {
    /// Not under `$aws/things/`.
    Other,
    /// Another thing's, or a wildcard where the thing's name goes.
    NotOwn,
    /// The device's own; the level after the thing's name (`jobs`, `shadow`, a wildcard, or
    /// nothing).
    Own(&'t str),
}

/// Classifies `topic` (a topic name or a filter) for the device of thing `thing`.
pub fn thing_topic<'t>(topic: &'t str, thing: &str) -> ThingTopic<'t> {
    let Some(rest) = topic.strip_prefix(THINGS_PREFIX) else {
        // `$aws/things` itself and `$aws/+/…` reach for the same topics.
        return match topic {
            "$aws/things" | "$aws/#" | "$aws/+" => ThingTopic::NotOwn,
            t if t.starts_with("$aws/+/") => ThingTopic::NotOwn,
            _ => ThingTopic::Other,
        };
    };
    let mut levels = rest.splitn(3, '/');
    match levels.next() {
        Some(name) if name == thing => ThingTopic::Own(levels.next().unwrap_or("")),
        _ => ThingTopic::NotOwn,
    }
}

/// Shadows whose last document is kept at most; beyond it nothing new is kept.
const MAX_CACHED_SHADOWS: usize = 10_000;
/// A shadow document kept at most this large (IoT Core's limit is 8 KB of state; the document
/// with its metadata is larger).
const MAX_CACHED_BYTES: usize = 64 * 1024;

/// The last `…/get/accepted` document of each shadow, by the shadow's topic
/// (`$aws/things/<thing>/shadow` or `…/shadow/name/<name>`). In memory only: it starts empty
/// when the gateway does.
#[derive(Default)]
pub struct ShadowCache {
    docs: Mutex<HashMap<String, Bytes>>,
}

impl ShadowCache {
    /// Keeps `payload` if `topic` is a shadow's `get/accepted`.
    pub fn remember(&self, topic: &str, payload: &[u8]) {
        let Some(shadow) = topic.strip_suffix("/get/accepted") else {
            return;
        };
        if payload.len() > MAX_CACHED_BYTES || !is_shadow(shadow) {
            return;
        }
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        if docs.len() < MAX_CACHED_SHADOWS || docs.contains_key(shadow) {
            docs.insert(shadow.to_owned(), Bytes::copy_from_slice(payload));
        }
    }

    /// The answer to a `get` on `topic` from the last document: its `get/accepted` topic and
    /// the document with the request's `clientToken`, if the shadow has one kept.
    pub fn answer(&self, topic: &str, request: &[u8]) -> Option<(String, Vec<u8>)> {
        let shadow = topic.strip_suffix("/get").filter(|s| is_shadow(s))?;
        let doc = self
            .docs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(shadow)?
            .clone();
        let mut doc: serde_json::Value = serde_json::from_slice(&doc).ok()?;
        let token = serde_json::from_slice::<serde_json::Value>(request)
            .ok()
            .and_then(|r| r.get("clientToken").cloned());
        if let (Some(token), Some(map)) = (token, doc.as_object_mut()) {
            map.insert("clientToken".into(), token);
        }
        Some((
            format!("{shadow}/get/accepted"),
            serde_json::to_vec(&doc).ok()?,
        ))
    }
}

/// `$aws/things/<thing>/shadow` or `$aws/things/<thing>/shadow/name/<name>`.
fn is_shadow(topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(THINGS_PREFIX) else {
        return false;
    };
    let levels: Vec<&str> = rest.split('/').collect();
    matches!(levels.as_slice(), [_, SHADOW] | [_, SHADOW, "name", _])
}

/// The relay's handle, held by every session.
#[derive(Clone)]
pub struct Relay {
    pub link: CloudLink,
    pub jobs: bool,
    pub shadow: bool,
    pub shadows: std::sync::Arc<ShadowCache>,
}

impl Relay {
    /// Whether a publish of this kind goes up instead of into the router.
    pub fn relays_topic(&self, kind: &str) -> bool {
        (kind == JOBS && self.jobs) || (kind == SHADOW && self.shadow)
    }

    /// Whether a cloud topic is a relayed kind of some (valid) thing's reserved topics: an
    /// answer to hand down on the same topic.
    pub fn carries(&self, topic: &str) -> bool {
        let Some(thing) = topic
            .strip_prefix(THINGS_PREFIX)
            .and_then(|rest| rest.split('/').next())
        else {
            return false;
        };
        crate::identity::valid_thing_name(thing)
            && matches!(thing_topic(topic, thing), ThingTopic::Own(kind) if self.relays_topic(kind))
    }

    /// Whether a filter of this kind is also subscribed on the cloud link.
    pub fn relays_filter(&self, kind: &str) -> bool {
        self.relays_topic(kind) || ((kind == "+" || kind == "#") && (self.jobs || self.shadow))
    }

    /// Sends a device's request up, named by its identity.
    pub fn up(
        &self,
        topic: &str,
        payload: Bytes,
        thing: &str,
        cert_id: &str,
    ) -> Result<(), UpError> {
        self.link.publish(Upward {
            topic: topic.to_owned(),
            payload,
            user_properties: vec![
                ("thing-name".into(), thing.to_owned()),
                ("cert-id".into(), cert_id.to_owned()),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_get_answers_a_get_while_the_cloud_is_away() {
        let cache = ShadowCache::default();
        let doc = br#"{"state":{"desired":{"speed":5}},"version":2,"clientToken":"a"}"#;
        cache.remember("$aws/things/pump-7/shadow/get/accepted", doc);
        cache.remember(
            "$aws/things/pump-7/shadow/name/cfg/get/accepted",
            b"{\"version\":1}",
        );
        cache.remember("$aws/things/pump-7/jobs/get/accepted", b"{}");
        let (topic, answer) = cache
            .answer("$aws/things/pump-7/shadow/get", br#"{"clientToken":"b"}"#)
            .unwrap();
        assert_eq!(topic, "$aws/things/pump-7/shadow/get/accepted");
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["clientToken"], "b");
        assert_eq!(answer["state"]["desired"]["speed"], 5);
        assert!(cache
            .answer("$aws/things/pump-7/shadow/name/cfg/get", b"")
            .is_some());
        assert!(cache.answer("$aws/things/pump-8/shadow/get", b"").is_none());
        assert!(cache.answer("$aws/things/pump-7/jobs/get", b"").is_none());
        assert!(cache
            .answer("$aws/things/pump-7/shadow/name/x/y/get", b"")
            .is_none());
    }

    #[test]
    fn only_the_devices_own_thing_is_its_own() {
        let own = |t| thing_topic(t, "pump-7");
        assert_eq!(
            own("$aws/things/pump-7/jobs/start-next"),
            ThingTopic::Own("jobs")
        );
        assert_eq!(
            own("$aws/things/pump-7/shadow/name/cfg/update"),
            ThingTopic::Own("shadow")
        );
        assert_eq!(own("$aws/things/pump-7/#"), ThingTopic::Own("#"));
        assert_eq!(own("$aws/things/pump-7"), ThingTopic::Own(""));
        assert_eq!(own("$aws/things/pump-8/jobs/notify"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/things/+/jobs/notify"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/things/#"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/things/pump-7x/jobs"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/things"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/+/pump-7/jobs"), ThingTopic::NotOwn);
        assert_eq!(own("$aws/#"), ThingTopic::NotOwn);
        assert_eq!(own("dt/pump-7/x"), ThingTopic::Other);
        assert_eq!(own("$aws/rules/x"), ThingTopic::Other);
    }
}
