//! Persistent sessions across a restart: what is kept of one, when, and how it comes back.
//!
//! A session whose Session Expiry Interval is above 0 is written to the spool's sealed
//! `sessions` tree ([`crate::spool::Spool::put_session`]) when it connects and when its device
//! leaves; it is removed when it ends (expiry, a clean start, expiry 0, revocation). At a stop,
//! after every connection has closed, the messages the router queued for each session that is
//! away are taken from it and written with the session (at most
//! `listener.max_session_messages` per session, `listener.max_saved_messages` in all; the rest
//! are counted as dropped). At start, each kept session that has not expired, counting the
//! time the gateway was down, is given to the router again (so messages published before its
//! device returns are queued) and parked with its saved messages, which its device gets first
//! when it resumes.
//!
//! Value format (plain, before sealing), integers little-endian: version `1` (u8); expiry
//! seconds (u32); Unix ms the device left, `u64::MAX` while connected (u64); subscriptions
//! (u16 count; each filter as u16 length and UTF-8, granted QoS u8, flags u8: 1 No Local, 2
//! Retain As Published); fingerprints of unacknowledged deliveries (u32 count, u64 each);
//! queued messages (u32 count; each an MQTT 5 PUBLISH packet as the device gets it, u32
//! length and bytes).
//!
//! A crash keeps what was last written: the subscriptions a session had when it connected or
//! last left, without the messages queued since.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, QoS, RetainForwardRule,
    Subscribe,
};
use rumqttd::Notification;
use tracing::{info, warn};

use crate::edge::broker::{device_form, publish_with_id, qos_and_pkid, RouterLink};
use crate::edge::codec::{Codec, Version};
use crate::edge::table::{Parked, Subscription};
use crate::escape::Escaped;

use super::EdgeContext;

const VERSION: u8 = 1;
const CONNECTED: u64 = u64::MAX;
/// A stop waits this long for one more queued message of a session before moving on.
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// All sessions' queued messages are taken within this, so the stop stays in its deadline.
const DRAIN_BUDGET: Duration = Duration::from_secs(5);

/// What is kept of one persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedSession {
    pub filters: Vec<Subscription>,
    pub expiry_secs: u32,
    /// When its device left (Unix ms); `None` while it was connected.
    pub left_at_ms: Option<u64>,
    pub unacked: Vec<u64>,
    /// Queued deliveries, each an MQTT 5 PUBLISH packet.
    pub messages: Vec<Bytes>,
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
}

impl SavedSession {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            32 + self
                .filters
                .iter()
                .map(|f| f.filter.len() + 4)
                .sum::<usize>()
                + self.messages.iter().map(|m| m.len() + 4).sum::<usize>(),
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
        out.extend_from_slice(&(self.unacked.len() as u32).to_le_bytes());
        for u in &self.unacked {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out.extend_from_slice(&(self.messages.len() as u32).to_le_bytes());
        for m in &self.messages {
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<SavedSession, DecodeError> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
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
        let n = r.u32()?;
        let mut unacked = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            unacked.push(r.u64()?);
        }
        let n = r.u32()?;
        let mut messages = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let len = r.u32()? as usize;
            messages.push(Bytes::copy_from_slice(r.take(len)?));
        }
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(SavedSession {
            filters,
            expiry_secs,
            left_at_ms,
            unacked,
            messages,
        })
    }
}

/// Writes `saved` as the session of `client_id`, when the edge has a store.
pub(super) async fn put(ctx: &EdgeContext, client_id: &str, saved: &SavedSession) {
    if let Some(store) = ctx.store.as_ref().and_then(|s| s.upgrade()) {
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

/// Forgets the kept session of `client_id`.
pub(super) fn remove(ctx: &EdgeContext, client_id: &str) {
    if let Some(store) = ctx.store.as_ref().and_then(|s| s.upgrade()) {
        if let Err(e) = store.remove_session(client_id) {
            warn!(thing = %Escaped(client_id), error = %e, "cannot remove a persistent session from the store");
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
    let Some(store) = ctx.store.as_ref().and_then(|s| s.upgrade()) else {
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
    }
    let now_ms = crate::clock::now_ms();
    for (client_id, plain) in kept {
        let saved = match SavedSession::decode(&plain) {
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
        // The router learns the session again, so what is published before the device
        // returns is queued for it too.
        let generation = match ctx.fabric.link(&client_id, false).await {
            Ok(mut link) => {
                let mut packets = Vec::new();
                if !saved.filters.is_empty() {
                    packets.push(router_subscribe(&saved.filters));
                }
                packets.push(bye());
                let generation = link.generation;
                let _ = ctx.fabric.send(&mut link, packets).await;
                generation
            }
            Err(e) => {
                warn!(thing = %Escaped(&client_id), error = %e, "cannot give a kept session to the router");
                ctx.fabric.generation()
            }
        };
        report.sessions += 1;
        report.messages += saved.messages.len();
        ctx.stats.sessions_restored.fetch_add(1, Relaxed);
        ctx.sessions.park(
            &client_id,
            Parked {
                filters: saved.filters,
                generation,
                expires_at: Instant::now() + Duration::from_millis(ends_ms - now_ms),
                unacked: saved.unacked,
                stored: saved.messages,
            },
        );
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

/// At a stop, once every connection is closed: takes from the router the messages queued for
/// each session that is away and keeps them with it (see the module docs).
pub async fn save_sessions(ctx: &EdgeContext) {
    if ctx.store.is_none() {
        return;
    }
    let started = Instant::now();
    let mut budget = ctx.limits.max_saved_messages;
    let codec = Codec::new(Version::V5, usize::MAX);
    for (client_id, parked) in ctx.sessions.parked_sessions() {
        let remaining = parked.expires_at.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            continue;
        }
        let mut messages = parked.stored.clone();
        if parked.generation == ctx.fabric.generation() && started.elapsed() < DRAIN_BUDGET {
            match ctx.fabric.link(&client_id, false).await {
                Ok(mut link) => {
                    drain(
                        ctx,
                        &client_id,
                        &parked,
                        &mut link,
                        &codec,
                        &mut messages,
                        &mut budget,
                    )
                    .await;
                    let _ = ctx.fabric.send(&mut link, vec![bye()]).await;
                }
                Err(e) => {
                    warn!(thing = %Escaped(&client_id), error = %e, "cannot take a session's queued messages from the router")
                }
            }
        }
        let saved = SavedSession {
            filters: parked.filters.clone(),
            expiry_secs: u32::try_from(remaining.as_secs().max(1)).unwrap_or(u32::MAX),
            left_at_ms: Some(crate::clock::now_ms()),
            unacked: parked.unacked.clone(),
            messages,
        };
        put(ctx, &client_id, &saved).await;
    }
}

/// Moves what the router queued on `link` into `messages`, within the limits.
async fn drain(
    ctx: &EdgeContext,
    client_id: &str,
    parked: &Parked,
    link: &mut RouterLink,
    codec: &Codec,
    messages: &mut Vec<Bytes>,
    budget: &mut usize,
) {
    let per_session = ctx.limits.max_session_messages;
    loop {
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
        if qos != QoS::AtMostOnce {
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
        }
        let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
        let own = marks.from_me
            && parked
                .filters
                .iter()
                .filter(|s| crate::topic::matches(topic, &s.filter))
                .all(|s| s.no_local);
        if own {
            continue;
        }
        if messages.len() >= per_session || *budget == 0 {
            ctx.stats.session_messages_dropped.fetch_add(1, Relaxed);
            continue;
        }
        let qos = if marks.qos0 { QoS::AtMostOnce } else { qos };
        let packet = Packet::Publish(
            publish_with_id(&publish.topic, &publish.payload, qos, 1, false),
            props,
        );
        let mut buf = BytesMut::new();
        if codec.write(packet, &mut buf).is_ok() {
            messages.push(buf.freeze());
            *budget -= 1;
            ctx.stats.session_messages_saved.fetch_add(1, Relaxed);
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
            unacked: vec![7, u64::MAX - 1],
            messages: vec![
                Bytes::from_static(b"\x32\x05\x00\x01a\x00\x01"),
                Bytes::new(),
            ],
        };
        let bytes = saved.encode();
        assert_eq!(SavedSession::decode(&bytes).unwrap(), saved);
        let connected = SavedSession {
            left_at_ms: None,
            ..saved.clone()
        };
        assert_eq!(
            SavedSession::decode(&connected.encode()).unwrap(),
            connected
        );
        for cut in 0..bytes.len() {
            assert!(SavedSession::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SavedSession::decode(&longer).is_err());
    }
}
