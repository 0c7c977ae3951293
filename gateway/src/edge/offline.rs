//! The queues of persistent sessions whose device is away, kept in the store, not the router.
//!
//! rumqttd keeps a parked session's messages in memory, in commit logs it trims by size, and
//! loses them with the process. So while a device is away its session is the gateway's: the
//! router forgets it, and every QoS 1 publish the fabric is handed is matched here against
//! the away sessions' subscriptions (a trie of filter levels, so the cost follows the topic's
//! depth, not the number of sessions) and written, sealed, to the spool's `session_messages`
//! tree before the router sees it. The publisher's PUBACK waits for that write to be flushed,
//! as it waits for the spool, so a queued message outlives a crash.
//!
//! A session is watched from the moment its device leaves. Until the router's backlog for it
//! is drained (`handover`), the messages taken here are also fingerprinted, so the same
//! message drained from the router is not kept twice; drained messages take sequences before
//! every message taken here ([`Watched::front`]), so the queue keeps publish order.
//!
//! What a queued message is: when it was queued (Unix ms, u64 little-endian), then the MQTT 5
//! PUBLISH packet as the device gets it (device topic, QoS 1, packet id 1, RETAIN as its
//! Retain As Published subscriptions say, properties without the gateway's marks; DUP when it
//! had been sent before). The time lets a Message Expiry Interval count the wait
//! (MQTT-3.3.2-5, -6).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::BytesMut;
use rumqttd::protocol::{Packet, Publish, PublishProperties, QoS};
use tokio::sync::RwLock;
use tracing::warn;

use crate::escape::Escaped;
use crate::metrics::Stats;
use crate::spool::{Spool, SpoolError};

use super::codec::{Codec, Version};
use super::marks::{delivery_fingerprint, qos_and_pkid, strip_marks, Marks, QOS0_MARK};
use super::table::Subscription;

/// Sequences of messages drained from the router start here above a queue's last one; the
/// messages taken meanwhile start [`BACK_OFFSET`] above that, so a crash in the middle of a
/// handover still leaves the queue in publish order.
const BACK_OFFSET: u64 = 1 << 32;

/// A queued message's stored form (see the module docs).
pub(super) fn queued_entry(queued_at_ms: u64, packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + packet.len());
    out.extend_from_slice(&queued_at_ms.to_le_bytes());
    out.extend_from_slice(packet);
    out
}

/// When a stored message was queued, and its PUBLISH packet.
pub(super) fn split_entry(entry: &[u8]) -> Option<(u64, &[u8])> {
    let (at, packet) = entry.split_at_checked(8)?;
    Some((u64::from_le_bytes(at.try_into().ok()?), packet))
}

/// One away session.
struct Watched {
    filters: Vec<Subscription>,
    /// Messages in its queue.
    queued: usize,
    /// The next sequence for a message taken here.
    next: u64,
    /// During the handover: fingerprints (with counts) of messages taken here.
    taken: Option<HashMap<u64, u32>>,
}

/// The start of the sequences for messages drained from the router during a handover.
#[derive(Debug, Clone, Copy)]
pub struct Front(pub u64);

#[derive(Default)]
struct Index {
    sessions: HashMap<String, Watched>,
    trie: Node,
    /// Messages queued in all.
    total: usize,
}

/// A level of the filter trie: the client ids whose filter ends here, ends with `#` here, or
/// goes on by a literal level or `+`.
#[derive(Default)]
struct Node {
    exact: Vec<String>,
    rest: Vec<String>,
    levels: HashMap<String, Node>,
    any: Option<Box<Node>>,
}

impl Node {
    fn insert(&mut self, filter: &str, client_id: &str) {
        let mut node = self;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.rest.push(client_id.to_owned());
                    return;
                }
                "+" => node = node.any.get_or_insert_with(Default::default),
                literal => node = node.levels.entry(literal.to_owned()).or_default(),
            }
        }
        node.exact.push(client_id.to_owned());
    }

    /// Removes `client_id` at `filter`; true when this node is left empty.
    fn remove(&mut self, mut levels: std::str::Split<'_, char>, client_id: &str) -> bool {
        match levels.next() {
            None => self.exact.retain(|c| c != client_id),
            Some("#") => self.rest.retain(|c| c != client_id),
            Some("+") => {
                if self
                    .any
                    .as_mut()
                    .is_some_and(|n| n.remove(levels, client_id))
                {
                    self.any = None;
                }
            }
            Some(literal) => {
                if self
                    .levels
                    .get_mut(literal)
                    .is_some_and(|n| n.remove(levels, client_id))
                {
                    self.levels.remove(literal);
                }
            }
        }
        self.exact.is_empty()
            && self.rest.is_empty()
            && self.levels.is_empty()
            && self.any.is_none()
    }

    /// Adds to `out` the client ids with a filter matching the topic of `levels` (§4.7: `#`
    /// also matches the parent level; a wildcard first level never matches a `$` topic).
    fn matches<'a>(&'a self, levels: &[&str], first: bool, out: &mut HashSet<&'a str>) {
        let dollar = first && levels.first().is_some_and(|l| l.starts_with('$'));
        if !dollar {
            out.extend(self.rest.iter().map(String::as_str));
        }
        let Some((level, deeper)) = levels.split_first() else {
            out.extend(self.exact.iter().map(String::as_str));
            return;
        };
        if let Some(next) = self.levels.get(*level) {
            next.matches(deeper, false, out);
        }
        if let (Some(next), false) = (&self.any, dollar) {
            next.matches(deeper, false, out);
        }
    }
}

/// Where away sessions' messages are queued (see the module docs).
pub struct OfflineQueues {
    index: RwLock<Index>,
    /// Away sessions, read without the lock: none means nothing to match.
    watched: AtomicUsize,
    store: OnceLock<Weak<Spool>>,
    stats: Arc<Stats>,
    max_per_session: usize,
    max_total: usize,
}

/// A publish the fabric was handed, as the offline queues match it.
struct Offered<'a> {
    topic: &'a str,
    publish: &'a Publish,
    props: &'a Option<PublishProperties>,
    now_ms: u64,
    codec: &'a Codec,
}

/// A message to queue: for whom, where, and the packet.
struct Taken {
    client_id: String,
    seq: u64,
    packet: Vec<u8>,
}

impl OfflineQueues {
    pub fn new(stats: Arc<Stats>, max_per_session: usize, max_total: usize) -> Self {
        OfflineQueues {
            index: RwLock::new(Index::default()),
            watched: AtomicUsize::new(0),
            store: OnceLock::new(),
            stats,
            max_per_session,
            max_total,
        }
    }

    /// Gives the queues their store; without one, nothing is queued for an away session.
    pub fn attach(&self, store: Weak<Spool>) {
        let _ = self.store.set(store);
    }

    pub(super) fn store(&self) -> Option<Arc<Spool>> {
        self.store.get().and_then(Weak::upgrade)
    }

    /// Starts queueing for `client_id`, whose queue already holds `queued` messages up to
    /// sequence `last`. With `handover`, messages taken are fingerprinted until
    /// [`OfflineQueues::handed_over`]. Returns where drained messages go.
    pub async fn watch(
        &self,
        client_id: &str,
        filters: Vec<Subscription>,
        queued: usize,
        last: Option<u64>,
        handover: bool,
    ) -> Front {
        let front = last.map_or(1, |l| l.saturating_add(1));
        let mut index = self.index.write().await;
        if let Some(old) = index.sessions.remove(client_id) {
            remove_filters(&mut index.trie, client_id, &old.filters);
            index.total -= old.queued;
        }
        for s in &filters {
            index.trie.insert(&s.filter, client_id);
        }
        index.total += queued;
        index.sessions.insert(
            client_id.to_owned(),
            Watched {
                filters,
                queued,
                next: front.saturating_add(BACK_OFFSET),
                taken: handover.then(HashMap::new),
            },
        );
        self.watched.store(index.sessions.len(), Ordering::Release);
        Front(front)
    }

    /// Whether a message drained from the router for `client_id` was taken here already (and
    /// so is not kept twice); counts it off when so.
    pub(super) async fn taken_already(&self, client_id: &str, fingerprint: u64) -> bool {
        let mut index = self.index.write().await;
        let Some(taken) = index
            .sessions
            .get_mut(client_id)
            .and_then(|w| w.taken.as_mut())
        else {
            return false;
        };
        match taken.get_mut(&fingerprint) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                taken.remove(&fingerprint);
                true
            }
            None => false,
        }
    }

    /// Whether `client_id`'s queue has room for one more message drained from the router;
    /// books it when so, counts it dropped when not.
    pub(super) async fn book(&self, client_id: &str) -> bool {
        let mut index = self.index.write().await;
        let room = index.total < self.max_total
            && index
                .sessions
                .get(client_id)
                .is_some_and(|w| w.queued < self.max_per_session);
        if !room {
            self.stats
                .session_messages_dropped
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        index.total += 1;
        if let Some(w) = index.sessions.get_mut(client_id) {
            w.queued += 1;
        }
        true
    }

    /// The router holds nothing more for `client_id`: fingerprints are no longer kept. False
    /// when the session stopped being watched meanwhile (it expired or its device is back).
    pub(super) async fn handed_over(&self, client_id: &str) -> bool {
        let mut index = self.index.write().await;
        match index.sessions.get_mut(client_id) {
            Some(w) => {
                w.taken = None;
                true
            }
            None => false,
        }
    }

    /// Stops queueing for `client_id`; what is queued stays in the store. Waits for every
    /// message being taken for it to be written, so reading its queue afterwards sees all.
    pub(super) async fn unwatch(&self, client_id: &str) -> bool {
        let mut index = self.index.write().await;
        let Some(old) = index.sessions.remove(client_id) else {
            return false;
        };
        remove_filters(&mut index.trie, client_id, &old.filters);
        index.total -= old.queued;
        self.watched.store(index.sessions.len(), Ordering::Release);
        true
    }

    /// Whether any away session is watched (else nothing can be captured).
    pub(super) fn watching(&self) -> bool {
        self.watched.load(Ordering::Acquire) > 0
    }

    /// Queues, for every away session whose subscriptions take it, each QoS 1 publish among
    /// `packets` (device form, with the gateway's marks). True when something was written and
    /// the store must be flushed before the publishers are acknowledged.
    pub(super) async fn capture(&self, packets: &[Packet]) -> bool {
        if self.watched.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(store) = self.store() else {
            return false;
        };
        // Matched under the read lock; only a publish some away session takes needs the
        // write lock, held while writing so that `unwatch` waits for what is being taken.
        let mut wanted: Vec<(usize, Vec<String>)> = Vec::new();
        {
            let index = self.index.read().await;
            for (i, packet) in packets.iter().enumerate() {
                let Packet::Publish(publish, props) = packet else {
                    continue;
                };
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    continue;
                };
                if !at_qos1(publish, props) {
                    continue;
                }
                let levels: Vec<&str> = topic.split('/').collect();
                let mut clients = HashSet::new();
                index.trie.matches(&levels, true, &mut clients);
                if !clients.is_empty() {
                    wanted.push((i, clients.into_iter().map(str::to_owned).collect()));
                }
            }
        }
        if wanted.is_empty() {
            return false;
        }
        let mut index = self.index.write().await;
        let mut taken = Vec::new();
        let codec = Codec::new(Version::V5, usize::MAX);
        let now_ms = crate::clock::now_ms();
        for (i, clients) in wanted {
            let Some(Packet::Publish(publish, props)) = packets.get(i) else {
                continue;
            };
            let offered = Offered {
                topic: std::str::from_utf8(&publish.topic).unwrap_or_default(),
                publish,
                props,
                now_ms,
                codec: &codec,
            };
            for client_id in clients {
                self.take(&mut index, &client_id, &offered, &mut taken);
            }
        }
        if taken.is_empty() {
            return false;
        }
        let rows: Vec<(&str, u64, &[u8])> = taken
            .iter()
            .map(|t| (t.client_id.as_str(), t.seq, t.packet.as_slice()))
            .collect();
        match store.put_session_messages(&rows).await {
            Ok(()) => {
                self.stats
                    .session_messages_saved
                    .fetch_add(taken.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                warn!(error = %e, messages = taken.len(), "cannot queue messages for away sessions");
                for t in &taken {
                    if let Some(w) = index.sessions.get_mut(&t.client_id) {
                        w.queued -= 1;
                    }
                }
                index.total -= taken.len();
                self.stats
                    .session_messages_dropped
                    .fetch_add(taken.len() as u64, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues `offered` for `client_id` when its subscriptions take it and there is room.
    fn take(&self, index: &mut Index, client_id: &str, offered: &Offered, taken: &mut Vec<Taken>) {
        let Offered {
            topic,
            publish,
            props,
            now_ms,
            codec,
        } = *offered;
        let over_total = index.total >= self.max_total;
        let Some(w) = index.sessions.get_mut(client_id) else {
            return;
        };
        let mut props = props.clone();
        let marks = strip_marks(&mut props, client_id);
        let Some(out) = queued_publish(&w.filters, topic, publish, marks) else {
            return;
        };
        if over_total || w.queued >= self.max_per_session {
            self.stats
                .session_messages_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(fingerprints) = w.taken.as_mut() {
            *fingerprints.entry(delivery_fingerprint(&out)).or_default() += 1;
        }
        let mut buf = BytesMut::new();
        if codec.write(Packet::Publish(out, props), &mut buf).is_err() {
            warn!(thing = %Escaped(client_id), "a message for an away session does not encode; left out");
            return;
        }
        let seq = w.next;
        w.next += 1;
        w.queued += 1;
        index.total += 1;
        taken.push(Taken {
            client_id: client_id.to_owned(),
            seq,
            packet: queued_entry(now_ms, &buf),
        });
    }

    /// Makes what [`OfflineQueues::capture`] wrote durable.
    pub(super) async fn flush(&self) -> Result<(), SpoolError> {
        match self.store() {
            Some(store) => store.flush().await,
            None => Ok(()),
        }
    }

    /// Away sessions and the messages queued for them.
    pub async fn len(&self) -> (usize, usize) {
        let index = self.index.read().await;
        (index.sessions.len(), index.total)
    }
}

/// What an away session with `filters` queues of a publish on `topic` (device form, `marks`
/// read off it): the QoS 1 PUBLISH to keep, or nothing. §3.8.4: a QoS 0 publish or a QoS 0
/// subscription makes a QoS 0 delivery, which is not queued; §3.8.3.1 No Local and Retain As
/// Published as the live session applies them.
pub(super) fn queued_publish(
    filters: &[Subscription],
    topic: &str,
    publish: &Publish,
    marks: Marks,
) -> Option<Publish> {
    let matching: Vec<&Subscription> = filters
        .iter()
        .filter(|s| crate::topic::matches(topic, &s.filter))
        .collect();
    if marks.qos0
        || matching.iter().all(|s| s.qos == 0)
        || (marks.from_me && matching.iter().all(|s| s.no_local))
    {
        return None;
    }
    let retain = marks.retained && matching.iter().any(|s| s.retain_as_published);
    Some(super::codec::publish_with_id(
        &publish.topic,
        &publish.payload,
        QoS::AtLeastOnce,
        1,
        retain,
    ))
}

fn remove_filters(trie: &mut Node, client_id: &str, filters: &[Subscription]) {
    for s in filters {
        trie.remove(s.filter.split('/'), client_id);
    }
}

/// Published at QoS 1 (the router form keeps QoS 1 for a QoS 0 publish, marked).
fn at_qos1(publish: &Publish, props: &Option<PublishProperties>) -> bool {
    let marked_qos0 = props
        .as_ref()
        .is_some_and(|p| p.user_properties.iter().any(|(k, _)| k == QOS0_MARK));
    !marked_qos0 && qos_and_pkid(publish).0 == QoS::AtLeastOnce
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matching(trie: &Node, topic: &str) -> Vec<String> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = HashSet::new();
        trie.matches(&levels, true, &mut out);
        let mut v: Vec<String> = out.into_iter().map(str::to_owned).collect();
        v.sort();
        v
    }

    #[test]
    fn the_trie_matches_as_mqtt_says() {
        let mut trie = Node::default();
        for (i, f) in ["a/b", "a/+", "a/#", "#", "+/b", "$SYS/#", "+/+/c", "a/b/#"]
            .iter()
            .enumerate()
        {
            trie.insert(f, &format!("c{i}"));
        }
        assert_eq!(matching(&trie, "a/b"), ["c0", "c1", "c2", "c3", "c4", "c7"]);
        assert_eq!(matching(&trie, "a"), ["c2", "c3"]);
        assert_eq!(matching(&trie, "$SYS/x"), ["c5"]);
        assert_eq!(matching(&trie, "x/y/c"), ["c3", "c6"]);
        assert!(!trie.remove("a/#".split('/'), "c2"));
        assert_eq!(matching(&trie, "a"), ["c3"]);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("$s".to_owned()),
            Just(String::new()),
        ]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![level(), Just("+".to_owned())]
    }

    proptest! {
        #[test]
        fn the_trie_agrees_with_the_topic_matcher(
            filters in proptest::collection::vec(
                (proptest::collection::vec(filter_level(), 1..4), any::<bool>()), 1..8),
            topic in proptest::collection::vec(level(), 1..5),
            removed in 0usize..8,
        ) {
            let filters: Vec<String> = filters
                .into_iter()
                .map(|(mut l, hash)| { if hash { l.push("#".into()); } l.join("/") })
                .collect();
            let mut trie = Node::default();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, &format!("c{i}"));
            }
            if removed < filters.len() {
                trie.remove(filters[removed].split('/'), &format!("c{removed}"));
            }
            let topic = topic.join("/");
            let mut expected: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(i, f)| *i != removed && crate::topic::matches(&topic, f))
                .map(|(i, _)| format!("c{i}"))
                .collect();
            expected.sort();
            expected.dedup();
            prop_assert_eq!(matching(&trie, &topic), expected);
        }
    }
}
