//! One device's MQTT session, from CONNECT to close, with a policy check on every packet.
//!
//! The session is the only place device packets are interpreted. It answers the device itself
//! (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP) and passes to the router only what the
//! device's current grant allows, so the router never sees a denied topic. When the operator
//! approves or revokes the thing, the authority's epoch changes and the session re-reads its
//! grant before the next packet; a revocation ends it at once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    Filter, LastWill, LastWillProperties, Packet, PingResp, PubAck, PubAckReason, QoS, SubAck,
    Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::{Authority, DeviceState, Grant, Operation};
use crate::edge::broker::{device_topic, publish_packet, Fabric, RouterLink};
use crate::edge::codec::{connect_version, Codec, CodecError, Frame, Version};
use crate::edge::table::{EndReason, Parked, SessionSlot, SessionTable};
use crate::escape::Escaped;
use crate::identity::pki::Identity;
use crate::identity::valid_thing_name;
use crate::metrics::Stats;
use crate::pipeline::{Ingest, Message, Receipt};
use crate::topic::{check_filter, check_text, check_topic, TopicError, TopicLimits};

/// Initial read buffer per connection: a burst of small publishes in one read.
const READ_BUFFER: usize = 4096;
/// Initial write buffer per connection: acknowledgements are a few bytes each; it grows for
/// deliveries to subscribers.
const WRITE_BUFFER: usize = 1024;

/// How long a new connection waits for an old one with the same client id to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Router deliveries gathered into one socket write at most.
const MAX_NOTIFICATIONS_PER_WRITE: usize = 256;
/// Denials logged at info per session before the rest go to debug (they are all counted).
const LOGGED_DENIALS_PER_SESSION: u32 = 3;

/// The per-connection limits from `[listener]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_inflight: u16,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub max_keep_alive_secs: u16,
    pub topics: TopicLimits,
    pub max_filters_per_subscribe: usize,
    pub max_subscriptions: usize,
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
}

/// Why a session ended; decides the DISCONNECT sent and whether the will is published.
enum Close {
    /// DISCONNECT from the device: no will, unless it asked for one (MQTT 5 reason 0x04).
    ByClient {
        with_will: bool,
    },
    /// The socket closed or failed.
    Network(String),
    KeepAlive,
    Protocol(DisconnectReasonCode, String),
    Ended(EndReason),
    /// The router dropped the link.
    RouterGone,
    /// The spool could not make the device's messages durable; closing makes the device send
    /// them again once it reconnects (MQTT 3.1.1 has no negative PUBACK).
    Spool(String),
}

/// PUBACKs of one socket read, held until the read's messages are durable.
struct HeldAcks {
    /// `None` when nothing of the read needed spooling; then the acks wait only for the
    /// entries ahead of them, since PUBACKs go out in PUBLISH order.
    receipt: Option<Receipt>,
    acks: Vec<Packet>,
}

/// Runs a session on an authenticated TLS stream until it closes.
pub async fn run<S>(stream: S, identity: Identity, peer: SocketAddr, ctx: Arc<EdgeContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(READ_BUFFER),
        wbuf: BytesMut::with_capacity(WRITE_BUFFER),
        write_timeout: ctx.limits.write_timeout,
    };
    let first = tokio::time::timeout(
        ctx.limits.connect_timeout,
        read_connect(&mut conn, ctx.limits.max_packet_size),
    )
    .await;
    let (codec, packet) = match first {
        Err(_) => {
            debug!(%peer, thing = %Escaped(&identity.thing), "no CONNECT in time; closing");
            return;
        }
        Ok(Err(ConnectError::Version(level))) => {
            info!(%peer, thing = %Escaped(&identity.thing), level, "unsupported MQTT protocol level; refused");
            let codec = Codec::new(Version::V311, ctx.limits.max_packet_size);
            let _ = conn
                .send_connack(&codec, refusal(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return;
        }
        Ok(Err(ConnectError::Other(reason))) => {
            debug!(%peer, thing = %Escaped(&identity.thing), %reason, "connection closed before CONNECT");
            return;
        }
        Ok(Ok(v)) => v,
    };
    let Packet::Connect(connect, _props, will, will_props, _login) = packet else {
        return;
    };
    // Watched from before admission: an approval or revocation during CONNECT is then seen
    // as a change at the first packet instead of being missed.
    let epoch = ctx.authority.watch();
    let admitted = match admit(&ctx, &identity, peer, &codec, &connect, will, will_props) {
        Ok(a) => a,
        Err(code) => {
            ctx.stats.connects_refused.fetch_add(1, Relaxed);
            let _ = conn.send_connack(&codec, refusal(code)).await;
            return;
        }
    };
    let slot = ctx.sessions.claim(&connect.client_id, TAKEOVER_WAIT).await;
    // A device gets a router link of its own only when it needs one: to keep or resume a
    // persistent session (or to clear one left behind), or once it subscribes. Until then its
    // publishes go through the fabric's shared link.
    let needs_link = !connect.clean_session || ctx.sessions.is_parked(&connect.client_id);
    let link = match needs_link {
        false => None,
        true => match ctx
            .fabric
            .link(&connect.client_id, connect.clean_session)
            .await
        {
            Ok(link) => Some(link),
            Err(e) => {
                warn!(thing = %identity.thing, error = %e, "router link failed; refusing connection");
                let _ = conn
                    .send_connack(&codec, refusal(ConnectReturnCode::ServerUnavailable))
                    .await;
                return;
            }
        },
    };
    let keep_alive = granted_keep_alive(connect.keep_alive, ctx.limits.max_keep_alive_secs);
    // A parked session whose router has since been rebuilt lives on in the filters kept here;
    // they are given to the new router below.
    let parked = ctx
        .sessions
        .unpark(&connect.client_id, !connect.clean_session);
    let (session_present, filters, lost) = match (&link, parked) {
        (Some(l), Some(p)) if p.generation != l.generation => (true, p.filters, true),
        (Some(l), Some(p)) if l.session_present => (true, p.filters, false),
        (Some(l), None) => (
            l.session_present && !connect.clean_session,
            Vec::new(),
            false,
        ),
        _ => (false, Vec::new(), false),
    };
    let ack = connack_success(&ctx.limits, session_present, keep_alive, connect.keep_alive);
    if conn.send_connack(&codec, ack).await.is_err() {
        if let Some(link) = link {
            release_link(&ctx.fabric, link, None).await;
        }
        return;
    }
    info!(
        thing = %identity.thing,
        cert_id = %identity.cert_id,
        %peer,
        mqtt = %codec.version,
        state = %admitted.grant.state,
        groups = ?admitted.grant.groups,
        "device connected"
    );
    if admitted.grant.state == DeviceState::Pending {
        info!(thing = %identity.thing, "device is pending approval: it may publish only to its provisioning topic");
    }
    ctx.stats.connections_accepted.fetch_add(1, Relaxed);
    ctx.stats.connections_open.fetch_add(1, Relaxed);
    let mut session = Session {
        epoch,
        ctx: Arc::clone(&ctx),
        codec,
        thing: Arc::from(identity.thing.as_str()),
        cert_id: Arc::from(identity.cert_id.as_str()),
        identity,
        grant: admitted.grant,
        will: admitted.will,
        link,
        clean_session: connect.clean_session,
        // A resumed session's subscriptions come back from the router; track them so a later
        // change of grant can prune them too.
        filters,
        generations: ctx.fabric.generations(),
        to_router: Vec::new(),
        to_ingest: Vec::new(),
        read_acks: Vec::new(),
        held: std::collections::VecDeque::new(),
        denials_logged: 0,
        read_at: (std::time::Instant::now(), 0),
        wake_router: false,
    };
    if lost {
        info!(thing = %session.thing, "the local router was rebuilt while this session was away: its subscriptions are restored, messages queued in the old router are lost");
    }
    let resubscribed = match lost {
        true => session.resubscribe().await,
        false => Flow::Continue,
    };
    // A resumed session's grant may have shrunk while the device was away.
    let resumed_refused = match (resubscribed, session_present) {
        (Flow::Close(c), _) => Flow::Close(c),
        (Flow::Continue, true) => session.refresh_grant().await,
        (Flow::Continue, false) => Flow::Continue,
    };
    let close = match resumed_refused {
        Flow::Close(c) => c,
        Flow::Continue => {
            session
                .serve(&mut conn, slot, Duration::from_secs(u64::from(keep_alive)))
                .await
        }
    };
    session.finish(&mut conn, close).await;
    ctx.stats.connections_open.fetch_sub(1, Relaxed);
}

/// Resolves with the oldest held read's durability (the branch is enabled only when it has a receipt).
async fn front_receipt(
    held: &mut std::collections::VecDeque<HeldAcks>,
) -> Result<Result<(), crate::pipeline::CommitError>, tokio::sync::oneshot::error::RecvError> {
    match held.front_mut().and_then(|h| h.receipt.as_mut()) {
        Some(receipt) => receipt.await,
        None => std::future::pending().await,
    }
}

enum ConnectError {
    Version(u8),
    Other(String),
}

async fn read_connect<S: AsyncRead + Unpin>(
    conn: &mut Conn<S>,
    max_packet_size: usize,
) -> Result<(Codec, Packet), ConnectError> {
    loop {
        if let Some(len) = crate::edge::codec::announced_len(&conn.rbuf) {
            if len > max_packet_size {
                return Err(ConnectError::Other(format!(
                    "first packet announces {len} bytes, over listener.max_packet_size"
                )));
            }
        }
        match connect_version(&conn.rbuf) {
            Ok(Some(version)) => {
                let codec = Codec::new(version, max_packet_size);
                match codec.read(&mut conn.rbuf) {
                    Ok(Some(frame)) => return Ok((codec, frame.packet)),
                    Ok(None) => {}
                    Err(e) => return Err(ConnectError::Other(e.to_string())),
                }
            }
            Ok(None) => {}
            Err(CodecError::UnsupportedVersion(level)) => return Err(ConnectError::Version(level)),
            Err(e) => return Err(ConnectError::Other(e.to_string())),
        }
        match conn.stream.read_buf(&mut conn.rbuf).await {
            Ok(0) => return Err(ConnectError::Other("end of stream".into())),
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Other(e.to_string())),
        }
    }
}

struct Admitted {
    grant: Grant,
    will: Option<(LastWill, Option<LastWillProperties>)>,
}

/// The CONNECT checks: identity, registry state, connect permission, will permission.
fn admit(
    ctx: &EdgeContext,
    identity: &Identity,
    peer: SocketAddr,
    codec: &Codec,
    connect: &Connect,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
) -> Result<Admitted, ConnectReturnCode> {
    let thing = &identity.thing;
    if connect.client_id != *thing {
        warn!(
            %peer,
            client_id = %Escaped(&connect.client_id),
            thing = %Escaped(thing),
            cert_id = %identity.cert_id,
            "client id does not match the certificate's thing name; refused"
        );
        return Err(ConnectReturnCode::NotAuthorized);
    }
    if !valid_thing_name(thing) {
        warn!(%peer, thing = %Escaped(thing), "certificate CN is not a valid thing name; refused");
        return Err(ConnectReturnCode::NotAuthorized);
    }
    let grant = ctx.authority.admit(thing, &identity.cert_id).map_err(|e| {
        warn!(thing = %thing, error = %e, "device registry unavailable; refusing connection");
        ConnectReturnCode::ServerUnavailable
    })?;
    if grant.state == DeviceState::Revoked {
        warn!(%peer, thing = %thing, cert_id = %identity.cert_id, "revoked device refused");
        return Err(ConnectReturnCode::NotAuthorized);
    }
    if !grant
        .permissions
        .allows(Operation::Connect, &connect.client_id)
    {
        warn!(%peer, thing = %thing, groups = ?grant.groups, "no policy allows mqtt:connect; refused");
        return Err(ConnectReturnCode::NotAuthorized);
    }
    let mut will = will;
    if let Some(w) = will.as_mut() {
        let topic = std::str::from_utf8(&w.topic).unwrap_or("");
        if let Err(e) = check_topic(topic, ctx.limits.topics) {
            info!(thing = %thing, will_topic = %Escaped(topic), error = %e, "will topic refused");
            return Err(if e.is_malformed() {
                ConnectReturnCode::MalformedPacket
            } else {
                ConnectReturnCode::TopicNameInvalid
            });
        }
        if w.qos == QoS::ExactlyOnce {
            match codec.version {
                Version::V5 => return Err(ConnectReturnCode::QoSNotSupported),
                // 3.1.1 cannot say why; deliver the will at the highest QoS we offer.
                Version::V311 => w.qos = QoS::AtLeastOnce,
            }
        }
        if !grant.permissions.allows(Operation::Publish, topic) {
            warn!(thing = %thing, will_topic = %Escaped(topic), "will topic not allowed by policy; refused");
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    Ok(Admitted {
        grant,
        will: will.map(|w| (w, will_props)),
    })
}

fn granted_keep_alive(requested: u16, max: u16) -> u16 {
    if requested == 0 || requested > max {
        max
    } else {
        requested
    }
}

fn refusal(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

fn connack_success(
    limits: &Limits,
    session_present: bool,
    keep_alive: u16,
    requested_keep_alive: u16,
) -> Packet {
    let props = ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(limits.max_inflight),
        max_qos: Some(1),
        retain_available: Some(1),
        max_packet_size: Some(u32::try_from(limits.max_packet_size).unwrap_or(u32::MAX)),
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: (keep_alive != requested_keep_alive).then_some(keep_alive),
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        Some(props),
    )
}

/// The socket and its buffers.
struct Conn<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    write_timeout: Duration,
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
        self.wbuf.clear();
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
    grant: Grant,
    epoch: watch::Receiver<u64>,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    /// This device's own router link, once it needs one (see `run`).
    link: Option<RouterLink>,
    clean_session: bool,
    /// Filters granted and passed to the router with their granted QoS, re-checked when the
    /// grant changes and given to a rebuilt router.
    filters: Vec<(String, u8)>,
    /// The router's generation; a change means this session's link is gone and it links again.
    generations: watch::Receiver<u64>,
    /// Packets for the router from the current read, handed over in one go.
    to_router: Vec<Packet>,
    /// Allowed publishes of the current read that a route takes.
    to_ingest: Vec<Message>,
    /// QoS 1 PUBACKs of the current read, in PUBLISH order.
    read_acks: Vec<Packet>,
    /// Earlier reads' PUBACKs waiting for the spool, oldest first.
    held: std::collections::VecDeque<HeldAcks>,
    denials_logged: u32,
    /// When the current socket read was taken (monotonic, and Unix ms for the records): every
    /// message of one read shares it.
    read_at: (std::time::Instant, u64),
    /// The router paused deliveries to this link until it is told we caught up.
    wake_router: bool,
}

impl Close {
    fn describe(&self) -> String {
        match self {
            Close::ByClient { with_will: false } => "DISCONNECT from device".into(),
            Close::ByClient { with_will: true } => "DISCONNECT from device, with will".into(),
            Close::Network(detail) => format!("network: {detail}"),
            Close::KeepAlive => "silent past its keepalive".into(),
            Close::Protocol(code, detail) => format!("protocol error ({code:?}): {detail}"),
            Close::Ended(reason) => format!("ended by gateway: {reason:?}"),
            Close::RouterGone => "local router dropped the link".into(),
            Close::Spool(reason) => format!("spool could not store its messages: {reason}"),
        }
    }
}

enum Flow {
    Continue,
    Close(Close),
}

impl Session {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        mut slot: SessionSlot,
        keep_alive: Duration,
    ) -> Close {
        // MQTT: a client silent for 1.5 × its keepalive is gone.
        let idle = keep_alive + keep_alive / 2;
        let mut deadline = Instant::now() + idle;
        let mut epoch_open = true;
        // Bytes left over after CONNECT belong to the first packets.
        let mut pending_input = !conn.rbuf.is_empty();
        loop {
            if pending_input {
                pending_input = false;
                if let Flow::Close(c) = self.handle_input(&mut conn.rbuf, &mut conn.wbuf).await {
                    return c;
                }
            } else {
                tokio::select! {
                    biased;
                    changed = slot.end.changed() => {
                        let reason = *slot.end.borrow();
                        match (changed, reason) {
                            (_, Some(reason)) => return Close::Ended(reason),
                            (Err(_), None) => return Close::Ended(EndReason::Shutdown),
                            (Ok(()), None) => {}
                        }
                    }
                    changed = self.epoch.changed(), if epoch_open => {
                        if changed.is_err() {
                            epoch_open = false;
                        } else if let Flow::Close(c) = self.refresh_grant().await {
                            return c;
                        }
                    }
                    read = tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.rbuf)) => {
                        match read {
                            Err(_) => return Close::KeepAlive,
                            Ok(Err(e)) => return Close::Network(e.to_string()),
                            Ok(Ok(0)) => return Close::Network("connection closed by device".into()),
                            Ok(Ok(_)) => {
                                deadline = Instant::now() + idle;
                                if let Flow::Close(c) = self.handle_input(&mut conn.rbuf, &mut conn.wbuf).await {
                                    return c;
                                }
                            }
                        }
                    }
                    _ = self.generations.changed(), if self.link.is_some() => {
                        if let Flow::Close(c) = self.relink().await {
                            return c;
                        }
                    }
                    durable = front_receipt(&mut self.held), if self.held.front().is_some_and(|h| h.receipt.is_some()) => {
                        match durable {
                            Ok(Ok(())) => self.release_held(&mut conn.wbuf),
                            Ok(Err(reason)) => return Close::Spool(reason.to_string()),
                            Err(_) => return Close::Spool("pipeline stopped".into()),
                        }
                    }
                    notification = next_notification(&mut self.link), if self.link.is_some() => {
                        match notification {
                            Ok(Some(n)) => {
                                if let Flow::Close(c) = self.handle_notification(n, &mut conn.wbuf) {
                                    return c;
                                }
                                // Take what else the router already queued, so a burst goes out
                                // in one write instead of one per message.
                                if let Flow::Close(c) = self.drain_ready_notifications(&mut conn.wbuf).await {
                                    return c;
                                }
                            }
                            Ok(None) => {}
                            Err(_) if self.router_moved() => {
                                if let Flow::Close(c) = self.relink().await {
                                    return c;
                                }
                            }
                            Err(_) => return Close::RouterGone,
                        }
                    }
                }
            }
            if let Err(e) = conn.flush().await {
                return Close::Network(e);
            }
            if std::mem::take(&mut self.wake_router) {
                if let Some(link) = self.link.as_mut() {
                    if link.rx.wake().await.is_err() && !self.router_moved() {
                        return Close::RouterGone;
                    }
                }
            }
        }
    }

    /// Parses and handles every whole packet in `rbuf`, then hands the router its share.
    async fn handle_input(&mut self, rbuf: &mut BytesMut, wbuf: &mut BytesMut) -> Flow {
        self.read_at = (std::time::Instant::now(), crate::clock::now_ms());
        if self.epoch.has_changed().unwrap_or(false) {
            if let Flow::Close(c) = self.refresh_grant().await {
                return Flow::Close(c);
            }
        }
        let mut flow = Flow::Continue;
        loop {
            match self.codec.read(rbuf) {
                Ok(Some(frame)) => {
                    if let Flow::Close(c) = self.handle_packet(frame, wbuf) {
                        flow = Flow::Close(c);
                        break;
                    }
                }
                Ok(None) => break,
                Err(CodecError::TooLarge(n)) => {
                    flow = Flow::Close(Close::Protocol(
                        DisconnectReasonCode::PacketTooLarge,
                        format!("packet of {n} bytes exceeds listener.max_packet_size"),
                    ));
                    break;
                }
                Err(e) => {
                    flow = Flow::Close(Close::Protocol(
                        DisconnectReasonCode::MalformedPacket,
                        e.to_string(),
                    ));
                    break;
                }
            }
        }
        // Whatever was accepted before a protocol error still reaches the router.
        if let Flow::Close(c) = self.hand_to_router().await {
            return Flow::Close(c);
        }
        let receipt = match (&self.ctx.ingest, self.to_ingest.is_empty()) {
            (Some(ingest), false) => {
                let mut messages = std::mem::take(&mut self.to_ingest);
                detach_payloads(&mut messages);
                Some(ingest.submit(messages).await)
            }
            _ => None,
        };
        let acks = std::mem::take(&mut self.read_acks);
        if receipt.is_none() && self.held.is_empty() {
            for ack in acks {
                self.write(ack, wbuf);
            }
        } else if receipt.is_some() || !acks.is_empty() {
            self.held.push_back(HeldAcks { receipt, acks });
        }
        flow
    }

    /// Sends `to_router` through this device's link, making it at the first SUBSCRIBE, or
    /// through the shared link while the device has none.
    async fn hand_to_router(&mut self) -> Flow {
        if self.to_router.is_empty() {
            return Flow::Continue;
        }
        let subscribes = self
            .to_router
            .iter()
            .any(|p| matches!(p, Packet::Subscribe(..)));
        if self.link.is_none() && subscribes {
            match self.ctx.fabric.link(&self.thing, true).await {
                Ok(link) => self.link = Some(link),
                Err(e) => {
                    warn!(thing = %self.thing, error = %e, "router link failed");
                    return Flow::Close(Close::RouterGone);
                }
            }
        }
        let packets = std::mem::take(&mut self.to_router);
        if self.router_moved() {
            if let Flow::Close(c) = self.relink().await {
                return Flow::Close(c);
            }
        }
        let fabric = Arc::clone(&self.ctx.fabric);
        let sent = match self.link.as_mut() {
            Some(link) => fabric.send(link, packets).await.is_ok(),
            None => fabric.forward(packets).await.is_ok(),
        };
        match sent {
            true => Flow::Continue,
            // A router that died under the send is rebuilt by the watchdog; the session then
            // links again, and what this read carried is lost to local subscribers only.
            false if self.link.is_some() && !self.router_moved() => Flow::Close(Close::RouterGone),
            false => Flow::Continue,
        }
    }

    /// This session's link belongs to a router generation that is no longer running.
    fn router_moved(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.generation != self.ctx.fabric.generation())
    }

    /// Links to the rebuilt router and gives it this session's subscriptions.
    async fn relink(&mut self) -> Flow {
        self.generations.borrow_and_update();
        if !self.router_moved() {
            return Flow::Continue;
        }
        self.link = None;
        match self.ctx.fabric.link(&self.thing, self.clean_session).await {
            Ok(link) => self.link = Some(link),
            Err(e) => {
                warn!(thing = %self.thing, error = %e, "cannot link to the rebuilt router");
                return Flow::Close(Close::RouterGone);
            }
        }
        debug!(thing = %self.thing, filters = self.filters.len(), "linked to the rebuilt router");
        self.resubscribe().await
    }

    /// Subscribes this session's filters on its link again.
    async fn resubscribe(&mut self) -> Flow {
        if self.filters.is_empty() {
            return Flow::Continue;
        }
        let filters = self
            .filters
            .iter()
            .map(|(path, qos)| Filter {
                path: path.clone(),
                qos: rumqttd::protocol::qos(*qos).unwrap_or(QoS::AtMostOnce),
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        let packet = Packet::Subscribe(Subscribe { pkid: 1, filters }, None);
        let fabric = Arc::clone(&self.ctx.fabric);
        let failed = match self.link.as_mut() {
            Some(link) => fabric.send(link, vec![packet]).await.is_err(),
            None => false,
        };
        match failed {
            true => Flow::Close(Close::RouterGone),
            false => Flow::Continue,
        }
    }

    /// The oldest held read is durable: send its PUBACKs and those queued behind it that
    /// waited only for their turn.
    fn release_held(&mut self, wbuf: &mut BytesMut) {
        if let Some(front) = self.held.pop_front() {
            for ack in front.acks {
                self.write(ack, wbuf);
            }
        }
        while self.held.front().is_some_and(|h| h.receipt.is_none()) {
            if let Some(next) = self.held.pop_front() {
                for ack in next.acks {
                    self.write(ack, wbuf);
                }
            }
        }
    }

    fn handle_packet(&mut self, frame: Frame, wbuf: &mut BytesMut) -> Flow {
        match frame.packet {
            Packet::Publish(mut publish, props) => {
                // A handle on the topic bytes (a reference count, no copy): `retain` may give
                // the publish its own copy below while `topic` is still in use.
                let topic_bytes = publish.topic.clone();
                let Ok(topic) = std::str::from_utf8(&topic_bytes) else {
                    return protocol_error(
                        DisconnectReasonCode::TopicNameInvalid,
                        "topic is not UTF-8",
                    );
                };
                // CONNACK offers no topic aliases (Topic Alias Maximum absent = 0), so any alias
                // is invalid (MQTT-3.3.2-8); an empty topic would need one.
                if topic.is_empty() || props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
                    return protocol_error(
                        DisconnectReasonCode::TopicAliasInvalid,
                        "topic alias (none are offered)",
                    );
                }
                // MQTT-3.3.4-6: a client's PUBLISH never carries a Subscription Identifier.
                if props
                    .as_ref()
                    .is_some_and(|p| !p.subscription_identifiers.is_empty())
                {
                    return protocol_error(
                        DisconnectReasonCode::ProtocolError,
                        "subscription identifier in a PUBLISH from a client",
                    );
                }
                if let Some(response) = props.as_ref().and_then(|p| p.response_topic.as_deref()) {
                    if let Err(e) = check_topic(response, self.ctx.limits.topics) {
                        return topic_error(
                            &e,
                            DisconnectReasonCode::ProtocolError,
                            "response topic",
                        );
                    }
                }
                let checked = check_topic(topic, self.ctx.limits.topics);
                if let Err(e) = &checked {
                    if e.is_malformed() || *e == TopicError::Wildcard {
                        return topic_error(e, DisconnectReasonCode::TopicNameInvalid, "topic");
                    }
                }
                if frame.qos > 1 {
                    return protocol_error(
                        DisconnectReasonCode::QoSNotSupported,
                        "QoS 2 is not supported (maximum QoS is 1)",
                    );
                }
                let refusal = match checked {
                    Err(e) => Some((e.reason(), PubAckReason::TopicNameInvalid, e.to_string())),
                    Ok(()) if !self.grant.permissions.allows(Operation::Publish, topic) => Some((
                        "publish_not_allowed",
                        PubAckReason::NotAuthorized,
                        "denied by policy".into(),
                    )),
                    Ok(()) => self
                        .ctx
                        .fabric
                        .retain(&mut publish, &props)
                        .err()
                        .map(|e| ("retained_quota", PubAckReason::QuotaExceeded, e.to_string())),
                };
                let reason = if let Some((label, code, why)) = refusal {
                    self.ctx.stats.deny(label);
                    self.log_denial("publish", topic, &why);
                    code
                } else {
                    let counter = if frame.qos == 0 {
                        &self.ctx.stats.messages_in_qos0
                    } else {
                        &self.ctx.stats.messages_in_qos1
                    };
                    counter.fetch_add(1, Relaxed);
                    if let Some(wanted) = self.ctx.ingest.as_ref().and_then(|i| i.wants(topic)) {
                        self.to_ingest.push(Message {
                            wanted,
                            topic: topic.to_owned(),
                            payload: publish.payload.clone(),
                            thing: Arc::clone(&self.thing),
                            cert_id: Arc::clone(&self.cert_id),
                            qos: frame.qos,
                            received_at_ms: self.read_at.1,
                            received: self.read_at.0,
                        });
                    }
                    self.to_router.push(Packet::Publish(publish, props));
                    PubAckReason::Success
                };
                // MQTT 3.1.1 has no way to say "not authorized" in a PUBACK (§3.3.5): the
                // message is acknowledged and dropped. MQTT 5 carries the reason code.
                if frame.qos == 1 {
                    self.read_acks.push(Packet::PubAck(
                        PubAck {
                            pkid: frame.pkid,
                            reason,
                        },
                        None,
                    ));
                }
                Flow::Continue
            }
            Packet::PubAck(ack, _) => {
                self.to_router.push(Packet::PubAck(ack, None));
                Flow::Continue
            }
            Packet::Subscribe(subscribe, props) => {
                // CONNACK says Subscription Identifier Available = 0 (MQTT-3.8.2-1 … 3.2.2.3.12).
                if props.as_ref().is_some_and(|p| p.id.is_some()) {
                    return protocol_error(
                        DisconnectReasonCode::SubscriptionIdentifiersNotSupported,
                        "subscription identifiers are not supported",
                    );
                }
                self.subscribe(subscribe, wbuf)
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                for f in &unsubscribe.filters {
                    if let Err(e) = check_text(f) {
                        return topic_error(&e, DisconnectReasonCode::ProtocolError, "filter");
                    }
                }
                self.filters
                    .retain(|(f, _)| !unsubscribe.filters.contains(f));
                let reasons = vec![UnsubAckReason::Success; unsubscribe.filters.len()];
                let pkid = unsubscribe.pkid;
                self.to_router.push(Packet::Unsubscribe(unsubscribe, None));
                self.write(Packet::UnsubAck(UnsubAck { pkid, reasons }, None), wbuf);
                Flow::Continue
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp), wbuf);
                Flow::Continue
            }
            Packet::Disconnect(d, _) => Flow::Close(Close::ByClient {
                with_will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
            }),
            Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..) => protocol_error(
                DisconnectReasonCode::QoSNotSupported,
                "QoS 2 flow is not supported",
            ),
            other => protocol_error(
                DisconnectReasonCode::ProtocolError,
                &format!("unexpected packet from a client: {}", packet_name(&other)),
            ),
        }
    }

    fn subscribe(&mut self, mut subscribe: Subscribe, wbuf: &mut BytesMut) -> Flow {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::with_capacity(subscribe.filters.len());
        let limits = self.ctx.limits;
        for (i, mut filter) in subscribe.filters.drain(..).enumerate() {
            let checked = check_filter(&filter.path, limits.topics);
            if let Err(e) = &checked {
                if e.is_malformed() {
                    return topic_error(e, DisconnectReasonCode::ProtocolError, "filter");
                }
            }
            let known = self.filters.iter().any(|(f, _)| *f == filter.path);
            let refusal = match checked {
                Err(TopicError::Shared) => Some((
                    "shared_subscription",
                    SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    TopicError::Shared.to_string(),
                )),
                Err(e) => Some((e.reason(), SubscribeReasonCode::TopicFilterInvalid, e.to_string())),
                Ok(()) if i >= limits.max_filters_per_subscribe => Some((
                    "subscribe_quota",
                    SubscribeReasonCode::QuotaExceeded,
                    format!("more than listener.max_filters_per_subscribe ({}) filters in one SUBSCRIBE", limits.max_filters_per_subscribe),
                )),
                Ok(()) if !known && self.filters.len() >= limits.max_subscriptions => Some((
                    "subscribe_quota",
                    SubscribeReasonCode::QuotaExceeded,
                    format!("the connection holds listener.max_subscriptions ({})", limits.max_subscriptions),
                )),
                Ok(()) if !self.grant.permissions.allows(Operation::Subscribe, &filter.path) => Some((
                    "subscribe_not_allowed",
                    SubscribeReasonCode::NotAuthorized,
                    "denied by policy".into(),
                )),
                Ok(()) => None,
            };
            if let Some((label, code, why)) = refusal {
                self.ctx.stats.deny(label);
                self.log_denial("subscribe", &filter.path, &why);
                codes.push(code);
                continue;
            }
            if filter.qos == QoS::ExactlyOnce {
                filter.qos = QoS::AtLeastOnce;
            }
            codes.push(SubscribeReasonCode::Success(filter.qos));
            match self.filters.iter_mut().find(|(f, _)| *f == filter.path) {
                Some(known) => known.1 = filter.qos as u8,
                None => self.filters.push((filter.path.clone(), filter.qos as u8)),
            }
            granted.push(filter);
        }
        let pkid = subscribe.pkid;
        if !granted.is_empty() {
            self.to_router.push(Packet::Subscribe(
                Subscribe {
                    pkid,
                    filters: granted,
                },
                None,
            ));
        }
        self.write(
            Packet::SubAck(
                SubAck {
                    pkid,
                    return_codes: codes,
                },
                None,
            ),
            wbuf,
        );
        Flow::Continue
    }

    async fn drain_ready_notifications(&mut self, wbuf: &mut BytesMut) -> Flow {
        for _ in 0..MAX_NOTIFICATIONS_PER_WRITE {
            // A zero timeout polls once: ready notifications are taken, none are waited for.
            let Some(link) = self.link.as_mut() else {
                break;
            };
            match tokio::time::timeout(Duration::ZERO, link.rx.next()).await {
                Ok(Ok(Some(n))) => {
                    if let Flow::Close(c) = self.handle_notification(n, wbuf) {
                        return Flow::Close(c);
                    }
                }
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(_)) if self.router_moved() => break,
                Ok(Err(_)) => return Flow::Close(Close::RouterGone),
            }
        }
        Flow::Continue
    }

    fn handle_notification(&mut self, notification: Notification, wbuf: &mut BytesMut) -> Flow {
        match notification {
            Notification::Forward(mut forward) => {
                self.ctx.stats.messages_out.fetch_add(1, Relaxed);
                device_topic(&mut forward.publish);
                self.write(Packet::Publish(forward.publish, forward.properties), wbuf);
                Flow::Continue
            }
            Notification::Unschedule => {
                self.wake_router = true;
                Flow::Continue
            }
            Notification::Disconnect(..) if self.router_moved() => Flow::Continue,
            Notification::Disconnect(..) => Flow::Close(Close::RouterGone),
            // Acks for what we relayed: the device already got its answer from us.
            _ => Flow::Continue,
        }
    }

    /// Re-reads the grant after an approval or revocation; prunes subscriptions it no longer
    /// allows.
    async fn refresh_grant(&mut self) -> Flow {
        self.epoch.borrow_and_update();
        let grant = match self.ctx.authority.current_grant(&self.identity.thing) {
            Ok(g) => g,
            Err(e) => {
                warn!(thing = %self.identity.thing, error = %e, "cannot re-read grant; keeping the current one");
                return Flow::Continue;
            }
        };
        if grant.state == DeviceState::Revoked {
            return Flow::Close(Close::Ended(EndReason::Revoked));
        }
        if grant.state != self.grant.state || grant.groups != self.grant.groups {
            info!(thing = %self.identity.thing, state = %grant.state, groups = ?grant.groups, "grant changed on the live connection");
        }
        self.grant = grant;
        let (kept, dropped): (Vec<_>, Vec<_>) = std::mem::take(&mut self.filters)
            .into_iter()
            .partition(|(f, _)| self.grant.permissions.allows(Operation::Subscribe, f));
        self.filters = kept;
        if dropped.is_empty() {
            return Flow::Continue;
        }
        let mut filters = Vec::with_capacity(dropped.len());
        for (filter, _) in dropped {
            info!(thing = %self.identity.thing, filter = %Escaped(&filter), "subscription no longer allowed; removed");
            filters.push(filter);
        }
        let packet = Packet::Unsubscribe(rumqttd::protocol::Unsubscribe { pkid: 1, filters }, None);
        let fabric = Arc::clone(&self.ctx.fabric);
        let failed = match self.link.as_mut() {
            Some(link) => fabric.send(link, vec![packet]).await.is_err(),
            None => false,
        };
        match failed && !self.router_moved() {
            true => Flow::Close(Close::RouterGone),
            false => Flow::Continue,
        }
    }

    fn write(&mut self, packet: Packet, wbuf: &mut BytesMut) {
        if let Err(e) = self.codec.write(packet, wbuf) {
            warn!(thing = %self.identity.thing, error = %e, "cannot encode a packet for the device");
        }
    }

    fn log_denial(&mut self, what: &str, resource: &str, why: &str) {
        let resource = Escaped(resource);
        if self.denials_logged < LOGGED_DENIALS_PER_SESSION {
            self.denials_logged += 1;
            info!(thing = %self.identity.thing, groups = ?self.grant.groups, %resource, "{what} refused: {why}");
        } else {
            debug!(thing = %self.identity.thing, %resource, "{what} refused: {why}");
        }
    }

    /// Tells the device why (MQTT 5), publishes the will when due, and releases the link.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(mut self, conn: &mut Conn<S>, close: Close) {
        let thing = self.identity.thing.clone();
        let (reason, publish_will) = match &close {
            Close::ByClient { with_will } => (None, *with_will),
            Close::Network(_) | Close::RouterGone => (None, true),
            Close::Spool(_) => (Some(DisconnectReasonCode::UnspecifiedError), true),
            Close::KeepAlive => {
                self.ctx.stats.keepalive_timeouts.fetch_add(1, Relaxed);
                (Some(DisconnectReasonCode::KeepAliveTimeout), true)
            }
            Close::Protocol(code, _) => {
                self.ctx.stats.protocol_errors.fetch_add(1, Relaxed);
                (Some(*code), true)
            }
            Close::Ended(EndReason::TakenOver) => {
                (Some(DisconnectReasonCode::SessionTakenOver), true)
            }
            Close::Ended(EndReason::Shutdown) => {
                (Some(DisconnectReasonCode::ServerShuttingDown), true)
            }
            Close::Ended(EndReason::Revoked) => {
                self.ctx.stats.revoked_disconnects.fetch_add(1, Relaxed);
                (Some(DisconnectReasonCode::NotAuthorized), false)
            }
        };
        info!(thing = %thing, reason = %close.describe(), "device disconnected");
        if let Some(code) = reason {
            let d = Packet::Disconnect(Disconnect { reason_code: code }, None);
            if matches!(self.codec.write(d, &mut conn.wbuf), Ok(true)) {
                let _ = conn.flush().await;
            }
        }
        let _ = conn.stream.shutdown().await;
        let will = if publish_will { self.will.take() } else { None };
        let will = will.filter(|(w, _)| {
            let topic = std::str::from_utf8(&w.topic).unwrap_or("");
            // The grant may have changed since CONNECT; the will is a publish like any other.
            self.grant.permissions.allows(Operation::Publish, topic)
        });
        if matches!(close, Close::RouterGone) {
            return;
        }
        if !self.clean_session {
            let generation = self
                .link
                .as_ref()
                .map_or(self.ctx.fabric.generation(), |l| l.generation);
            self.ctx.sessions.park(
                &thing,
                Parked {
                    filters: std::mem::take(&mut self.filters),
                    generation,
                },
            );
        }
        let will = will.and_then(|(w, _)| {
            let mut packet = will_publish(w);
            match self.ctx.fabric.retain(&mut packet, &None) {
                Ok(()) => Some(Packet::Publish(packet, None)),
                Err(e) => {
                    self.ctx.stats.deny("retained_quota");
                    info!(thing = %thing, error = %e, "will not published");
                    None
                }
            }
        });
        let fabric = Arc::clone(&self.ctx.fabric);
        match self.link.take() {
            Some(link) => release_link(&fabric, link, will).await,
            None => {
                if let Some(w) = will {
                    let _ = fabric.forward(vec![w]).await;
                }
            }
        }
    }
}

/// The next notification on `link`; never resolves without one (the caller guards on it).
async fn next_notification(
    link: &mut Option<RouterLink>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link {
        Some(link) => link.rx.next().await,
        None => std::future::pending().await,
    }
}

fn will_publish(w: LastWill) -> rumqttd::protocol::Publish {
    let topic = String::from_utf8_lossy(&w.topic).into_owned();
    publish_packet(&topic, &w.message, w.qos, w.retain)
}

/// Publishes the will (if any) and tells the router this link is gone, so a persistent session
/// is parked and a clean one forgotten.
async fn release_link(fabric: &Fabric, mut link: RouterLink, will: Option<Packet>) {
    let bye = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let mut packets: Vec<Packet> = will.into_iter().collect();
    packets.push(bye);
    let _ = fabric.send(&mut link, packets).await;
}

fn protocol_error(code: DisconnectReasonCode, detail: &str) -> Flow {
    Flow::Close(Close::Protocol(code, detail.to_owned()))
}

/// A topic or filter refused: malformed text closes with 0x81 (MQTT §1.5.4), anything else
/// with `otherwise`.
fn topic_error(e: &TopicError, otherwise: DisconnectReasonCode, what: &str) -> Flow {
    let code = if e.is_malformed() {
        DisconnectReasonCode::MalformedPacket
    } else {
        otherwise
    };
    protocol_error(code, &format!("{what}: {e}"))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

/// Copies the payloads of one socket read into one buffer of exactly their size. A payload as
/// parsed is a slice of the session's read buffer and would keep that whole buffer (4 KiB or
/// more) alive until its group commit, while the session allocates a fresh one for every read
/// meanwhile: under load that was most of the gateway's memory.
fn detach_payloads(messages: &mut [Message]) {
    let total = messages.iter().map(|m| m.payload.len()).sum();
    let mut arena = BytesMut::with_capacity(total);
    for m in messages.iter_mut() {
        arena.extend_from_slice(&m.payload);
        m.payload = arena.split().freeze();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_payloads_keep_their_bytes_but_not_the_read_buffer() {
        let mut read = BytesMut::with_capacity(4096);
        read.extend_from_slice(b"{\"a\":1}{\"b\":22}");
        let read = read.freeze();
        let message = |payload: bytes::Bytes| Message {
            topic: "dt/x".into(),
            payload,
            thing: Arc::from("x"),
            cert_id: Arc::from("c"),
            qos: 1,
            received_at_ms: 0,
            received: std::time::Instant::now(),
            wanted: Default::default(),
        };
        let mut messages = vec![message(read.slice(0..7)), message(read.slice(7..15))];
        detach_payloads(&mut messages);
        assert_eq!(&messages[0].payload[..], b"{\"a\":1}");
        assert_eq!(&messages[1].payload[..], b"{\"b\":22}");
        // Only the read buffer's own handle is left: it can be reused for the next read.
        assert!(read.is_unique());
        let inside = |p: &bytes::Bytes| read.as_ptr_range().contains(&p.as_ptr());
        assert!(!messages.iter().any(|m| inside(&m.payload)));
    }
}
