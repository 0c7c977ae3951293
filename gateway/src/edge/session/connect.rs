//! The CONNECT phase: the first packet within `listener.connect_timeout`, the identity and
//! registry checks, the router link a persistent session needs, and CONNACK.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill,
    LastWillProperties, Packet, QoS,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::{DeviceState, Grant, Operation};
use crate::edge::broker::RouterLink;
use crate::edge::codec::{connect_version, Codec, CodecError, Version};
use crate::edge::table::SessionSlot;
use crate::escape::Escaped;
use crate::identity::pki::Identity;
use crate::identity::valid_thing_name;
use crate::topic::check_topic;

use super::close::{release_link, Flow};
use super::saved::{self, SavedSession};
use super::{Conn, EdgeContext, Limits, Session};

/// How long a new connection waits for an old one with the same client id to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Runs a session on an authenticated TLS stream until it closes.
pub(crate) async fn run<S>(stream: S, identity: Identity, peer: SocketAddr, ctx: Arc<EdgeContext>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        write_timeout: ctx.limits.write_timeout,
    };
    // The phases that run once are boxed: a future is as large as its largest await, so
    // inline they would stay part of the task for the whole session (13 KB of it, against the
    // serving loop's few).
    let Some((codec, packet)) = Box::pin(first_packet(&mut conn, &identity, peer, &ctx)).await
    else {
        return;
    };
    let Packet::Connect(connect, props, will, will_props, _login) = packet else {
        return;
    };
    let request = Request {
        connect,
        props,
        will,
        will_props,
    };
    // Watched from before admission: an approval or revocation during CONNECT is then seen
    // as a change at the first packet instead of being missed.
    let epoch = ctx.authority.watch();
    let Some(Opened {
        mut session,
        slot,
        keep_alive,
        session_present,
    }) = Box::pin(open(&mut conn, &ctx, identity, peer, codec, request, epoch)).await
    else {
        return;
    };
    // A resumed session's grant may have shrunk while the device was away.
    let resumed_refused = match session_present {
        true => Box::pin(session.refresh_grant()).await,
        false => Flow::Continue,
    };
    Box::pin(session.keep_subscriptions()).await;
    let mut slot = slot;
    let close = match resumed_refused {
        Flow::Close(c) => c,
        Flow::Continue => {
            session
                .serve(
                    &mut conn,
                    &mut slot,
                    Duration::from_secs(u64::from(keep_alive)),
                )
                .await
        }
    };
    Box::pin(session.finish(&mut conn, close)).await;
    // The client id stays taken until the session is parked: a takeover that came first would
    // otherwise find nothing to resume.
    drop(slot);
    ctx.stats.connections_open.fetch_sub(1, Relaxed);
}

/// The first packet, within `listener.connect_timeout`; `None` when the connection ends
/// without one (after a refusal, for an unsupported protocol level).
async fn first_packet<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    identity: &Identity,
    peer: SocketAddr,
    ctx: &EdgeContext,
) -> Option<(Codec, Packet)> {
    let first = tokio::time::timeout(
        ctx.limits.connect_timeout,
        read_connect(conn, ctx.limits.max_packet_size),
    )
    .await;
    let (codec, packet) = match first {
        Err(_) => {
            debug!(%peer, thing = %Escaped(&identity.thing), "no CONNECT in time; closing");
            return None;
        }
        Ok(Err(ConnectError::Version(level))) => {
            info!(%peer, thing = %Escaped(&identity.thing), level, "unsupported MQTT protocol level; refused");
            let codec = Codec::new(Version::V311, ctx.limits.max_packet_size);
            let _ = conn
                .send_connack(&codec, refusal(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return None;
        }
        Ok(Err(ConnectError::Other(reason))) => {
            debug!(%peer, thing = %Escaped(&identity.thing), %reason, "connection closed before CONNECT");
            return None;
        }
        Ok(Ok(v)) => v,
    };
    Some((codec, packet))
}

/// A session admitted and acknowledged, ready to serve.
struct Opened {
    session: Session,
    slot: SessionSlot,
    keep_alive: u16,
    session_present: bool,
}

/// A link made not clean for a persistent session, with nothing of an earlier one in the
/// router: a handover that could not finish may have left some, which the offline queue
/// replaces.
async fn fresh_link(
    ctx: &EdgeContext,
    client_id: &str,
) -> Result<RouterLink, crate::edge::broker::FabricError> {
    let link = ctx.fabric.link(client_id, false).await?;
    if !link.session_present {
        return Ok(link);
    }
    release_link(&ctx.fabric, link, None).await;
    ctx.fabric
        .forget(client_id, ctx.fabric.generation())
        .await?;
    ctx.fabric.link(client_id, false).await
}

/// What the CONNECT packet asked for.
struct Request {
    connect: Connect,
    props: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
}

/// The session terms a CONNECT asks for, within the listener's limits.
struct Terms {
    /// Session Expiry Interval in seconds (MQTT 5 §3.1.2.11.2); on 3.1.1, 0 for a clean
    /// session and the limit otherwise.
    expiry: u32,
    /// The expiry the device asked for was above the limit, so CONNACK names the one granted.
    expiry_capped: bool,
    /// QoS 1 deliveries the device takes unacknowledged (§3.1.2.11.3; 65,535 when absent).
    receive_max: u16,
    /// The largest packet the device takes (§3.1.2.11.4; unlimited when absent).
    max_packet: usize,
}

impl Terms {
    fn of(
        limits: &Limits,
        codec: &Codec,
        connect: &Connect,
        props: Option<&ConnectProperties>,
    ) -> Terms {
        let asked = match codec.version {
            Version::V5 => props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
            Version::V311 if connect.clean_session => 0,
            Version::V311 => u32::MAX,
        };
        Terms {
            expiry: asked.min(limits.max_session_expiry_secs),
            expiry_capped: codec.version == Version::V5 && asked > limits.max_session_expiry_secs,
            receive_max: props
                .and_then(|p| p.receive_maximum)
                .filter(|&m| m > 0)
                .unwrap_or(u16::MAX),
            max_packet: props
                .and_then(|p| p.max_packet_size)
                .and_then(|m| usize::try_from(m).ok())
                .unwrap_or(usize::MAX),
        }
    }
}

/// Admits the device, takes its client id's slot, links it to the router when it needs a link
/// of its own, and sends CONNACK; `None` when it was refused or the connection failed.
async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Arc<EdgeContext>,
    identity: Identity,
    peer: SocketAddr,
    codec: Codec,
    request: Request,
    epoch: watch::Receiver<u64>,
) -> Option<Opened> {
    let Request {
        connect,
        props,
        will,
        will_props,
    } = request;
    let admitted = match admit(ctx, &identity, peer, &codec, &connect, will, will_props) {
        Ok(a) => a,
        Err(code) => {
            ctx.stats.connects_refused.fetch_add(1, Relaxed);
            let _ = conn.send_connack(&codec, refusal(code)).await;
            return None;
        }
    };
    let slot = ctx.sessions.claim(&connect.client_id, TAKEOVER_WAIT).await;
    let terms = Terms::of(&ctx.limits, &codec, &connect, props.as_ref());
    // A session left behind is resumed unless the device starts clean or it has expired;
    // either way its queue is in the offline queues, and the router holds nothing of it.
    let parked = ctx.sessions.unpark(&connect.client_id);
    let left_behind = parked.is_some();
    let resumed =
        parked.filter(|p| !connect.clean_session && p.expires_at > std::time::Instant::now());
    // A device gets a router link of its own only when it needs one: to keep or resume a
    // persistent session, or once it subscribes. Until then its publishes go through the
    // fabric's shared link. rumqttd keeps a session only for a link made not clean.
    let keep = terms.expiry > 0 || resumed.is_some();
    let link = match keep {
        false => Ok(None),
        true => fresh_link(ctx, &connect.client_id).await.map(Some),
    };
    let mut link = match link {
        Ok(link) => link,
        Err(e) => {
            warn!(thing = %identity.thing, error = %e, "router link failed; refusing connection");
            if let Some(p) = resumed {
                ctx.sessions.park(&connect.client_id, p);
            }
            let _ = conn
                .send_connack(&codec, refusal(ConnectReturnCode::ServerUnavailable))
                .await;
            return None;
        }
    };
    let keep_alive = granted_keep_alive(connect.keep_alive, ctx.limits.max_keep_alive_secs);
    let session_present = resumed.is_some();
    let (filters, sent, queued) = match (link.as_mut(), resumed) {
        (Some(l), Some(p)) => match saved::resume(ctx, &connect.client_id, l, &p.filters).await {
            Ok(queued) => (p.filters, p.sent, queued),
            Err(e) => {
                warn!(thing = %identity.thing, error = %e, "router link failed while resuming; refusing connection");
                ctx.sessions.park(&connect.client_id, p);
                let _ = conn
                    .send_connack(&codec, refusal(ConnectReturnCode::ServerUnavailable))
                    .await;
                return None;
            }
        },
        _ => {
            if left_behind {
                ctx.fabric.offline().unwatch(&connect.client_id).await;
            }
            (Vec::new(), Vec::new(), Vec::new())
        }
    };
    // What the store keeps follows: the session as it is now, or nothing.
    if keep {
        if !session_present && left_behind {
            saved::remove(ctx, &connect.client_id);
        }
        let saved = SavedSession {
            filters: filters.clone(),
            expiry_secs: terms.expiry,
            left_at_ms: None,
            sent: sent.clone(),
        };
        saved::put(ctx, &connect.client_id, &saved).await;
    } else if left_behind {
        saved::remove(ctx, &connect.client_id);
    }
    let ack = connack_success(
        &ctx.limits,
        session_present,
        keep_alive,
        connect.keep_alive,
        &terms,
    );
    if conn.send_connack(&codec, ack).await.is_err() {
        if let Some(link) = link {
            release_link(&ctx.fabric, link, None).await;
        }
        return None;
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
        // The AWS IoT registry may vouch for it: asked in the background, its answer reaches
        // this connection through the epoch.
        if let Some(verifier) = ctx.authority.verifier() {
            let (verifier, authority) = (Arc::clone(verifier), Arc::clone(&ctx.authority));
            let (thing, cert) = (identity.thing.clone(), identity.cert_id.clone());
            tokio::spawn(async move { verifier.check_new(&authority, &thing, &cert).await });
        }
    }
    ctx.stats.connections_accepted.fetch_add(1, Relaxed);
    ctx.stats.connections_open.fetch_add(1, Relaxed);
    let mut session = Session {
        epoch,
        ctx: Arc::clone(ctx),
        codec,
        thing: Arc::from(identity.thing.as_str()),
        cert_id: Arc::from(identity.cert_id.as_str()),
        source_ip: Arc::from(peer.ip().to_canonical().to_string()),
        identity,
        grant: admitted.grant,
        will: admitted.will,
        link_clean: !keep,
        expiry: terms.expiry,
        expiry_at_connect: terms.expiry,
        receive_max: terms.receive_max,
        max_packet_to_device: terms.max_packet,
        waiting: std::collections::VecDeque::new(),
        in_flight: 0,
        own_unacked: Vec::new(),
        next_own_pkid: super::FIRST_OWN_PKID,
        link,
        // A resumed session's subscriptions, given to the router again; tracked so a later
        // change of grant can prune them too.
        filters,
        subscriptions_changed: false,
        generations: ctx.fabric.generations(),
        to_router: Vec::new(),
        to_ingest: Vec::new(),
        read_acks: Vec::new(),
        held: std::collections::VecDeque::new(),
        denials_logged: 0,
        read_at: (std::time::Instant::now(), 0),
        wake_router: false,
        router_acks: std::collections::VecDeque::new(),
    };
    session.queue_stored(queued, &sent);
    // A resumed session's relayed filters, on the cloud link again (after a restart the link
    // starts with the downlinks' filters only).
    let resumed: Vec<String> = session.filters.iter().map(|s| s.filter.clone()).collect();
    for filter in &resumed {
        session.relay_filter(filter);
    }
    ctx.sessions.set_filters(&session.thing, resumed);
    Some(Opened {
        session,
        slot,
        keep_alive,
        session_present,
    })
}

pub(super) enum ConnectError {
    Version(u8),
    Other(String),
}

pub(super) async fn read_connect<S: AsyncRead + Unpin>(
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
        match conn.read().await {
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
    // MQTT-3.1.3-8 and §3.2.2.2: no identifier to assign here, since a device's client id is
    // its thing name; 0x02 on 3.1.1, 0x85 on 5.
    if connect.client_id.is_empty() {
        info!(%peer, thing = %Escaped(thing), "empty client id; refused");
        return Err(ConnectReturnCode::ClientIdentifierNotValid);
    }
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
    let listing = (!identity.serial.is_empty()).then_some(crate::auth::Listing {
        issuer: &identity.issuer,
        serial: &identity.serial,
    });
    let grant = ctx
        .authority
        .admit(thing, &identity.cert_id, listing)
        .map_err(|e| {
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

pub(super) fn granted_keep_alive(requested: u16, max: u16) -> u16 {
    if requested == 0 || requested > max {
        max
    } else {
        requested
    }
}

pub(super) fn refusal(code: ConnectReturnCode) -> Packet {
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
    terms: &Terms,
) -> Packet {
    let props = ConnAckProperties {
        session_expiry_interval: terms.expiry_capped.then_some(terms.expiry),
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
