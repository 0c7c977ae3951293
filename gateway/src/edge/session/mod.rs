//! One device's MQTT session, from CONNECT to close, with a policy check on every packet.
//!
//! The session is the only place device packets are interpreted. It answers the device itself
//! (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP) and passes to the router only what the
//! device's current grant allows, so the router never sees a denied topic. When the operator
//! approves or revokes the thing, the authority's epoch changes and the session re-reads its
//! grant before the next packet; a revocation ends it at once.
//!
//! Layout, in the order a session lives:
//! - `connect`: the CONNECT phase: read it within the deadline, admit the identity, CONNACK,
//!   then [`run`] hands over to serving.
//! - `serve`: the loop over socket reads, router deliveries, grant changes and router rebuilds;
//!   every packet's checks.
//! - `acks`: PUBACKs held until the spool has made their messages durable.
//! - `close`: why a session ends, the DISCONNECT it sends, the will, parking a persistent
//!   session, and ending it when it expires.
//! - `saved`: persistent sessions across a disconnect and a restart: the kept value, the
//!   handover to the offline queue when a device leaves, the resumption, the restore at start.
//! - `claim`: a connection with a claim certificate (`[auth.enrollment]`), which speaks only
//!   the enrollment topics and never becomes a session of the kinds above.
//!
//! This file holds what all phases share: the limits, the context, the socket and the
//! session's state.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{LastWill, LastWillProperties, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::warn;

use crate::auth::{Authority, Grant};
use crate::edge::broker::{Fabric, RouterLink};
use crate::edge::codec::Codec;
use crate::edge::table::{SessionTable, Subscription};
use crate::identity::pki::Identity;
use crate::metrics::Stats;
use crate::pipeline::{Ingest, Message};
use crate::topic::TopicLimits;

mod acks;
mod claim;
mod close;
mod connect;
mod saved;
mod serve;

pub(super) use claim::run_claim;
pub use close::expire_sessions;
pub(super) use connect::run;
pub use saved::{restore_sessions, Restored};

/// The most one socket read takes: a burst of small publishes. It is read into the stack and
/// copied into the connection's read buffer, so a connection waiting for its device holds no
/// buffer of its own (rustls keeps its own 4 KiB for the records).
const READ_BUFFER: usize = 4096;
/// rumqttd numbers a link's deliveries 1 to 100 (its fixed in-flight window), so the session's
/// own QoS 1 deliveries take ids above that.
const FIRST_OWN_PKID: u16 = 101;
/// The DUP flag of a PUBLISH's fixed header (§3.3.1.1).
const DUP: u8 = 0x08;

/// The per-connection limits from `[listener]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_inflight: u16,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub max_keep_alive_secs: u16,
    pub max_session_expiry_secs: u32,
    pub max_session_messages: usize,
    pub max_saved_messages: usize,
    pub topics: TopicLimits,
    pub max_filters_per_subscribe: usize,
    pub max_subscriptions: usize,
}

impl Limits {
    pub fn of(l: &super::ListenerConfig) -> Limits {
        Limits {
            max_packet_size: usize::try_from(l.max_packet_size.0).unwrap_or(usize::MAX),
            max_inflight: l.max_inflight,
            connect_timeout: l.connect_timeout(),
            write_timeout: l.write_timeout(),
            max_keep_alive_secs: l.max_keep_alive_secs,
            max_session_expiry_secs: l.max_session_expiry_secs,
            max_session_messages: l.max_session_messages,
            max_saved_messages: l.max_saved_messages,
            topics: l.topic_limits(),
            max_filters_per_subscribe: l.max_filters_per_subscribe,
            max_subscriptions: l.max_subscriptions,
        }
    }
}

/// What every session shares.
pub struct EdgeContext {
    pub authority: Arc<Authority>,
    pub fabric: Arc<Fabric>,
    pub sessions: Arc<SessionTable>,
    pub stats: Arc<Stats>,
    pub limits: Limits,
    /// Where allowed publishes go to be routed and spooled; `None` when nothing is routed.
    pub ingest: Option<Ingest>,
    /// In-band enrollment by claim certificate, when `[auth.enrollment]` is set.
    pub enrollment: Option<Arc<crate::auth::Enrollment>>,
    /// Jobs and shadow topics relayed to IoT Core, when `[relay]` is set.
    pub relay: Option<crate::edge::relay::Relay>,
}

/// The socket and its buffers. Both buffers are empty, with no allocation, while the
/// connection waits: at 10,000 mostly idle devices a 4 KiB read buffer and a 1 KiB write
/// buffer each were 50 MB.
struct Conn<S> {
    stream: S,
    /// Bytes read and not yet parsed: a packet's beginning, between reads.
    rbuf: BytesMut,
    wbuf: BytesMut,
    write_timeout: Duration,
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads what the device sent next onto the end of `rbuf`: up to [`READ_BUFFER`] bytes,
    /// read on the stack (never in the task's state, where it would stay for the session) and
    /// copied into a buffer of their size. Returns the count; 0 is the end of the stream.
    async fn read(&mut self) -> std::io::Result<usize> {
        let Conn { stream, rbuf, .. } = self;
        std::future::poll_fn(|cx| {
            let mut chunk = [const { std::mem::MaybeUninit::<u8>::uninit() }; READ_BUFFER];
            let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
            std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read))?;
            rbuf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        })
        .await
    }

    /// Frees the read buffer once every packet in it is handled (the payloads were copied
    /// out; see `acks::detach_payloads`).
    fn release_read_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        let result = match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write timed out".to_owned()),
        };
        // Freed, not cleared: the next write is most often a PUBACK or two, and an idle
        // connection should hold nothing.
        self.wbuf = BytesMut::new();
        result
    }

    async fn send_connack(&mut self, codec: &Codec, packet: Packet) -> Result<(), String> {
        codec
            .write(packet, &mut self.wbuf)
            .map_err(|e| e.to_string())?;
        self.flush().await
    }
}

/// The state of a connected session.
struct Session {
    ctx: Arc<EdgeContext>,
    codec: Codec,
    identity: Identity,
    /// The identity as shared strings, stamped on every message handed to the pipeline.
    thing: Arc<str>,
    cert_id: Arc<str>,
    /// The device's IP address (without the port), stamped likewise.
    source_ip: Arc<str>,
    grant: Grant,
    epoch: watch::Receiver<u64>,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    /// This device's own router link, once it needs one (see `run`).
    link: Option<RouterLink>,
    /// The link was made clean: the router forgets the session when it ends.
    link_clean: bool,
    /// Seconds the session outlives the connection (a DISCONNECT may change it).
    expiry: u32,
    expiry_at_connect: u32,
    /// The device's Receive Maximum and Maximum Packet Size.
    receive_max: u16,
    max_packet_to_device: usize,
    /// Deliveries waiting for the device's Receive Maximum, in router order.
    waiting: std::collections::VecDeque<Outgoing>,
    /// QoS 1 deliveries written to the device and not yet acknowledged by it.
    in_flight: usize,
    /// Packet ids of the session's own QoS 1 deliveries (retained messages after a SUBSCRIBE,
    /// queued messages of a resumed session, with their sequence) that the device has not
    /// acknowledged, and the next one to use.
    own_unacked: Vec<(u16, Option<u64>)>,
    next_own_pkid: u16,
    /// Filters granted and passed to the router with their granted QoS, re-checked when the
    /// grant changes and given to a rebuilt router.
    filters: Vec<Subscription>,
    /// Since the last read, the subscriptions changed (a persistent session keeps them).
    subscriptions_changed: bool,
    /// The router's generation; a change means this session's link is gone and it links again.
    generations: watch::Receiver<u64>,
    /// Packets for the router from the current read, handed over in one go.
    to_router: Vec<Packet>,
    /// Allowed publishes of the current read that a route takes.
    to_ingest: Vec<Message>,
    /// QoS 1 PUBACKs of the current read, in PUBLISH order.
    read_acks: Vec<rumqttd::protocol::PubAck>,
    /// Earlier reads' PUBACKs waiting for the spool, oldest first.
    held: std::collections::VecDeque<acks::HeldAcks>,
    denials_logged: u32,
    /// When the current socket read was taken (monotonic, and Unix ms for the records): every
    /// message of one read shares it.
    read_at: (std::time::Instant, u64),
    /// The router paused deliveries to this link until it is told we caught up.
    wake_router: bool,
    /// The router's QoS 1 deliveries not yet acknowledged to it, in order.
    router_acks: std::collections::VecDeque<RouterAck>,
}

/// A QoS 1 delivery of the router's that waits for its PUBACK.
#[derive(Debug, Clone, Copy)]
struct RouterAck {
    pkid: u16,
    /// The session acknowledges it, not the device: it was lowered to QoS 0 (§3.8.4) or was
    /// too large for the device (MQTT-3.1.2-25).
    by_session: bool,
    /// Written to the device (not waiting for its Receive Maximum).
    sent: bool,
    /// Of topic and payload, kept for a persistent session so that, drained from the router
    /// unacknowledged when the device leaves, it is queued marked DUP.
    fingerprint: u64,
}

/// A delivery on its way to the device.
struct Outgoing {
    publish: rumqttd::protocol::Publish,
    props: Option<rumqttd::protocol::PublishProperties>,
    /// The packet id when it goes out at QoS 1: the router's, or the session's own.
    pkid: Option<u16>,
    /// A retained message the session sends itself after a SUBSCRIBE, or a queued one.
    own: bool,
    /// The sequence of a queued message in the offline queue, removed once settled.
    stored: Option<u64>,
    /// Sent before: it goes out with DUP set (MQTT-3.3.1-1).
    dup: bool,
}

impl Session {
    /// Encodes `packet` for the device into `wbuf`; one that cannot be encoded is logged and
    /// left out.
    fn write(&mut self, packet: Packet, wbuf: &mut BytesMut) {
        if let Err(e) = self.codec.write(packet, wbuf) {
            warn!(thing = %self.identity.thing, error = %e, "cannot encode a packet for the device");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn conn(stream: tokio::io::DuplexStream) -> Conn<tokio::io::DuplexStream> {
        Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            write_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_waiting_connection_holds_no_buffers() {
        let (mut device, gateway) = tokio::io::duplex(64 * 1024);
        let mut conn = conn(gateway);
        // More than one read's worth: the rest stays for the next read, in order.
        let sent: Vec<u8> = (0..READ_BUFFER + 100).map(|i| (i % 251) as u8).collect();
        device.write_all(&sent).await.unwrap();
        assert_eq!(conn.read().await.unwrap(), READ_BUFFER);
        assert_eq!(conn.read().await.unwrap(), 100);
        assert_eq!(&conn.rbuf[..], &sent[..]);
        // A packet's beginning stays until the rest comes.
        conn.release_read_buffer();
        assert_eq!(conn.rbuf.len(), sent.len());
        let _ = conn.rbuf.split_to(sent.len());
        conn.release_read_buffer();
        assert_eq!(conn.rbuf.capacity(), 0);

        conn.wbuf.extend_from_slice(b"\x40\x02\x00\x01");
        conn.flush().await.unwrap();
        assert_eq!(conn.wbuf.capacity(), 0);
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut device, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"\x40\x02\x00\x01");

        drop(device);
        assert_eq!(
            conn.read().await.unwrap(),
            0,
            "the end of the stream reads as 0"
        );
    }
}
