//! Persistent sessions across a disconnect and a restart: what is kept of one, when, and how
//! it comes back.
//!
//! A session whose Session Expiry Interval is above 0 is written to the spool's sealed
//! `sessions` tree ([`crate::spool::Spool::put_session`]) when it connects and when its device
//! leaves; it is removed, with its queue, when it ends (expiry, a clean start, expiry 0,
//! revocation). Its messages are never in this value: while the device is away they are
//! queued in the store one by one as they are published ([`crate::edge::OfflineQueues`]), so
//! a crash keeps every message a publisher had acknowledged.
//!
//! When a device leaves, its session is handed over from the router ([`hand_over`]): the
//! offline queue starts taking its messages, the router's backlog for it (what it had sent
//! and not had acknowledged, and what it held back) is drained into the queue, and the router
//! forgets it. When the device returns ([`resume`]), the router is given its subscriptions
//! first and the queue stops only once the router has taken them, so no message falls between
//! the two (one published in that instant may come twice, as QoS 1 allows). At start, each
//! kept session that has not expired, counting the time the gateway was down, is watched
//! again and parked.
//!
//! Value format (plain, before sealing), integers little-endian: version `2` (u8); expiry
//! seconds (u32); Unix ms the device left, `u64::MAX` while connected (u64); subscriptions
//! (u16 count; each filter as u16 length and UTF-8, granted QoS u8, flags u8: 1 No Local, 2
//! Retain As Published); sequences of queued messages sent and not acknowledged (u32 count,
//! u64 each). Version 1 (the same head, then fingerprints and the queued PUBLISH packets in
//! the value) is read, and its messages moved to the queue.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::local::LinkError;
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, QoS, RetainForwardRule,
    Subscribe,
};
use rumqttd::Notification;
use tracing::{info, warn};

use crate::edge::broker::{device_form, RouterLink};
use crate::edge::codec::{Codec, Version};
use crate::edge::marks::{delivery_fingerprint, qos_and_pkid};
use crate::edge::offline::{queued_entry, queued_publish, Front};
use crate::edge::table::{Parked, Subscription};
use crate::escape::Escaped;

use super::EdgeContext;

const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
const CONNECTED: u64 = u64::MAX;
/// A handover waits this long for one more message of the router's backlog before it is done.
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// A handover takes the router's backlog within this, so a leaving session ends in time.
const DRAIN_BUDGET: Duration = Duration::from_secs(2);
/// A resuming session waits this long for the router to take its subscriptions.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// What is kept of one persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedSession {
    pub filters: Vec<Subscription>,
    pub expiry_secs: u32,
    /// When its device left (Unix ms); `None` while it was connected.
    pub left_at_ms: Option<u64>,
    /// Queued messages sent and not acknowledged.
    pub sent: Vec<u64>,
}

/// A saved value that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("saved session: {0}")]
pub(crate) struct DecodeError(&'static str);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn u64s(&mut self) -> Result<Vec<u64>, DecodeError> {
        let n = self.u32()?;
        let mut out = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            out.push(self.u64()?);
        }
        Ok(out)
    }
}

impl SavedSession {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            32 + self
                .filters
                .iter()
                .map(|f| f.filter.len() + 4)
                .sum::<usize>(),
        );
        out.push(VERSION);
        out.extend_from_slice(&self.expiry_secs.to_le_bytes());
        out.extend_from_slice(&self.left_at_ms.unwrap_or(CONNECTED).to_le_bytes());
        // Filters are at most `max_topic_bytes` and a session holds at most
        // `max_subscriptions` of them, far below these widths.
        out.extend_from_slice(&(self.filters.len() as u16).to_le_bytes());
        for f in &self.filters {
            out.extend_from_slice(&(f.filter.len() as u16).to_le_bytes());
            out.extend_from_slice(f.filter.as_bytes());
            out.push(f.qos);
            out.push(u8::from(f.no_local) | (u8::from(f.retain_as_published) << 1));
        }
        out.extend_from_slice(&(self.sent.len() as u32).to_le_bytes());
        for u in &self.sent {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out
    }

    /// The session, and the messages a version 1 value held.
    pub(super) fn decode(bytes: &[u8]) -> Result<(SavedSession, Vec<Bytes>), DecodeError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != VERSION && version != VERSION_1 {
            return Err(DecodeError("unknown version"));
        }
        let expiry_secs = r.u32()?;
        let left_at_ms = Some(r.u64()?).filter(|&t| t != CONNECTED);
        let mut filters = Vec::new();
        for _ in 0..r.u16()? {
            let len = usize::from(r.u16()?);
            let filter = std::str::from_utf8(r.take(len)?)
                .map_err(|_| DecodeError("filter is not UTF-8"))?
                .to_owned();
            let qos = r.u8()?;
            let flags = r.u8()?;
            filters.push(Subscription {
                filter,
                qos: qos.min(1),
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
            });
        }
        let mut sent = r.u64s()?;
        let mut messages = Vec::new();
        if version == VERSION_1 {
            // Fingerprints of router deliveries: the router that would resend them is gone.
            sent.clear();
            for _ in 0..r.u32()? {
                let len = r.u32()? as usize;
                messages.push(Bytes::copy_from_slice(r.take(len)?));
            }
        }
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        let saved = SavedSession {
            filters,
            expiry_secs,
            left_at_ms,
            sent,
        };
        Ok((saved, messages))
    }
}

/// Writes `saved` as the session of `client_id`, when the edge has a store.
pub(super) async fn put(ctx: &EdgeContext, client_id: &str, saved: &SavedSession) {
    if let Some(store) = ctx.fabric.offline().store() {
        match store.put_session(client_id, &saved.encode()).await {
            Ok(()) => {
                ctx.stats.sessions_saved.fetch_add(1, Relaxed);
            }
            Err(e) => {
                warn!(thing = %Escaped(client_id), error = %e, "cannot keep a persistent session in the store")
            }
        }
    }
}

/// Forgets the kept session of `client_id` and its queue.
pub(super) fn remove(ctx: &EdgeContext, client_id: &str) {
    if let Some(store) = ctx.fabric.offline().store() {
        if let Err(e) = store.remove_session(client_id) {
            warn!(thing = %Escaped(client_id), error = %e, "cannot remove a persistent session from the store");
        }
    }
}

/// Removes settled messages (delivered, or given up) from `client_id`'s queue.
pub(super) fn delivered(ctx: &EdgeContext, client_id: &str, seqs: &[u64]) {
    if seqs.is_empty() {
        return;
    }
    if let Some(store) = ctx.fabric.offline().store() {
        if let Err(e) = store.remove_session_messages(client_id, seqs) {
            warn!(thing = %Escaped(client_id), error = %e, "cannot remove delivered messages from a session's queue");
        }
    }
}

pub(super) fn router_subscribe(filters: &[Subscription]) -> Packet {
    let filters = filters
        .iter()
        .map(|s| Filter {
            path: s.filter.clone(),
            qos: rumqttd::protocol::qos(s.qos).unwrap_or(QoS::AtMostOnce),
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid: 1, filters }, None)
}

fn bye() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// The length and last sequence of `client_id`'s queue.
fn queue_of(ctx: &EdgeContext, client_id: &str) -> (usize, Option<u64>) {
    match ctx.fabric.offline().store() {
        Some(store) => store.session_queue(client_id).unwrap_or_else(|e| {
            warn!(thing = %Escaped(client_id), error = %e, "cannot read a session's queue");
            (0, None)
        }),
        None => (0, None),
    }
}

/// What a restart did with the kept sessions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub sessions: usize,
    pub messages: usize,
    pub expired: usize,
    pub damaged: usize,
}

/// Brings back the kept sessions at start (see the module docs).
pub async fn restore_sessions(ctx: &EdgeContext) -> Restored {
    let mut report = Restored::default();
    let Some(store) = ctx.fabric.offline().store() else {
        return report;
    };
    let (kept, damaged) = match store.sessions().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot read the kept persistent sessions");
            return report;
        }
    };
    report.damaged = damaged.len();
    for client_id in damaged {
        warn!(thing = %Escaped(&client_id), "a kept persistent session does not open; removed");
        remove(ctx, &client_id);
    }
    let now_ms = crate::clock::now_ms();
    for (client_id, plain) in kept {
        let (saved, legacy) = match SavedSession::decode(&plain) {
            Ok(s) => s,
            Err(e) => {
                warn!(thing = %Escaped(&client_id), error = %e, "a kept persistent session does not decode; removed");
                remove(ctx, &client_id);
                report.damaged += 1;
                continue;
            }
        };
        let left = saved.left_at_ms.unwrap_or(now_ms).min(now_ms);
        let ends_ms = left.saturating_add(u64::from(saved.expiry_secs) * 1000);
        if ends_ms <= now_ms {
            remove(ctx, &client_id);
            ctx.stats.sessions_expired.fetch_add(1, Relaxed);
            report.expired += 1;
            continue;
        }
        if !legacy.is_empty() {
            let (_, last) = queue_of(ctx, &client_id);
            let first = last.map_or(1, |l| l + 1);
            let entries: Vec<Vec<u8>> = legacy.iter().map(|m| queued_entry(left, m)).collect();
            let rows: Vec<(&str, u64, &[u8])> = entries
                .iter()
                .zip(first..)
                .map(|(m, seq)| (client_id.as_str(), seq, &m[..]))
                .collect();
            if let Err(e) = store.put_session_messages(&rows).await {
                warn!(thing = %Escaped(&client_id), error = %e, "cannot move a kept session's messages to its queue");
            }
            let saved = SavedSession {
                left_at_ms: Some(left),
                ..saved.clone()
            };
            put(ctx, &client_id, &saved).await;
        }
        if saved.filters.iter().any(|s| s.no_local) {
            ctx.fabric.use_no_local();
        }
        let (queued, last) = queue_of(ctx, &client_id);
        ctx.fabric
            .offline()
            .watch(&client_id, saved.filters.clone(), queued, last, false)
            .await;
        report.sessions += 1;
        report.messages += queued;
        ctx.stats.sessions_restored.fetch_add(1, Relaxed);
        ctx.sessions.park(
            &client_id,
            Parked {
                filters: saved.filters,
                expires_at: Instant::now() + Duration::from_millis(ends_ms - now_ms),
                sent: saved.sent,
            },
        );
    }
    if let Err(e) = store.flush().await {
        warn!(error = %e, "cannot flush the kept persistent sessions");
    }
    if report != Restored::default() {
        info!(
            sessions = report.sessions,
            messages = report.messages,
            expired = report.expired,
            damaged = report.damaged,
            "persistent sessions brought back"
        );
    }
    report
}

/// Starts the offline queue of a session whose device is leaving, before its router link is
/// released; the handover that follows drains the router's backlog to `Front`.
pub(super) async fn watch_leaving(
    ctx: &EdgeContext,
    client_id: &str,
    filters: &[Subscription],
) -> Front {
    let (queued, last) = queue_of(ctx, client_id);
    ctx.fabric
        .offline()
        .watch(client_id, filters.to_vec(), queued, last, true)
        .await
}

/// Hands a session whose device just left over from the router to the offline queue (see
/// the module docs). `unacked` are fingerprints of the router's deliveries the device had not
/// acknowledged: drained again, they are kept marked DUP.
pub(super) async fn hand_over(
    ctx: &EdgeContext,
    client_id: &str,
    filters: &[Subscription],
    mut unacked: Vec<u64>,
    front: Front,
) {
    let offline = ctx.fabric.offline();
    let mut drained = Vec::new();
    let generation = ctx.fabric.generation();
    match ctx.fabric.link(client_id, false).await {
        Ok(mut link) => {
            drain(
                ctx,
                client_id,
                filters,
                &mut link,
                &mut unacked,
                &mut drained,
            )
            .await;
            let _ = ctx.fabric.send(&mut link, vec![bye()]).await;
        }
        Err(e) => {
            warn!(thing = %Escaped(client_id), error = %e, "cannot take a leaving session's backlog from the router")
        }
    }
    if let Err(e) = ctx.fabric.forget(client_id, generation).await {
        warn!(thing = %Escaped(client_id), error = %e, "cannot end a leaving session in the router");
    }
    let still_away = offline.handed_over(client_id).await;
    let Some(store) = offline.store() else {
        return;
    };
    if !still_away {
        // It expired during the handover: nothing of it is kept.
        remove(ctx, client_id);
        return;
    }
    let rows: Vec<(&str, u64, &[u8])> = drained
        .iter()
        .zip(front.0..)
        .map(|(m, seq)| (client_id, seq, &m[..]))
        .collect();
    let written = store.put_session_messages(&rows).await;
    match written {
        Ok(()) => {
            ctx.stats
                .session_messages_saved
                .fetch_add(rows.len() as u64, Relaxed);
        }
        Err(e) => {
            warn!(thing = %Escaped(client_id), error = %e, "cannot queue a leaving session's backlog")
        }
    }
    if let Err(e) = store.flush().await {
        warn!(thing = %Escaped(client_id), error = %e, "a leaving session's queue may not be durable");
    }
}

/// Moves what the router holds for `client_id` on `link` into `drained`, in order, acking
/// each: until the router is idle for [`DRAIN_IDLE`], within [`DRAIN_BUDGET`].
async fn drain(
    ctx: &EdgeContext,
    client_id: &str,
    filters: &[Subscription],
    link: &mut RouterLink,
    unacked: &mut Vec<u64>,
    drained: &mut Vec<Bytes>,
) {
    let offline = ctx.fabric.offline();
    let codec = Codec::new(Version::V5, usize::MAX);
    let started = Instant::now();
    while started.elapsed() < DRAIN_BUDGET {
        let next = tokio::time::timeout(DRAIN_IDLE, link.rx.next()).await;
        let forward = match next {
            Ok(Ok(Some(Notification::Forward(f)))) => f,
            Ok(Ok(Some(Notification::Unschedule))) => {
                if link.rx.wake().await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Ok(Some(_))) | Ok(Ok(None)) => continue,
            Ok(Err(_)) | Err(_) => return,
        };
        let (mut publish, mut props) = (forward.publish, forward.properties);
        let marks = device_form(&mut publish, &mut props, client_id);
        let (qos, pkid) = qos_and_pkid(&publish);
        if qos == QoS::AtMostOnce {
            continue;
        }
        let ack = Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        );
        if ctx.fabric.send(link, vec![ack]).await.is_err() {
            return;
        }
        let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
        let Some(out) = queued_publish(filters, topic, &publish, marks) else {
            continue;
        };
        let fingerprint = delivery_fingerprint(&out);
        if offline.taken_already(client_id, fingerprint).await || !offline.book(client_id).await {
            continue;
        }
        let mut buf = BytesMut::new();
        if codec.write(Packet::Publish(out, props), &mut buf).is_ok() {
            if let Some(i) = unacked.iter().position(|&f| f == fingerprint) {
                unacked.swap_remove(i);
                buf[0] |= super::DUP;
            }
            drained.push(Bytes::from(queued_entry(crate::clock::now_ms(), &buf)));
        }
    }
}

/// Gives a resuming session's subscriptions to the router on `link`, waits until the router
/// has taken them, then stops its offline queue and returns what the queue holds, oldest
/// first, with each message's sequence.
pub(super) async fn resume(
    ctx: &EdgeContext,
    client_id: &str,
    link: &mut RouterLink,
    filters: &[Subscription],
) -> Result<Vec<(u64, Bytes)>, LinkError> {
    if !filters.is_empty() {
        let _ = ctx.fabric.send(link, vec![router_subscribe(filters)]).await;
        let taken = tokio::time::timeout(SUBSCRIBE_WAIT, async {
            loop {
                match link.rx.next().await? {
                    Some(Notification::Unschedule) => link.rx.wake().await?,
                    Some(n) => {
                        // rumqttd's acks are private; as a packet, this one is a SUBACK.
                        if let Some(Packet::SubAck(..)) = Option::<Packet>::from(n) {
                            return Ok::<(), LinkError>(());
                        }
                    }
                    None => {}
                }
            }
        })
        .await;
        match taken {
            Ok(r) => r?,
            Err(_) => {
                warn!(thing = %Escaped(client_id), "the router did not confirm a resumed session's subscriptions in time")
            }
        }
    }
    ctx.fabric.offline().unwatch(client_id).await;
    let Some(store) = ctx.fabric.offline().store() else {
        return Ok(Vec::new());
    };
    match store.session_messages(client_id).await {
        Ok((messages, damaged)) => {
            if damaged > 0 {
                warn!(thing = %Escaped(client_id), damaged, "queued messages that do not open were removed");
            }
            Ok(messages
                .into_iter()
                .map(|(seq, m)| (seq, Bytes::from(m)))
                .collect())
        }
        Err(e) => {
            warn!(thing = %Escaped(client_id), error = %e, "cannot read a resumed session's queue");
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_session_decodes_to_itself_and_damage_is_an_error() {
        let saved = SavedSession {
            filters: vec![
                Subscription {
                    filter: "cmd/pump-1/#".into(),
                    qos: 1,
                    no_local: true,
                    retain_as_published: false,
                },
                Subscription {
                    filter: "cfg/+".into(),
                    qos: 0,
                    no_local: false,
                    retain_as_published: true,
                },
            ],
            expiry_secs: 3600,
            left_at_ms: Some(1_700_000_000_000),
            sent: vec![7, u64::MAX - 1],
        };
        let bytes = saved.encode();
        assert_eq!(
            SavedSession::decode(&bytes).unwrap(),
            (saved.clone(), vec![])
        );
        let connected = SavedSession {
            left_at_ms: None,
            ..saved.clone()
        };
        assert_eq!(
            SavedSession::decode(&connected.encode()).unwrap().0,
            connected
        );
        // Version 1 kept fingerprints and the messages in the value.
        let mut v1 = bytes.clone();
        v1[0] = VERSION_1;
        v1.extend_from_slice(&2u32.to_le_bytes());
        for m in [&b"\x32\x05\x00\x01a\x00\x01"[..], b""] {
            v1.extend_from_slice(&(m.len() as u32).to_le_bytes());
            v1.extend_from_slice(m);
        }
        let (old, messages) = SavedSession::decode(&v1).unwrap();
        assert_eq!(
            old,
            SavedSession {
                sent: vec![],
                ..saved.clone()
            }
        );
        assert_eq!(
            messages,
            [
                Bytes::from_static(b"\x32\x05\x00\x01a\x00\x01"),
                Bytes::new()
            ]
        );
        for cut in 0..bytes.len() {
            assert!(SavedSession::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SavedSession::decode(&longer).is_err());
    }
}
