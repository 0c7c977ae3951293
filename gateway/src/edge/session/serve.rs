//! Serving a connected device: the loop over its socket, the router's deliveries, grant
//! changes and router rebuilds, and the checks on every packet it sends.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::{DeviceState, Operation};
use crate::edge::broker::{device_form, RouterLink};
use crate::edge::codec::publish_with_id;
use crate::edge::codec::{CodecError, Frame};
use crate::edge::marks::{delivery_fingerprint, entering_properties, qos_and_pkid, strip_marks};
use crate::edge::offline::split_entry;
use crate::edge::relay::{thing_topic, Relay, ThingTopic};
use crate::edge::table::{EndReason, SessionSlot, Subscription};
use crate::escape::Escaped;
use crate::pipeline::Message;
use crate::topic::{check_filter, check_text, check_topic, TopicError};
use sitegate_plugins::iotcore::UpError;

use super::acks::{detach_payloads, front_receipt, HeldAcks};
use super::close::{protocol_error, topic_error, Close, Flow};
use super::{Conn, Outgoing, RouterAck, Session};

/// Router deliveries gathered into one socket write at most.
const MAX_NOTIFICATIONS_PER_WRITE: usize = 256;
/// Denials logged at info per session before the rest go to debug (they are all counted).
const LOGGED_DENIALS_PER_SESSION: u32 = 3;

impl Session {
    /// The serving loop. Its rare steps (a grant refresh, linking to a rebuilt router, saving
    /// changed subscriptions) are boxed where they are awaited and only when they run, so the
    /// connection's task does not carry their state for the whole session.
    pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        slot: &mut SessionSlot,
        keep_alive: Duration,
    ) -> Close {
        // MQTT: a client silent for 1.5 × its keepalive is gone.
        let idle = keep_alive + keep_alive / 2;
        let mut deadline = Instant::now() + idle;
        let mut epoch_open = true;
        // Bytes left over after CONNECT belong to the first packets.
        let mut pending_input = !conn.rbuf.is_empty();
        // Messages kept for a resumed session go out first.
        self.send_waiting(&mut conn.wbuf);
        if let Err(e) = conn.flush().await {
            return Close::Network(e);
        }
        loop {
            if pending_input {
                pending_input = false;
                if let Flow::Close(c) = self.handle_input(&mut conn.rbuf, &mut conn.wbuf).await {
                    return c;
                }
                conn.release_read_buffer();
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
                        } else if let Flow::Close(c) = Box::pin(self.refresh_grant()).await {
                            return c;
                        }
                        Box::pin(self.keep_subscriptions()).await;
                    }
                    read = tokio::time::timeout_at(deadline, conn.read()) => {
                        match read {
                            Err(_) => return Close::KeepAlive,
                            Ok(Err(e)) => return Close::Network(e.to_string()),
                            Ok(Ok(0)) => return Close::Network("connection closed by device".into()),
                            Ok(Ok(_)) => {
                                deadline = Instant::now() + idle;
                                if let Flow::Close(c) = self.handle_input(&mut conn.rbuf, &mut conn.wbuf).await {
                                    return c;
                                }
                                conn.release_read_buffer();
                            }
                        }
                    }
                    _ = self.generations.changed(), if self.link.is_some() => {
                        if let Flow::Close(c) = Box::pin(self.relink()).await {
                            return c;
                        }
                    }
                    durable = front_receipt(&mut self.held), if self.held.front().is_some_and(|h| h.receipt.is_some()) => {
                        match durable {
                            Ok(Ok(())) => {
                                if let Err(reason) = self.release_held(&mut conn.wbuf) {
                                    return Close::Spool(reason);
                                }
                            }
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
                                // PUBACKs of deliveries lowered to QoS 0.
                                if let Flow::Close(c) = self.hand_to_router().await {
                                    return c;
                                }
                            }
                            Ok(None) => {}
                            Err(_) if self.router_moved() => {
                                if let Flow::Close(c) = Box::pin(self.relink()).await {
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
            if let Flow::Close(c) = Box::pin(self.refresh_grant()).await {
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
        if self.subscriptions_changed {
            Box::pin(self.keep_subscriptions()).await;
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
                self.write(Packet::PubAck(ack, None), wbuf);
            }
        } else if receipt.is_some() || !acks.is_empty() {
            self.held.push_back(HeldAcks { receipt, acks });
        }
        flow
    }

    /// A persistent session's subscriptions changed: they are kept in the store, durably,
    /// before the SUBACK (or UNSUBACK) goes out, so a crash does not lose them.
    pub(super) async fn keep_subscriptions(&mut self) {
        if !std::mem::take(&mut self.subscriptions_changed) {
            return;
        }
        let filters = self.filters.iter().map(|s| s.filter.clone()).collect();
        self.ctx.sessions.set_filters(&self.thing, filters);
        if self.expiry == 0 || self.link_clean {
            return;
        }
        let saved = super::saved::SavedSession {
            filters: self.filters.clone(),
            expiry_secs: self.expiry,
            left_at_ms: None,
            sent: self.sent_stored(),
        };
        super::saved::put(&self.ctx, &self.thing, &saved).await;
        if let Err(e) = self.ctx.fabric.offline().flush().await {
            warn!(thing = %self.thing, error = %e, "a persistent session's subscriptions may not be durable");
        }
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
            if let Flow::Close(c) = Box::pin(self.relink()).await {
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
        match self.ctx.fabric.link(&self.thing, self.link_clean).await {
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
    pub(super) async fn resubscribe(&mut self) -> Flow {
        if self.filters.is_empty() {
            return Flow::Continue;
        }
        let packet = super::saved::router_subscribe(&self.filters);
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

    /// A PUBLISH from the device: its topic and properties checked, the policy asked, then to the
    /// router and (when a route takes it) the pipeline; its PUBACK joins the read's.
    fn publish(
        &mut self,
        mut publish: Publish,
        props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
    ) -> Flow {
        // A handle on the topic bytes (a reference count, no copy): `retain` may give
        // the publish its own copy below while `topic` is still in use.
        let topic_bytes = publish.topic.clone();
        let Ok(topic) = std::str::from_utf8(&topic_bytes) else {
            return protocol_error(DisconnectReasonCode::TopicNameInvalid, "topic is not UTF-8");
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
                return topic_error(&e, DisconnectReasonCode::ProtocolError, "response topic");
            }
        }
        let checked = check_topic(topic, self.ctx.limits.topics);
        if let Err(e) = &checked {
            if e.is_malformed() || *e == TopicError::Wildcard {
                return topic_error(e, DisconnectReasonCode::TopicNameInvalid, "topic");
            }
        }
        if qos > 1 {
            return protocol_error(
                DisconnectReasonCode::QoSNotSupported,
                "QoS 2 is not supported (maximum QoS is 1)",
            );
        }
        // Marked for the router before it is retained, so a retained copy is delivered at the
        // QoS it was published with too.
        let from = self.ctx.fabric.no_local_used().then_some(&*self.thing);
        let props = entering_properties(
            props,
            if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            from,
        );
        let reserved = thing_topic(topic, &self.thing);
        let mut answer: Option<(String, Vec<u8>)> = None;
        let relay = match reserved {
            ThingTopic::Own(kind) => self.ctx.relay.as_ref().filter(|r| r.relays_topic(kind)),
            _ => None,
        };
        let refusal = match checked {
            Err(e) => Some((e.reason(), PubAckReason::TopicNameInvalid, e.to_string())),
            Ok(()) if reserved == ThingTopic::NotOwn => Some((
                "other_thing",
                PubAckReason::NotAuthorized,
                "another thing's reserved topic".into(),
            )),
            Ok(()) if !self.grant.permissions.allows(Operation::Publish, topic) => Some((
                "publish_not_allowed",
                PubAckReason::NotAuthorized,
                "denied by policy".into(),
            )),
            Ok(()) if relay.is_some() => {
                match relay.map(|r| self.relay_up(r, topic, &publish.payload)) {
                    Some(Err(e)) => Some(("relay_unavailable", relay_refusal(&e), e.to_string())),
                    Some(Ok(cached)) => {
                        answer = cached;
                        None
                    }
                    None => None,
                }
            }
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
            let counter = if qos == 0 {
                &self.ctx.stats.messages_in_qos0
            } else {
                &self.ctx.stats.messages_in_qos1
            };
            counter.fetch_add(1, Relaxed);
            if let Some((accepted, doc)) = answer {
                // As IoT Core would answer it, on the same topic, to this device alone.
                let answer = publish_with_id(accepted.as_bytes(), &doc, QoS::AtLeastOnce, 1, false);
                let props = entering_properties(None, QoS::AtLeastOnce, None);
                self.to_router.push(Packet::Publish(answer, props));
                self.ctx.stats.shadow_answers_cached.fetch_add(1, Relaxed);
            } else if relay.is_some() {
                self.ctx.stats.relayed_up.fetch_add(1, Relaxed);
            } else if let Some(wanted) = self.ctx.ingest.as_ref().and_then(|i| i.wants(topic)) {
                self.to_ingest.push(Message {
                    wanted,
                    topic: topic.to_owned(),
                    payload: publish.payload.clone(),
                    thing: Arc::clone(&self.thing),
                    cert_id: Arc::clone(&self.cert_id),
                    qos,
                    received_at_ms: self.read_at.1,
                    received: self.read_at.0,
                    properties: crate::edge::marks::rule_properties(props.as_ref()),
                    source_ip: Arc::clone(&self.source_ip),
                });
            }
            if relay.is_none() {
                self.to_router.push(Packet::Publish(publish, props));
            }
            PubAckReason::Success
        };
        // MQTT 3.1.1 has no way to say "not authorized" in a PUBACK (§3.3.5): the
        // message is acknowledged and dropped. MQTT 5 carries the reason code.
        if qos == 1 {
            self.read_acks.push(PubAck { pkid, reason });
        }
        Flow::Continue
    }

    fn handle_packet(&mut self, frame: Frame, wbuf: &mut BytesMut) -> Flow {
        match frame.packet {
            Packet::Publish(publish, props) => self.publish(publish, props, frame.qos, frame.pkid),
            Packet::PubAck(ack, _) if ack.pkid >= super::FIRST_OWN_PKID => {
                if let Some(i) = self.own_unacked.iter().position(|&(p, _)| p == ack.pkid) {
                    let (_, stored) = self.own_unacked.swap_remove(i);
                    self.in_flight = self.in_flight.saturating_sub(1);
                    if let Some(seq) = stored {
                        super::saved::delivered(&self.ctx, &self.thing, &[seq]);
                    }
                }
                self.send_waiting(wbuf);
                Flow::Continue
            }
            Packet::PubAck(ack, _) => {
                let delivered = self
                    .router_acks
                    .iter()
                    .position(|a| !a.by_session && a.sent && a.pkid == ack.pkid);
                if let Some(i) = delivered {
                    self.router_acks.remove(i);
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
                self.to_router.push(Packet::PubAck(ack, None));
                self.ack_router_ahead();
                self.send_waiting(wbuf);
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
                    .retain(|s| !unsubscribe.filters.contains(&s.filter));
                self.subscriptions_changed = true;
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
            Packet::Disconnect(d, props) => {
                if let Some(expiry) = props.and_then(|p| p.session_expiry_interval) {
                    // MQTT-3.14.2-2: a session that was to end with its connection cannot be
                    // given a life at DISCONNECT.
                    if self.expiry_at_connect == 0 && expiry != 0 {
                        return protocol_error(
                            DisconnectReasonCode::ProtocolError,
                            "DISCONNECT gives a Session Expiry Interval to a session that had none",
                        );
                    }
                    self.expiry = expiry.min(self.ctx.limits.max_session_expiry_secs);
                }
                Flow::Close(Close::ByClient {
                    with_will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                })
            }
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
        let mut replays = Vec::new();
        let limits = self.ctx.limits;
        for (i, mut filter) in subscribe.filters.drain(..).enumerate() {
            let checked = check_filter(&filter.path, limits.topics);
            if let Err(e) = &checked {
                if e.is_malformed() {
                    return topic_error(e, DisconnectReasonCode::ProtocolError, "filter");
                }
            }
            let known = self.filters.iter().any(|s| s.filter == filter.path);
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
                Ok(()) if thing_topic(&filter.path, &self.thing) == ThingTopic::NotOwn => Some((
                    "other_thing",
                    SubscribeReasonCode::NotAuthorized,
                    "another thing's reserved topics".into(),
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
            let sub = Subscription {
                filter: filter.path.clone(),
                qos: filter.qos as u8,
                no_local: filter.nolocal,
                retain_as_published: filter.preserve_retain,
            };
            if sub.no_local {
                self.ctx.fabric.use_no_local();
            }
            // §3.8.3.1 Retain Handling: 0 sends the retained messages at every SUBSCRIBE, 1
            // only for a subscription that did not exist, 2 never.
            let replay = match filter.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => !known,
                RetainForwardRule::Never => false,
            };
            if replay {
                replays.push((sub.filter.clone(), sub.qos));
            }
            match self.filters.iter_mut().find(|s| s.filter == filter.path) {
                Some(known) => *known = sub,
                None => self.filters.push(sub),
            }
            self.subscriptions_changed = true;
            self.relay_filter(&filter.path);
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
        for (filter, granted_qos) in replays {
            for (publish, props) in self.ctx.fabric.retained_for(&filter) {
                self.queue_retained(publish, props, granted_qos);
            }
        }
        self.send_waiting(wbuf);
        Flow::Continue
    }

    /// Sends a device's relayed request up. While the cloud is away a shadow `get` is
    /// answered from the last document instead: its `get/accepted` topic and body.
    fn relay_up(
        &self,
        relay: &Relay,
        topic: &str,
        payload: &[u8],
    ) -> Result<Option<(String, Vec<u8>)>, UpError> {
        // Copied: queued for the cloud, a slice would pin the whole read buffer.
        let copy = bytes::Bytes::copy_from_slice(payload);
        match relay.up(topic, copy, &self.thing, &self.cert_id) {
            Ok(()) => Ok(None),
            Err(UpError::Down) => relay
                .shadows
                .answer(topic, payload)
                .map(Some)
                .ok_or(UpError::Down),
            Err(e) => Err(e),
        }
    }

    /// Subscribes a granted filter of the device's own relayed jobs or shadow topics on the
    /// cloud link too, whose answers then come down on it.
    pub(super) fn relay_filter(&self, filter: &str) {
        let (ThingTopic::Own(kind), Some(relay)) =
            (thing_topic(filter, &self.thing), self.ctx.relay.as_ref())
        else {
            return;
        };
        if relay.relays_filter(kind) {
            relay.link.subscribe(filter);
        }
    }

    /// Queues a retained message for the device (RETAIN 1, MQTT-3.3.1-8) at the lower of its
    /// QoS and the subscription's, under a packet id of the session's own.
    fn queue_retained(
        &mut self,
        publish: Publish,
        mut props: Option<PublishProperties>,
        granted_qos: u8,
    ) {
        let marks = strip_marks(&mut props, &self.thing);
        let (qos, _) = qos_and_pkid(&publish);
        let at_qos1 = qos == QoS::AtLeastOnce && !marks.qos0 && granted_qos > 0;
        self.queue_own(&publish, props, at_qos1, true, None);
    }

    /// Queues a delivery of the session's own (not the router's), under its own packet id;
    /// `stored` names a queued message of the offline queue (and whether it went out before).
    fn queue_own(
        &mut self,
        publish: &Publish,
        props: Option<PublishProperties>,
        at_qos1: bool,
        retain: bool,
        stored: Option<(u64, bool)>,
    ) {
        let pkid = at_qos1.then(|| self.own_pkid());
        let qos = if at_qos1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let publish = publish_with_id(
            &publish.topic,
            &publish.payload,
            qos,
            pkid.unwrap_or(0),
            retain,
        );
        self.waiting.push_back(Outgoing {
            publish,
            props,
            pkid,
            own: true,
            stored: stored.map(|(seq, _)| seq),
            dup: stored.is_some_and(|(_, dup)| dup),
        });
    }

    /// Queues the messages of this session's offline queue, before anything the router sends;
    /// those in `sent` went out before and go out again marked DUP.
    pub(super) fn queue_stored(&mut self, stored: Vec<(u64, bytes::Bytes)>, sent: &[u64]) {
        let codec = crate::edge::codec::Codec::new(crate::edge::codec::Version::V5, usize::MAX);
        let now_ms = crate::clock::now_ms();
        let mut settled = Vec::new();
        for (seq, entry) in stored {
            let Some((queued_at, packet)) = split_entry(&entry) else {
                settled.push(seq);
                continue;
            };
            let dup = packet.first().is_some_and(|h| h & super::DUP != 0) || sent.contains(&seq);
            let mut buf = BytesMut::from(packet);
            let Ok(Some(frame)) = codec.read(&mut buf) else {
                warn!(thing = %self.thing, "a queued message does not parse; left out");
                settled.push(seq);
                continue;
            };
            let Packet::Publish(publish, mut props) = frame.packet else {
                settled.push(seq);
                continue;
            };
            // MQTT-3.3.2-5, -6: an expired message is not delivered; the others go out with
            // what is left of their Message Expiry Interval.
            let waited = now_ms.saturating_sub(queued_at) / 1000;
            if let Some(expiry) = props
                .as_mut()
                .and_then(|p| p.message_expiry_interval.as_mut())
            {
                if u64::from(*expiry) <= waited {
                    self.ctx
                        .stats
                        .session_messages_expired
                        .fetch_add(1, Relaxed);
                    settled.push(seq);
                    continue;
                }
                *expiry -= waited as u32;
            }
            let retain = publish.retain;
            self.queue_own(&publish, props, frame.qos == 1, retain, Some((seq, dup)));
        }
        super::saved::delivered(&self.ctx, &self.thing, &settled);
    }

    /// A packet id for the session's own delivery, not in use by another.
    fn own_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_own_pkid;
            self.next_own_pkid = match pkid {
                u16::MAX => super::FIRST_OWN_PKID,
                n => n + 1,
            };
            if !self.own_unacked.iter().any(|&(p, _)| p == pkid) {
                return pkid;
            }
        }
    }

    async fn drain_ready_notifications(&mut self, wbuf: &mut BytesMut) -> Flow {
        for _ in 0..MAX_NOTIFICATIONS_PER_WRITE {
            let Some(link) = self.link.as_mut() else {
                break;
            };
            // Polled once: ready notifications are taken, none are waited for. (Not a zero
            // timeout: tokio's timer rounds a deadline up to its next millisecond tick, so
            // every delivery waited up to a millisecond for the last, empty poll.)
            match ready_now(link.rx.next()) {
                Some(Ok(Some(n))) => {
                    if let Flow::Close(c) = self.handle_notification(n, wbuf) {
                        return Flow::Close(c);
                    }
                }
                Some(Ok(None)) | None => break,
                Some(Err(_)) if self.router_moved() => break,
                Some(Err(_)) => return Flow::Close(Close::RouterGone),
            }
        }
        Flow::Continue
    }

    fn handle_notification(&mut self, notification: Notification, wbuf: &mut BytesMut) -> Flow {
        match notification {
            Notification::Forward(mut forward) => {
                self.ctx.stats.messages_out.fetch_add(1, Relaxed);
                let marks = device_form(&mut forward.publish, &mut forward.properties, &self.thing);
                let (qos, pkid) = qos_and_pkid(&forward.publish);
                let topic = std::str::from_utf8(&forward.publish.topic).unwrap_or("");
                // §3.8.3.1: No Local keeps a device's own messages from its subscription, and
                // Retain As Published gives back the RETAIN flag the router cleared.
                let skipped = marks.from_me && self.all_matching(topic, |s| s.no_local);
                if marks.retained && !self.all_matching(topic, |s| !s.retain_as_published) {
                    forward.publish.retain = true;
                }
                // §3.8.4 on the granted side: the router keeps the QoS of a filter's first
                // SUBSCRIBE; the session's own record has the latest grant.
                let granted = self
                    .filters
                    .iter()
                    .filter(|s| crate::topic::matches(topic, &s.filter))
                    .map(|s| s.qos)
                    .max();
                let granted0 = granted == Some(0);
                let at_qos0 = marks.qos0 || skipped || granted0;
                let mut to_device = None;
                if qos != QoS::AtMostOnce {
                    // The router waits for this PUBACK, in order: a delivery lowered to QoS 0
                    // is acknowledged by the session once the ones before it are.
                    self.router_acks.push_back(RouterAck {
                        pkid,
                        by_session: at_qos0,
                        sent: false,
                        fingerprint: 0,
                    });
                    if at_qos0 {
                        let p = &forward.publish;
                        forward.publish =
                            Publish::new(p.topic.clone(), p.payload.clone(), p.retain);
                    } else {
                        to_device = Some(pkid);
                    }
                }
                if !skipped {
                    self.waiting.push_back(Outgoing {
                        publish: forward.publish,
                        props: forward.properties,
                        pkid: to_device,
                        own: false,
                        stored: None,
                        dup: false,
                    });
                }
                self.send_waiting(wbuf);
                self.ack_router_ahead();
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
    pub(super) async fn refresh_grant(&mut self) -> Flow {
        self.epoch.borrow_and_update();
        let grant = match self
            .ctx
            .authority
            .current_grant(&self.identity.thing, &self.identity.cert_id)
        {
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
            .partition(|s| {
                self.grant
                    .permissions
                    .allows(Operation::Subscribe, &s.filter)
            });
        self.filters = kept;
        if dropped.is_empty() {
            return Flow::Continue;
        }
        self.subscriptions_changed = true;
        self.drop_queued_not_allowed();
        let mut filters = Vec::with_capacity(dropped.len());
        for Subscription { filter, .. } in dropped {
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

    /// Leaves out of `waiting` the queued messages (of the offline queue) that no remaining
    /// subscription takes: a grant that shrank while the device was away stops them too.
    fn drop_queued_not_allowed(&mut self) {
        let mut settled = Vec::new();
        let filters = &self.filters;
        self.waiting.retain(|out| {
            let Some(seq) = out.stored else {
                return true;
            };
            let topic = std::str::from_utf8(&out.publish.topic).unwrap_or("");
            let allowed = filters
                .iter()
                .any(|s| crate::topic::matches(topic, &s.filter));
            if !allowed {
                settled.push(seq);
            }
            allowed
        });
        super::saved::delivered(&self.ctx, &self.thing, &settled);
    }

    /// Writes the waiting deliveries the device's Receive Maximum leaves room for, in order
    /// (MQTT-3.3.4-9: a QoS 0 delivery behind a held QoS 1 one waits too, so the order holds).
    fn send_waiting(&mut self, wbuf: &mut BytesMut) {
        while let Some(next) = self.waiting.front() {
            if next.pkid.is_some() && self.in_flight >= usize::from(self.receive_max) {
                break;
            }
            let Some(out) = self.waiting.pop_front() else {
                break;
            };
            self.deliver(out, wbuf);
        }
    }

    /// Writes one delivery, unless it is larger than the device takes (MQTT-3.1.2-25: then it
    /// is dropped, counted, and settled as if sent); one sent before goes out with DUP set.
    fn deliver(&mut self, out: Outgoing, wbuf: &mut BytesMut) {
        // A persistent session's router deliveries are fingerprinted so that, drained from
        // the router when the device leaves unacknowledged, they are queued marked DUP.
        let fingerprint = match (out.pkid, out.own, self.expiry > 0) {
            (Some(_), false, true) => delivery_fingerprint(&out.publish),
            _ => 0,
        };
        let start = wbuf.len();
        self.write(Packet::Publish(out.publish, out.props), wbuf);
        let too_large = wbuf.len() - start > self.max_packet_to_device;
        if too_large {
            wbuf.truncate(start);
            self.ctx.stats.deliveries_too_large.fetch_add(1, Relaxed);
        } else if out.dup {
            if let Some(header) = wbuf.get_mut(start) {
                *header |= super::DUP;
            }
        }
        let Some(pkid) = out.pkid.filter(|_| !too_large) else {
            // Settled now: sent at QoS 0, or dropped.
            if let Some(seq) = out.stored {
                super::saved::delivered(&self.ctx, &self.thing, &[seq]);
            }
            if too_large && !out.own {
                if let Some(a) = out
                    .pkid
                    .and_then(|p| self.router_acks.iter_mut().rev().find(|a| a.pkid == p))
                {
                    a.by_session = true;
                }
                self.ack_router_ahead();
            }
            return;
        };
        if out.own {
            self.own_unacked.push((pkid, out.stored));
            self.in_flight += 1;
            return;
        }
        if let Some(a) = self.router_acks.iter_mut().rev().find(|a| a.pkid == pkid) {
            a.sent = true;
            a.fingerprint = fingerprint;
        }
        self.in_flight += 1;
    }

    /// Whether every subscription of this session that matches `topic` has `property`.
    fn all_matching(&self, topic: &str, property: impl Fn(&Subscription) -> bool) -> bool {
        self.filters
            .iter()
            .filter(|s| crate::topic::matches(topic, &s.filter))
            .all(property)
    }

    /// Sequences of queued messages sent and not acknowledged.
    pub(super) fn sent_stored(&self) -> Vec<u64> {
        self.own_unacked.iter().filter_map(|&(_, s)| s).collect()
    }

    /// Fingerprints of the router's deliveries the device has not acknowledged.
    pub(super) fn unacked(&self) -> Vec<u64> {
        self.router_acks
            .iter()
            .filter(|a| a.sent && !a.by_session)
            .map(|a| a.fingerprint)
            .collect()
    }

    /// Acknowledges to the router the deliveries the session settles itself at the front of its
    /// queue.
    fn ack_router_ahead(&mut self) {
        while let Some(&RouterAck {
            pkid,
            by_session: true,
            ..
        }) = self.router_acks.front()
        {
            self.router_acks.pop_front();
            self.to_router.push(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ));
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
}

/// The next notification on `link`; never resolves without one (the caller guards on it).
/// The MQTT 5 PUBACK reason (§3.4.2.1) for a relayed request the cloud link cannot take: a
/// full queue or a link that is down pass with time; a payload over IoT Core's limit does not.
fn relay_refusal(e: &UpError) -> PubAckReason {
    match e {
        UpError::Full => PubAckReason::QuotaExceeded,
        UpError::Down => PubAckReason::UnspecifiedError,
        UpError::Invalid(_) => PubAckReason::ImplementationSpecificError,
    }
}

/// `future`'s output if it is ready at its first poll; otherwise it is dropped unfinished.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

async fn next_notification(
    link: &mut Option<RouterLink>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link {
        Some(link) => link.rx.next().await,
        None => std::future::pending().await,
    }
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
