//! A connection made with a claim certificate (`[auth.enrollment]`): it speaks only the
//! enrollment topics, so the shared certificate has no permission to lose.
//!
//! It may publish a CSR to `$sitegate/enroll/<thing>` and subscribe to
//! `$sitegate/enroll/<thing>/accepted` and `/rejected`, for one thing per connection. Any other
//! topic, a will, or QoS 2 closes it. It never enters the session table, the router or the
//! session store: its client id may be anything, even a live device's, and takes nothing from
//! it. It is always a clean session, it lives at most `auth.enrollment.session_limit`, and while
//! its request is pending it waits on the authority's epoch for the decision.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet,
    PingResp, PubAck, PubAckReason, QoS, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use crate::auth::enrollment::{answer_payload, thing_of_topic, Enrollment, Outcome, ENROLL_PREFIX};
use crate::edge::codec::{publish_packet, Codec, CodecError, Version};
use crate::escape::Escaped;

use super::connect::{granted_keep_alive, read_connect, refusal, ConnectError};
use super::{Conn, EdgeContext};

/// The largest packet a claim connection may send: a CSR of a 4096-bit RSA key is under 2 KiB.
const CLAIM_MAX_PACKET: usize = 16 * 1024;
/// Answer filters one claim connection may hold.
const CLAIM_MAX_FILTERS: usize = 2;

/// Serves a claim connection until it closes, is refused, or runs out of time.
pub(crate) async fn run_claim<S>(
    stream: S,
    claim_cert_id: String,
    peer: SocketAddr,
    ctx: Arc<EdgeContext>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(enrollment) = ctx.enrollment.clone() else {
        return;
    };
    ctx.stats.claim_sessions_open.fetch_add(1, Relaxed);
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        write_timeout: ctx.limits.write_timeout,
    };
    let max = ctx.limits.max_packet_size.min(CLAIM_MAX_PACKET);
    let first =
        tokio::time::timeout(ctx.limits.connect_timeout, read_connect(&mut conn, max)).await;
    if let Some(mut claim) = accept(
        &mut conn,
        first,
        &ctx,
        &enrollment,
        claim_cert_id,
        peer,
        max,
    )
    .await
    {
        let end = claim.serve(&mut conn).await;
        if let Some(code) = end {
            let _ = claim.codec.write(
                Packet::Disconnect(Disconnect { reason_code: code }, None),
                &mut conn.wbuf,
            );
            let _ = conn.flush().await;
        }
    }
    ctx.stats.claim_sessions_open.fetch_sub(1, Relaxed);
}

/// Reads the CONNECT's outcome and answers it; the connection's state when it was accepted.
async fn accept<'a, S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    first: Result<Result<(Codec, Packet), ConnectError>, tokio::time::error::Elapsed>,
    ctx: &'a EdgeContext,
    enrollment: &'a Enrollment,
    claim_cert_id: String,
    peer: SocketAddr,
    max_packet: usize,
) -> Option<Claim<'a>> {
    let (codec, packet) = match first {
        Ok(Ok(v)) => v,
        Ok(Err(ConnectError::Version(_))) => {
            let codec = Codec::new(Version::V311, max_packet);
            let _ = conn
                .send_connack(&codec, refusal(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return None;
        }
        Ok(Err(ConnectError::Other(reason))) => {
            debug!(%peer, %reason, "claim connection closed before CONNECT");
            return None;
        }
        Err(_) => return None,
    };
    let Packet::Connect(connect, props, will, _, _) = packet else {
        return None;
    };
    let refused = if connect.client_id.is_empty() {
        Some(ConnectReturnCode::ClientIdentifierNotValid)
    } else if will.is_some() {
        // A will is a publish on another topic.
        Some(ConnectReturnCode::NotAuthorized)
    } else {
        None
    };
    if let Some(code) = refused {
        ctx.stats.deny("claim_refused");
        info!(%peer, client_id = %Escaped(&connect.client_id), ?code, "claim connection refused at CONNECT");
        let _ = conn.send_connack(&codec, refusal(code)).await;
        return None;
    }
    let keep_alive = granted_keep_alive(connect.keep_alive, ctx.limits.max_keep_alive_secs);
    let asked_expiry = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
    let ack = ConnAckProperties {
        // Always a clean session: nothing of a claim connection outlives it.
        session_expiry_interval: (asked_expiry > 0).then_some(0),
        receive_max: None,
        max_qos: Some(1),
        retain_available: Some(0),
        max_packet_size: u32::try_from(max_packet).ok(),
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(0),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    let connack = Packet::ConnAck(
        ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        },
        Some(ack),
    );
    conn.send_connack(&codec, connack).await.ok()?;
    info!(%peer, client_id = %Escaped(&connect.client_id), claim_cert_id = %claim_cert_id, "claim certificate connected: enrollment topics only");
    Some(Claim {
        ctx,
        enrollment,
        codec,
        claim_cert_id,
        source_ip: peer.ip().to_canonical().to_string(),
        peer,
        keep_alive,
        thing: None,
        filters: Vec::new(),
        waiting: None,
    })
}

/// A claim connection's state.
struct Claim<'a> {
    ctx: &'a EdgeContext,
    enrollment: &'a Enrollment,
    codec: Codec,
    claim_cert_id: String,
    source_ip: String,
    peer: SocketAddr,
    keep_alive: u16,
    /// The one thing this connection enrolls, once a packet named it.
    thing: Option<String>,
    /// Answer topics subscribed.
    filters: Vec<String>,
    /// The certificate id of a request that waits for a decision.
    waiting: Option<String>,
}

impl Claim<'_> {
    /// Serves until the connection ends; the DISCONNECT reason to send, if any.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
    ) -> Option<DisconnectReasonCode> {
        let limit = tokio::time::sleep(self.enrollment.session_limit());
        tokio::pin!(limit);
        // MQTT-3.1.2-24: one and a half keep-alive periods of silence end it.
        let idle =
            Duration::from_millis(u64::from(self.keep_alive) * 1500).max(Duration::from_secs(1));
        let mut epoch = self.ctx.authority.watch();
        loop {
            loop {
                match self.codec.read(&mut conn.rbuf) {
                    Ok(Some(frame)) => {
                        if let Err(code) =
                            self.on_packet(frame.packet, frame.qos, frame.pkid, &mut conn.wbuf)
                        {
                            return Some(code);
                        }
                    }
                    Ok(None) => break,
                    Err(CodecError::TooLarge(_)) => {
                        return Some(DisconnectReasonCode::PacketTooLarge)
                    }
                    Err(_) => return Some(DisconnectReasonCode::MalformedPacket),
                }
            }
            if let (Some(id), Some(thing), true) = (
                self.waiting.clone(),
                self.thing.clone(),
                epoch.has_changed().unwrap_or(false),
            ) {
                epoch.borrow_and_update();
                if let Some(outcome) = self.enrollment.answer(&self.ctx.authority, &thing, &id) {
                    self.waiting = None;
                    self.send_answer(&outcome, &mut conn.wbuf);
                }
            }
            if conn.flush().await.is_err() {
                return None;
            }
            let waiting = self.waiting.is_some();
            tokio::select! {
                _ = &mut limit => {
                    info!(peer = %self.peer, "claim connection open for auth.enrollment.session_limit; closing");
                    return Some(DisconnectReasonCode::MaximumConnectTime);
                }
                changed = epoch.changed(), if waiting => {
                    if changed.is_err() {
                        return Some(DisconnectReasonCode::ServerShuttingDown);
                    }
                    // Looked at again at the loop's top, which reads the decision.
                    epoch.mark_changed();
                }
                read = tokio::time::timeout(idle, conn.read()) => match read {
                    Err(_) => return Some(DisconnectReasonCode::KeepAliveTimeout),
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(_)) => {}
                },
            }
        }
    }

    /// One packet; `Err` with the reason to close.
    fn on_packet(
        &mut self,
        packet: Packet,
        qos: u8,
        pkid: u16,
        out: &mut BytesMut,
    ) -> Result<(), DisconnectReasonCode> {
        match packet {
            Packet::Publish(publish, _) => {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                if qos > 1 {
                    return Err(DisconnectReasonCode::QoSNotSupported);
                }
                let thing = self.bind(thing_of_topic(&topic, ""), &topic)?;
                let outcome = self.enrollment.request(
                    &self.ctx.authority,
                    &thing,
                    &publish.payload,
                    &self.claim_cert_id,
                    &self.source_ip,
                );
                if qos == 1 {
                    self.write(
                        Packet::PubAck(
                            PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            },
                            None,
                        ),
                        out,
                    );
                }
                match &outcome {
                    Outcome::Pending(cert_id) => {
                        info!(thing = %thing, cert_id = %cert_id, "enrollment pending: approve it with `sitegate device approve {thing} --cert {cert_id}`");
                        self.waiting = Some(cert_id.clone());
                        // The AWS IoT registry may vouch for it through its thing; its answer
                        // reaches this connection through the epoch.
                        if let Some(verifier) = self.ctx.authority.verifier() {
                            let (verifier, authority) =
                                (Arc::clone(verifier), Arc::clone(&self.ctx.authority));
                            let id = cert_id.clone();
                            tokio::spawn(async move {
                                verifier.check_new(&authority, &thing, &id).await
                            });
                        }
                    }
                    Outcome::Accepted(issued) => {
                        info!(thing = %issued.thing, cert_id = %issued.cert_id, "enrollment accepted: certificate sent");
                    }
                    Outcome::Rejected(why) => {
                        info!(thing = %thing, reason = %why, "enrollment refused");
                    }
                }
                self.send_answer(&outcome, out);
                Ok(())
            }
            Packet::Subscribe(subscribe, _) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    let named = thing_of_topic(&filter.path, "/accepted")
                        .or_else(|| thing_of_topic(&filter.path, "/rejected"));
                    let fits = self.filters.contains(&filter.path)
                        || self.filters.len() < CLAIM_MAX_FILTERS;
                    match (named, fits) {
                        (Some(_), true) => {
                            self.bind(named, &filter.path)?;
                            if !self.filters.contains(&filter.path) {
                                self.filters.push(filter.path.clone());
                            }
                            // Answers go out at QoS 0: a lost one is asked for again.
                            codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                        }
                        _ => {
                            self.ctx.stats.deny("claim_refused");
                            warn!(peer = %self.peer, filter = %Escaped(&filter.path), "claim connection may subscribe only to its enrollment answers; refused");
                            codes.push(SubscribeReasonCode::NotAuthorized);
                        }
                    }
                }
                self.write(
                    Packet::SubAck(
                        SubAck {
                            pkid: subscribe.pkid,
                            return_codes: codes,
                        },
                        None,
                    ),
                    out,
                );
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                self.filters.retain(|f| !unsubscribe.filters.contains(f));
                let reasons = vec![UnsubAckReason::Success; unsubscribe.filters.len()];
                self.write(
                    Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsubscribe.pkid,
                            reasons,
                        },
                        None,
                    ),
                    out,
                );
                Ok(())
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp), out);
                Ok(())
            }
            Packet::Disconnect(..) => Err(DisconnectReasonCode::NormalDisconnection),
            Packet::PubAck(..) => Ok(()),
            _ => Err(DisconnectReasonCode::ProtocolError),
        }
    }

    /// The thing `named` by a packet's topic, which must be the connection's one thing.
    fn bind(&mut self, named: Option<&str>, topic: &str) -> Result<String, DisconnectReasonCode> {
        let Some(named) = named else {
            self.ctx.stats.deny("claim_refused");
            warn!(peer = %self.peer, claim_cert_id = %self.claim_cert_id, topic = %Escaped(topic), "claim certificate may publish only a CSR to $sitegate/enroll/<thing>; closing");
            return Err(DisconnectReasonCode::NotAuthorized);
        };
        match &self.thing {
            Some(t) if t != named => {
                self.ctx.stats.deny("claim_refused");
                warn!(peer = %self.peer, thing = %t, other = %Escaped(named), "claim connection named a second thing; closing");
                Err(DisconnectReasonCode::NotAuthorized)
            }
            Some(t) => Ok(t.clone()),
            None => {
                self.thing = Some(named.to_owned());
                Ok(named.to_owned())
            }
        }
    }

    /// Sends a decided answer on its topic, if the device subscribed to it.
    fn send_answer(&mut self, outcome: &Outcome, out: &mut BytesMut) {
        let (Some((suffix, body)), Some(thing)) = (answer_payload(outcome), self.thing.as_ref())
        else {
            return;
        };
        let topic = format!("{ENROLL_PREFIX}{thing}{suffix}");
        if !self.filters.contains(&topic) {
            debug!(thing = %thing, "enrollment answer not sent: the connection does not subscribe to {topic}");
            return;
        }
        let publish = publish_packet(&topic, &body, QoS::AtMostOnce, false);
        self.write(Packet::Publish(publish, None), out);
    }

    fn write(&self, packet: Packet, out: &mut BytesMut) {
        if let Err(e) = self.codec.write(packet, out) {
            warn!(peer = %self.peer, error = %e, "cannot encode a packet for the claim connection");
        }
    }
}
