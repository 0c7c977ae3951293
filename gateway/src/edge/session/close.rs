//! How a session ends: the reason, the DISCONNECT the device is told (MQTT 5), the will, and
//! what is left behind (a parked persistent session, or nothing).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::protocol::{Disconnect, DisconnectReasonCode, LastWill, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::auth::Operation;
use crate::edge::broker::{Fabric, RouterLink};
use crate::edge::codec::publish_packet;
use crate::edge::marks::entering_properties;
use crate::edge::table::{EndReason, Parked};
use crate::escape::Escaped;
use crate::topic::TopicError;

use super::saved::{self, SavedSession};
use super::{Conn, EdgeContext, Session};

/// Why a session ended; decides the DISCONNECT sent and whether the will is published.
pub(super) enum Close {
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

pub(super) enum Flow {
    Continue,
    Close(Close),
}

impl Session {
    /// Tells the device why (MQTT 5), publishes the will when due, and releases the link.
    pub(super) async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        conn: &mut Conn<S>,
        close: Close,
    ) {
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
        // Every PUBLISH accepted is acknowledged before the connection ends, on 3.1.1 (which
        // has no DISCONNECT from the server) as on 5: the acks of the last read may still be
        // in the buffer, or waiting for the spool.
        if !matches!(close, Close::Network(_)) {
            if !matches!(close, Close::Spool(_)) {
                self.release_all_held(&mut conn.wbuf).await;
            }
            if let Some(code) = reason {
                let d = Packet::Disconnect(Disconnect { reason_code: code }, None);
                let _ = self.codec.write(d, &mut conn.wbuf);
            }
            let _ = conn.flush().await;
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
        let generation = self
            .link
            .as_ref()
            .map_or(self.ctx.fabric.generation(), |l| l.generation);
        // A revoked device's session ends with it: nothing is kept for it.
        let revoked = matches!(close, Close::Ended(EndReason::Revoked));
        let keep = self.expiry > 0 && !self.link_clean && !revoked;
        let parked = keep.then(|| {
            let sent = self.sent_stored();
            let saved = SavedSession {
                filters: self.filters.clone(),
                expiry_secs: self.expiry,
                left_at_ms: Some(crate::clock::now_ms()),
                sent: sent.clone(),
            };
            self.ctx.sessions.park(
                &thing,
                Parked {
                    filters: self.filters.clone(),
                    expires_at: Instant::now() + Duration::from_secs(u64::from(self.expiry)),
                    sent,
                },
            );
            saved
        });
        // The offline queue takes the session's messages from before its link is released, so
        // none published meanwhile is left to the router alone.
        let front = match &parked {
            Some(saved) => {
                saved::put(&self.ctx, &thing, saved).await;
                Some(saved::watch_leaving(&self.ctx, &thing, &saved.filters).await)
            }
            None => {
                if self.expiry_at_connect > 0 || !self.link_clean {
                    saved::remove(&self.ctx, &thing);
                }
                None
            }
        };
        let will = will.and_then(|(w, _)| {
            let from = self.ctx.fabric.no_local_used().then_some(&*self.thing);
            let props = entering_properties(None, w.qos, from);
            let mut packet = will_publish(w);
            match self.ctx.fabric.retain(&mut packet, &props) {
                Ok(()) => Some(Packet::Publish(packet, props)),
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
        match parked.zip(front) {
            // The router's backlog for it moves to its offline queue.
            Some((saved, front)) => {
                saved::hand_over(&self.ctx, &thing, &saved.filters, self.unacked(), front).await
            }
            // A resumed session that was to end with this connection (expiry 0 now), or a
            // revoked one: the router kept it because the link was not clean.
            None if !self.link_clean => {
                let _ = fabric.forget(&thing, generation).await;
            }
            None => {}
        }
    }
}

/// How often parked sessions are checked for expiry.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// Ends parked persistent sessions once their Session Expiry Interval has passed, with the
/// messages queued for them; runs until `stop`.
pub async fn expire_sessions(ctx: Arc<EdgeContext>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(EXPIRY_SWEEP) => {}
        }
        for client_id in ctx.sessions.take_expired(Instant::now()) {
            // A device that came back meanwhile holds the client id; its CONNECT took the
            // parked session already, so only sessions still away are here.
            ctx.stats.sessions_expired.fetch_add(1, Relaxed);
            debug!(thing = %Escaped(&client_id), "persistent session expired");
            ctx.fabric.offline().unwatch(&client_id).await;
            saved::remove(&ctx, &client_id);
        }
    }
}

fn will_publish(w: LastWill) -> rumqttd::protocol::Publish {
    let topic = String::from_utf8_lossy(&w.topic).into_owned();
    publish_packet(&topic, &w.message, w.qos, w.retain)
}

/// Publishes the will (if any) and tells the router this link is gone, so a persistent session
/// is parked and a clean one forgotten.
pub(super) async fn release_link(fabric: &Fabric, mut link: RouterLink, will: Option<Packet>) {
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

pub(super) fn protocol_error(code: DisconnectReasonCode, detail: &str) -> Flow {
    Flow::Close(Close::Protocol(code, detail.to_owned()))
}

/// A topic or filter refused: malformed text closes with 0x81 (MQTT §1.5.4), anything else
/// with `otherwise`.
pub(super) fn topic_error(e: &TopicError, otherwise: DisconnectReasonCode, what: &str) -> Flow {
    let code = if e.is_malformed() {
        DisconnectReasonCode::MalformedPacket
    } else {
        otherwise
    };
    protocol_error(code, &format!("{what}: {e}"))
}
