//! MQTT conformance of the running gateway, one test per item of the MQTT 5 issue done so far,
//! each named after the section of the MQTT 5 standard (OASIS, 7 March 2019) it checks, with
//! raw packets over mutual TLS where no client will send the packet. Items refused on purpose
//! (topic aliases, subscription identifiers, shared subscriptions) are checked in
//! `edge::hostile`.

use super::common::raw::{self, RawClient};
use std::time::Duration;

use super::common::{archive_to, out_path, wait_lines, Site};

/// §4.3.2 (QoS 1: the receiver sends a PUBACK for each PUBLISH it accepted) with §4.13 (a
/// protocol error closes the connection): a QoS 1 PUBLISH followed in the same read by a QoS 2
/// PUBLISH, which ends the connection, is still acknowledged before the close, on 3.1.1 (where
/// the server sends no DISCONNECT) as on 5 (then DISCONNECT 0x9B, QoS not supported). Its
/// message is durable and reaches the sink.
#[tokio::test(flavor = "multi_thread")]
async fn s4_3_2_an_accepted_qos1_publish_is_acknowledged_before_a_protocol_error_closes() {
    let site = Site::start_with(|c| {
        let out = out_path(c);
        archive_to(c, &out);
    })
    .await;
    let sensor = site.device("sensor-1").await;
    for v5 in [false, true] {
        let mut c = RawClient::connect(&site, &sensor, v5).await;
        let mut bytes = raw::publish(b"dt/sensor-1/temp", 1, false, v5, &[], b"{\"t\":1}");
        bytes.extend(raw::publish(
            b"dt/sensor-1/temp",
            2,
            false,
            v5,
            &[],
            b"{\"t\":2}",
        ));
        c.send(&bytes).await;
        let ack = c.read().await.expect("PUBACK before the close");
        assert_eq!((ack.kind(), &ack.body[..2]), (4, &[0u8, 1][..]), "{ack:?}");
        if v5 {
            let bye = c.read().await.expect("DISCONNECT");
            assert_eq!((bye.kind(), bye.reason()), (14, 0x9B), "{bye:?}");
        }
        assert!(c.closed().await);
    }
    let lines = wait_lines(&out_path(&site.config), 2).await;
    assert!(lines.iter().all(|l| l["payload"]["t"] == 1), "{lines:?}");
    assert_eq!(site.snapshot().messages_in_qos1, 2);
    site.stop().await;
}

/// §3.1.3.1 (MQTT-3.1.3-8) and §3.2.2.2: a CONNECT with an empty client identifier that the
/// server does not assign one for gets "identifier rejected": 0x02 on 3.1.1, 0x85 (Client
/// Identifier not valid) on 5. Here a device's client id is its thing name, so none is
/// assigned.
#[tokio::test(flavor = "multi_thread")]
async fn s3_1_3_1_an_empty_client_id_is_an_invalid_identifier() {
    let site = Site::start().await;
    let sensor = site.device("sensor-1").await;
    for (v5, code) in [(false, 0x02u8), (true, 0x85)] {
        let mut c = RawClient::tls(&site, &sensor).await;
        c.send(&raw::connect("", v5, 0x02)).await;
        let ack = c.read().await.expect("CONNACK");
        assert_eq!((ack.kind(), ack.body[1]), (2, code), "{ack:?}");
        assert!(c.closed().await);
    }
    assert_eq!(site.snapshot().connects_refused, 2);
    site.stop().await;
}

/// A PUBLISH the gateway delivered: its QoS, packet id and payload.
fn delivered(reply: &raw::Reply, v5: bool) -> (u8, u16, Vec<u8>) {
    assert_eq!(reply.kind(), 3, "{reply:?}");
    let qos = (reply.first >> 1) & 0b11;
    let body = &reply.body;
    let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    if v5 {
        let len = raw::read_varint(body, &mut at);
        at += len;
    }
    (qos, pkid, body[at..].to_vec())
}

/// Subscribes `sub` to `filter` at QoS 1 and returns once the router delivers through it:
/// the SUBACK comes from the session, and the router may take the filter a moment later.
/// `warm` is a topic the filter matches; every warm-up delivery is acknowledged.
async fn subscribed(
    sub: &mut RawClient,
    publisher: &mut RawClient,
    filter: &[u8],
    warm: &[u8],
    v5: bool,
) {
    sub.send(&raw::subscribe(1, &[(filter, 1)], v5, &[])).await;
    let suback = sub.read().await.expect("SUBACK");
    assert_eq!(suback.suback_codes(v5), [1]);
    routed(sub, publisher, warm, v5).await;
}

/// Publishes to `warm` until the router delivers it to `sub`, then takes and acknowledges
/// every warm-up still on its way.
async fn routed(sub: &mut RawClient, publisher: &mut RawClient, warm: &[u8], v5: bool) {
    let mut got = None;
    for _ in 0..50 {
        publish_qos1(publisher, warm, b"warm").await;
        got = sub.read_within(Duration::from_millis(200)).await;
        if got.is_some() {
            break;
        }
    }
    let (_, pkid, _) = delivered(&got.expect("the subscription never took effect"), v5);
    sub.send(&puback(pkid)).await;
    // Warm-ups still on their way.
    while let Some(late) = sub.read_within(Duration::from_millis(300)).await {
        let (_, pkid, _) = delivered(&late, v5);
        sub.send(&puback(pkid)).await;
    }
}

fn puback(pkid: u16) -> Vec<u8> {
    raw::packet(0x40, &pkid.to_be_bytes())
}

/// §3.8.4 (MQTT-3.8.4-8): a message is delivered at the minimum of the QoS it was published
/// with and the QoS granted to the subscription. A QoS 0 publish reaches a QoS 1 subscriber as
/// QoS 0 (it used to arrive as QoS 1), a QoS 1 publish as QoS 1, on 3.1.1 and 5; and the
/// deliveries after a lowered one keep flowing (the router's acknowledgements stay in order).
/// A SUBSCRIBE again at QoS 0 replaces the grant (MQTT-3.8.4-3): QoS 1 publishes then arrive
/// at QoS 0 (rumqttd's router keeps the first QoS; the session applies the new one).
#[tokio::test(flavor = "multi_thread")]
async fn s3_8_4_delivered_qos_is_the_minimum_of_published_and_granted() {
    let site = Site::start_with(|c| {
        c.auth = toml::from_str::<sitegate::config::AuthConfig>(sitegate::edge::harness::OPEN_AUTH)
            .unwrap();
    })
    .await;
    let (a, b) = (site.device("dev-a").await, site.device("dev-b").await);
    let mut publisher = RawClient::connect(&site, &a, true).await;
    for v5 in [false, true] {
        let mut sub = RawClient::connect(&site, &b, v5).await;
        subscribed(&mut sub, &mut publisher, b"dt/#", b"dt/warm", v5).await;
        for (qos, payload) in [
            (0u8, "zero"),
            (1, "one"),
            (0, "zero again"),
            (1, "one again"),
        ] {
            publisher
                .send(&raw::publish(
                    b"dt/x",
                    qos,
                    false,
                    true,
                    &[],
                    payload.as_bytes(),
                ))
                .await;
            if qos == 1 {
                let ack = publisher.read().await.expect("PUBACK");
                assert_eq!(ack.kind(), 4, "{ack:?}");
            }
            let got = sub.read().await.expect("delivery");
            let (got_qos, pkid, body) = delivered(&got, v5);
            assert_eq!((got_qos, &body[..]), (qos, payload.as_bytes()), "v5 {v5}");
            if got_qos == 1 {
                sub.send(&raw::packet(0x40, &pkid.to_be_bytes())).await;
            }
        }
        // The same filter subscribed again at QoS 0 (MQTT-3.8.4-3 replaces the
        // subscription): a QoS 1 publish now arrives at QoS 0.
        sub.send(&raw::subscribe(9, &[(b"dt/#", 0)], v5, &[])).await;
        let suback = sub.read().await.expect("SUBACK");
        assert_eq!(suback.suback_codes(v5), [0], "v5 {v5}");
        publish_qos1(&mut publisher, b"dt/x", b"one, granted zero").await;
        let got = sub.read().await.expect("delivery");
        let (got_qos, _, body) = delivered(&got, v5);
        assert_eq!(
            (got_qos, &body[..]),
            (0, &b"one, granted zero"[..]),
            "v5 {v5}"
        );
    }
    assert_eq!(site.snapshot().router_rebuilds, 0);
    site.stop().await;
}

fn open_site(c: &mut sitegate::config::Config) {
    c.auth =
        toml::from_str::<sitegate::config::AuthConfig>(sitegate::edge::harness::OPEN_AUTH).unwrap();
}

/// Connects `device` with connect `flags` (0x02: Clean Start) and, on 5, a Session Expiry
/// Interval of `expiry` plus `more` properties; returns the client and CONNACK's Session
/// Present flag.
async fn join(
    site: &Site,
    device: &sitegate::identity::pki::IssuedDevice,
    v5: bool,
    flags: u8,
    expiry: u32,
    more: &[u8],
) -> (RawClient, bool) {
    let mut c = RawClient::tls(site, device).await;
    let mut props = raw::prop_u32(0x11, expiry);
    props.extend_from_slice(more);
    c.send(&raw::connect_with(&device.thing, v5, flags, &props))
        .await;
    let ack = c.read().await.expect("CONNACK");
    assert_eq!((ack.kind(), ack.body[1]), (2, 0), "{ack:?}");
    (c, ack.body[0] & 1 == 1)
}

/// DISCONNECT, normal, with v5 `props`; waits for the gateway to close.
async fn leave(mut c: RawClient, v5: bool, props: &[u8]) {
    let mut body = vec![0u8];
    if v5 {
        raw::varint(props.len(), &mut body);
        body.extend_from_slice(props);
    }
    c.send(&raw::packet(0xE0, if v5 { &body } else { &[] }))
        .await;
    assert!(c.closed().await);
}

/// `dev-b`'s subscription to its commands, `cmd/dev-b/#` (MQTT 5), taken by the router.
async fn on_commands(sub: &mut RawClient, publisher: &mut RawClient) {
    subscribed(sub, publisher, b"cmd/dev-b/#", b"cmd/dev-b/warm", true).await;
}

async fn publish_qos1(publisher: &mut RawClient, topic: &[u8], payload: &[u8]) {
    publish_acked(publisher, topic, false, payload).await;
}

/// A QoS 1 PUBLISH (v5), RETAIN as given, and its PUBACK.
async fn publish_acked(publisher: &mut RawClient, topic: &[u8], retain: bool, payload: &[u8]) {
    publisher
        .send(&raw::publish(topic, 1, retain, true, &[], payload))
        .await;
    let ack = publisher.read().await.expect("PUBACK");
    assert_eq!(ack.kind(), 4, "{ack:?}");
}

/// §3.1.2.11.2 and §3.1.2.4 (MQTT-3.1.2-4, -5, -6, -23; §3.14.2.2.2, MQTT-3.14.2-2): the
/// Session Expiry Interval, not Clean Start, decides how long a session outlives its
/// connection, and CONNACK's Session Present says whether one was resumed (§3.2.2.1.1).
/// - The IoT Core pattern: Clean Start 1 with expiry 3600, subscribe, leave; a QoS 1 message
///   published meanwhile is delivered when the device rejoins with Clean Start 0, with
///   Session Present 1 and no new SUBSCRIBE.
/// - Expiry 0 on a rejoin resumes the session (Session Present 1) and ends it at disconnect.
/// - A DISCONNECT's expiry replaces the CONNECT's: 0 ends the session; a session that had 0
///   cannot be given one (DISCONNECT 0x82).
/// - A session whose interval has passed is gone (and counted).
/// - Clean Start 1 discards what was kept.
/// - MQTT 3.1.1 (§3.1.2.4 of 3.1.1): Clean Session 0 keeps the session, 1 discards it.
#[tokio::test(flavor = "multi_thread")]
async fn s3_1_2_11_the_session_expiry_interval_decides_the_session_life() {
    let site = Site::start_with(open_site).await;
    let (a, b, c) = (
        site.device("dev-a").await,
        site.device("dev-b").await,
        site.device("dev-c").await,
    );
    let mut publisher = RawClient::connect(&site, &a, true).await;

    let (mut sub, present) = join(&site, &b, true, 0x02, 3600, &[]).await;
    assert!(!present, "nothing to resume yet");
    on_commands(&mut sub, &mut publisher).await;
    leave(sub, true, &[]).await;
    publish_qos1(&mut publisher, b"cmd/dev-b/1", b"queued while away").await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(
        present,
        "Clean Start 0 within the expiry resumes the session"
    );
    let (qos, pkid, body) = delivered(&sub.read().await.expect("the queued message"), true);
    assert_eq!((qos, &body[..]), (1, &b"queued while away"[..]));
    sub.send(&puback(pkid)).await;
    leave(sub, true, &[]).await;

    // Rejoined with expiry 0: resumed, then ended with the connection.
    let (sub, present) = join(&site, &b, true, 0x00, 0, &[]).await;
    assert!(present);
    leave(sub, true, &[]).await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(!present, "a session with expiry 0 ended at its disconnect");
    publish_qos1(&mut publisher, b"cmd/dev-b/2", b"nobody subscribed").await;
    assert!(sub.read_within(Duration::from_millis(500)).await.is_none());

    // A DISCONNECT with expiry 0 ends a session that was to last an hour.
    on_commands(&mut sub, &mut publisher).await;
    leave(sub, true, &raw::prop_u32(0x11, 0)).await;
    let (sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(!present, "the DISCONNECT's expiry replaced the CONNECT's");
    leave(sub, true, &[]).await;

    // MQTT-3.14.2-2: no expiry at CONNECT, one at DISCONNECT: a protocol error.
    let (mut sub, _) = join(&site, &b, true, 0x02, 0, &[]).await;
    let mut body = vec![0u8];
    let props = raw::prop_u32(0x11, 60);
    raw::varint(props.len(), &mut body);
    body.extend_from_slice(&props);
    sub.send(&raw::packet(0xE0, &body)).await;
    let bye = sub.read().await.expect("DISCONNECT");
    assert_eq!((bye.kind(), bye.reason()), (14, 0x82), "{bye:?}");
    assert!(sub.closed().await);

    // Expiry passes while the device is away.
    let expired_before = site.snapshot().sessions_expired;
    let (mut sub, _) = join(&site, &b, true, 0x02, 1, &[]).await;
    on_commands(&mut sub, &mut publisher).await;
    leave(sub, true, &[]).await;
    site.wait_for("the session to expire", |s| {
        s.sessions_expired > expired_before
    })
    .await;
    publish_qos1(&mut publisher, b"cmd/dev-b/3", b"after expiry").await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(!present, "an expired session is not resumed");
    assert!(sub.read_within(Duration::from_millis(500)).await.is_none());

    // Clean Start 1 discards a session that has not expired.
    on_commands(&mut sub, &mut publisher).await;
    leave(sub, true, &[]).await;
    let (sub, present) = join(&site, &b, true, 0x02, 3600, &[]).await;
    assert!(!present);
    leave(sub, true, &[]).await;
    publish_qos1(&mut publisher, b"cmd/dev-b/4", b"discarded").await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(present, "the clean start's own session was kept");
    assert!(
        sub.read_within(Duration::from_millis(500)).await.is_none(),
        "the discarded session's subscription is gone"
    );
    leave(sub, true, &[]).await;

    // MQTT 3.1.1: Clean Session 0 keeps the session, 1 discards it.
    let (mut sub, present) = join(&site, &c, false, 0x00, 0, &[]).await;
    assert!(!present);
    subscribed(
        &mut sub,
        &mut publisher,
        b"cmd/dev-c/#",
        b"cmd/dev-c/warm",
        false,
    )
    .await;
    leave(sub, false, &[]).await;
    publish_qos1(&mut publisher, b"cmd/dev-c/1", b"queued for 3.1.1").await;
    let (mut sub, present) = join(&site, &c, false, 0x00, 0, &[]).await;
    assert!(present);
    let (qos, pkid, body) = delivered(&sub.read().await.expect("the queued message"), false);
    assert_eq!((qos, &body[..]), (1, &b"queued for 3.1.1"[..]));
    sub.send(&puback(pkid)).await;
    leave(sub, false, &[]).await;
    let (sub, present) = join(&site, &c, false, 0x02, 0, &[]).await;
    assert!(!present);
    leave(sub, false, &[]).await;
    site.stop().await;
}

/// §3.3.4 (MQTT-3.3.4-9): the server never has more unacknowledged QoS 1 deliveries to a
/// client than its Receive Maximum (§3.1.2.11.3); the rest wait and follow, in order, as the
/// client acknowledges.
#[tokio::test(flavor = "multi_thread")]
async fn s3_3_4_receive_maximum_bounds_the_deliveries_in_flight() {
    let site = Site::start_with(open_site).await;
    let (mut publisher, mut sub, _) = joined(&site, 0, &raw::prop_u16(0x21, 2), &[b"dt/#"]).await;
    for i in 0..5u8 {
        publish_qos1(&mut publisher, b"dt/x", &[b'0' + i]).await;
    }
    let mut got = Vec::new();
    let mut unacked = std::collections::VecDeque::new();
    while got.len() < 5 {
        match sub.read_within(Duration::from_millis(700)).await {
            Some(reply) => {
                let (qos, pkid, body) = delivered(&reply, true);
                assert_eq!(qos, 1);
                got.push(body[0]);
                unacked.push_back(pkid);
                assert!(
                    unacked.len() <= 2,
                    "{} in flight over Receive Maximum 2",
                    unacked.len()
                );
            }
            None => {
                // Nothing more until the oldest is acknowledged.
                assert_eq!(unacked.len(), 2, "stalled with {got:?}");
                let pkid = unacked.pop_front().unwrap();
                sub.send(&puback(pkid)).await;
            }
        }
    }
    assert_eq!(got, b"01234");
    site.stop().await;
}

/// §3.1.2.11.4 (MQTT-3.1.2-24, -25): the server never sends a client a packet larger than the
/// client's Maximum Packet Size; such a delivery is discarded as if sent (and counted here),
/// and the deliveries after it flow on.
#[tokio::test(flavor = "multi_thread")]
async fn s3_1_2_11_4_no_packet_exceeds_the_client_maximum_packet_size() {
    let site = Site::start_with(open_site).await;
    let (mut publisher, mut sub, _) = joined(&site, 0, &raw::prop_u32(0x27, 128), &[b"dt/#"]).await;
    publish_qos1(&mut publisher, b"dt/x", &[b'x'; 300]).await;
    publish_qos1(&mut publisher, b"dt/x", b"small").await;
    publisher
        .send(&raw::publish(b"dt/x", 0, false, true, &[], &[b'y'; 200]))
        .await;
    publish_qos1(&mut publisher, b"dt/x", b"small again").await;
    let mut got = Vec::new();
    while let Some(reply) = sub.read_within(Duration::from_millis(700)).await {
        assert!(
            reply.body.len() < 128,
            "{} bytes delivered",
            reply.body.len()
        );
        let (qos, pkid, body) = delivered(&reply, true);
        if qos == 1 {
            sub.send(&puback(pkid)).await;
        }
        got.push(String::from_utf8(body).unwrap());
    }
    assert_eq!(got, ["small", "small again"]);
    assert_eq!(site.snapshot().deliveries_too_large, 2);
    site.stop().await;
}

/// §3.3.1.1 (MQTT-3.3.1-1): a QoS 1 message sent again because the client did not
/// acknowledge it before its connection ended goes out with DUP set, once the session
/// resumes (§4.4: on reconnect with Clean Start 0 the server resends unacknowledged PUBLISH
/// packets); a message never sent before has DUP clear. On 5 and on 3.1.1.
#[tokio::test(flavor = "multi_thread")]
async fn s3_3_1_1_a_redelivery_after_reconnect_sets_dup() {
    let site = Site::start_with(open_site).await;
    let (a, b) = (site.device("dev-a").await, site.device("dev-b").await);
    let mut publisher = RawClient::connect(&site, &a, true).await;
    for v5 in [true, false] {
        let (mut sub, _) = join(&site, &b, v5, 0x00, 3600, &[]).await;
        subscribed(&mut sub, &mut publisher, b"cmd/#", b"cmd/warm", v5).await;
        publish_qos1(&mut publisher, b"cmd/x", b"first").await;
        let first = sub.read().await.expect("delivery");
        assert_eq!(first.first & 0x08, 0, "a first delivery has DUP clear");
        // Gone without acknowledging it (the socket just closes).
        drop(sub);
        publish_qos1(&mut publisher, b"cmd/x", b"second").await;
        let (mut sub, present) = join(&site, &b, v5, 0x00, 3600, &[]).await;
        assert!(present);
        let again = sub.read().await.expect("redelivery");
        let (qos, pkid, body) = delivered(&again, v5);
        assert_eq!((qos, &body[..]), (1, &b"first"[..]));
        assert_eq!(again.first & 0x08, 0x08, "DUP on the redelivery: {again:?}");
        sub.send(&puback(pkid)).await;
        let next = sub.read().await.expect("the message queued meanwhile");
        let (_, pkid, body) = delivered(&next, v5);
        assert_eq!((&body[..], next.first & 0x08), (&b"second"[..], 0));
        sub.send(&puback(pkid)).await;
        leave(sub, v5, &raw::prop_u32(0x11, 0)).await;
        if !v5 {
            break;
        }
    }
    site.stop().await;
}

/// §3.3.2.3.5 and §3.3.2.3.6 (MQTT-3.3.2-15, -16: the server sends Response Topic and
/// Correlation Data unaltered), §3.3.2.3.7 (user properties in order, MQTT-3.3.2-17, -18),
/// §3.3.2.3.3 (the Message Expiry Interval goes out as what is left of it), and §3.2.2.3.14
/// (a keepalive of 0 is answered with the Server Keep Alive the gateway uses).
#[tokio::test(flavor = "multi_thread")]
async fn s3_3_2_3_request_response_properties_are_relayed_unchanged() {
    let site = Site::start_with(open_site).await;
    let (mut publisher, mut sub, b) = joined(&site, 0, &[], &[b"req/#"]).await;
    let mut props = Vec::new();
    props.push(0x08); // Response Topic
    props.extend_from_slice(&(11u16).to_be_bytes());
    props.extend_from_slice(b"res/dev-a/1");
    props.push(0x09); // Correlation Data
    props.extend_from_slice(&(4u16).to_be_bytes());
    props.extend_from_slice(&[0, 0xff, 7, 1]);
    for value in [&b"v1"[..], b"v2"] {
        props.push(0x26); // User Property
        for s in [&b"k"[..], value] {
            props.extend_from_slice(&(s.len() as u16).to_be_bytes());
            props.extend_from_slice(s);
        }
    }
    props.extend(raw::prop_u32(0x02, 600)); // Message Expiry Interval
    publisher
        .send(&raw::publish(b"req/x", 1, false, true, &props, b"ask"))
        .await;
    assert_eq!(publisher.read().await.expect("PUBACK").kind(), 4);
    let got = sub.read().await.expect("delivery");
    let body = &got.body;
    let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]])) + 2;
    let len = raw::read_varint(body, &mut at);
    let delivered_props = &body[at..at + len];
    let find = |needle: &[u8]| delivered_props.windows(needle.len()).any(|w| w == needle);
    assert!(find(&props[..14]), "response topic: {delivered_props:?}");
    assert!(
        find(&props[14..21]),
        "correlation data: {delivered_props:?}"
    );
    let users = &props[21..props.len() - 5];
    assert!(find(users), "user properties in order: {delivered_props:?}");
    let expiry_at = delivered_props
        .iter()
        .position(|&b| b == 0x02)
        .expect("message expiry");
    let left = u32::from_be_bytes(
        delivered_props[expiry_at + 1..expiry_at + 5]
            .try_into()
            .unwrap(),
    );
    assert!((590..=600).contains(&left), "expiry left {left}");
    assert!(
        !find(b"sitegate:"),
        "the gateway's own marks stay inside: {delivered_props:?}"
    );

    // Keepalive 0 asks the server to choose (§3.1.2.10); CONNACK names the choice.
    let mut c = RawClient::tls(&site, &b).await;
    let mut connect = raw::connect("dev-b", true, 0x02);
    let at = connect.len() - (2 + 5) - 1 - 2; // keepalive, before props (1) and client id
    connect[at] = 0;
    connect[at + 1] = 0;
    c.send(&connect).await;
    let ack = c.read().await.expect("CONNACK");
    assert_eq!(ack.kind(), 2);
    let keep = ack
        .body
        .windows(3)
        .find(|w| w[0] == 0x13)
        .map(|w| u16::from_be_bytes([w[1], w[2]]));
    assert_eq!(keep, Some(1200), "Server Keep Alive: {ack:?}");
    site.stop().await;
}

/// AWS's IoT Device SDK v2 for Python (`awsiotsdk` from PyPI, on awscrt) as the device, on
/// MQTT 3.1.1 and 5 (`tests/fixtures/sdk_device.py`): it connects with mutual TLS, subscribes
/// at QoS 1 (granted 1), gets its own QoS 0 and QoS 1 publishes back at QoS 0 and 1, leaves
/// with its session kept (3.1.1: Clean Session 0; 5: Clean Start 1 and a Session Expiry
/// Interval of 3600 s, the IoT Core way), and rejoins (Clean Start 0) to Session Present and
/// the QoS 1 command published while it was away, without subscribing again.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_iot_device_sdk_rejoins_its_persistent_session() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let site = Site::start_with(open_site).await;
    let a = site.device("dev-a").await;
    let mut publisher = RawClient::connect(&site, &a, true).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sdk_device.py");
    for (protocol, thing) in [("311", "dev-sdk3"), ("5", "dev-sdk5")] {
        let device = site.device(thing).await;
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .args(["--port", &site.addr.port().to_string()])
            .arg("--ca")
            .arg(&site.ca.ca_cert)
            .arg("--cert")
            .arg(&device.cert)
            .arg("--key")
            .arg(&device.key)
            .args(["--thing", thing, "--protocol", protocol])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let mut stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next = async || {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("the SDK device went quiet")
                .unwrap()
                .expect("the SDK device ended early (pip install awsiotsdk)");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_ne!(v["event"], "error", "MQTT {protocol}: {v}");
            v
        };
        let first = next().await;
        assert_eq!(first["event"], "connected", "{first}");
        let subscribed = next().await;
        assert_eq!(
            subscribed["granted"],
            serde_json::json!([1, 1]),
            "{subscribed}"
        );
        for qos in [0, 1] {
            let echo = next().await;
            assert_eq!(
                (&echo["published"], &echo["received"]),
                (&serde_json::json!(qos), &serde_json::json!(qos)),
                "MQTT {protocol}: {echo}"
            );
        }
        assert_eq!(next().await["event"], "away");
        let topic = format!("cmd/{thing}/reboot");
        publish_qos1(&mut publisher, topic.as_bytes(), b"queued while away").await;
        stdin.write_all(b"rejoin\n").await.unwrap();
        let rejoined = next().await;
        assert_eq!(
            (&rejoined["event"], &rejoined["session_present"]),
            (&serde_json::json!("connected"), &serde_json::json!(true)),
            "MQTT {protocol}: {rejoined}"
        );
        let queued = next().await;
        assert_eq!(
            (&queued["topic"], &queued["qos"], &queued["payload"]),
            (
                &serde_json::json!(topic),
                &serde_json::json!(1),
                &serde_json::json!("queued while away")
            ),
            "MQTT {protocol}: {queued}"
        );
        assert_eq!(next().await["event"], "done");
        assert!(child.wait().await.unwrap().success());
    }
    site.stop().await;
}

/// SUBSCRIBE with options byte `options` for one filter (v5); returns the SUBACK code.
async fn subscribe_with(sub: &mut RawClient, filter: &[u8], options: u8) -> u8 {
    sub.send(&raw::subscribe(7, &[(filter, options)], true, &[]))
        .await;
    let suback = sub.read().await.expect("SUBACK");
    suback.suback_codes(true)[0]
}

/// Reads deliveries until none comes for a while; acknowledges QoS 1 ones; returns (payload,
/// RETAIN flag, QoS, packet id) of each. PUBACKs for the client's own publishes are skipped.
async fn deliveries(sub: &mut RawClient) -> Vec<(String, bool, u8, u16)> {
    let mut got = Vec::new();
    while let Some(reply) = sub.read_within(Duration::from_millis(500)).await {
        if reply.kind() == 4 {
            continue;
        }
        let (qos, pkid, body) = delivered(&reply, true);
        if qos == 1 {
            sub.send(&puback(pkid)).await;
        }
        got.push((
            String::from_utf8(body).unwrap(),
            reply.first & 1 == 1,
            qos,
            pkid,
        ));
    }
    got
}

/// §3.8.3.1 Subscription Options, which rumqttd's router ignores and the session applies:
/// - Retain Handling 0 sends the matching retained messages at every SUBSCRIBE, a repeated
///   one included (MQTT-3.3.1-9, -10); 1 only when the subscription is new (MQTT-3.3.1-10);
///   2 never (MQTT-3.3.1-11). They go out with RETAIN 1 (MQTT-3.3.1-8) at the lower of their
///   QoS and the granted QoS, and their PUBACKs are taken.
/// - Retain As Published 0 forwards a live message with RETAIN 0 (MQTT-3.3.1-12), 1 with the
///   flag it was published with (MQTT-3.3.1-13).
/// - No Local keeps a client's own messages from that subscription (MQTT-3.8.3-3), but an
///   overlapping subscription without it still gets them.
#[tokio::test(flavor = "multi_thread")]
async fn s3_8_3_1_subscription_options_are_honoured() {
    let site = Site::start_with(open_site).await;
    let (a, b) = (site.device("dev-a").await, site.device("dev-b").await);
    let mut publisher = RawClient::connect(&site, &a, true).await;
    publish_acked(&mut publisher, b"st/a", true, b"r1").await;
    publisher
        .send(&raw::publish(b"st2/a", 0, true, true, &[], b"r2 at qos 0"))
        .await;
    publish_acked(&mut publisher, b"st3/a", true, b"r3").await;
    let (mut sub, _) = join(&site, &b, true, 0x02, 0, &[]).await;

    // Retain Handling 0, new and again.
    for round in ["new", "repeated"] {
        assert_eq!(subscribe_with(&mut sub, b"st/#", 0x01).await, 1);
        let got = deliveries(&mut sub).await;
        assert_eq!(got.len(), 1, "{round}: {got:?}");
        let (payload, retain, qos, pkid) = &got[0];
        assert_eq!((&payload[..], *retain, *qos), ("r1", true, 1), "{round}");
        assert!(*pkid > 100, "the session's own packet id: {pkid}");
    }
    // Retain Handling 1: nothing for an existing subscription, the retained for a new one,
    // at the lower QoS.
    assert_eq!(subscribe_with(&mut sub, b"st/#", 0x01 | 0x10).await, 1);
    assert_eq!(deliveries(&mut sub).await, []);
    assert_eq!(subscribe_with(&mut sub, b"st2/#", 0x01 | 0x10).await, 1);
    let got = deliveries(&mut sub).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (&got[0].0[..], got[0].1, got[0].2),
        ("r2 at qos 0", true, 0)
    );
    // Retain Handling 2: never.
    assert_eq!(subscribe_with(&mut sub, b"st3/#", 0x01 | 0x20).await, 1);
    assert_eq!(deliveries(&mut sub).await, []);

    // Retain As Published: a live retained publish reaches `st3/#` (0) with RETAIN 0 ...
    routed(&mut sub, &mut publisher, b"st3/warm", true).await;
    publish_acked(&mut publisher, b"st3/a", true, b"live").await;
    let got = deliveries(&mut sub).await;
    assert_eq!(
        got.iter().map(|g| (&g.0[..], g.1)).collect::<Vec<_>>(),
        [("live", false)]
    );
    // ... and with RETAIN 1 once the subscription asks for Retain As Published.
    assert_eq!(
        subscribe_with(&mut sub, b"st3/#", 0x01 | 0x08 | 0x20).await,
        1
    );
    publish_acked(&mut publisher, b"st3/a", true, b"live again").await;
    let got = deliveries(&mut sub).await;
    assert_eq!(
        got.iter().map(|g| (&g.0[..], g.1)).collect::<Vec<_>>(),
        [("live again", true)]
    );

    // No Local: the device's own publish does not come back on `echo/#` ...
    assert_eq!(subscribe_with(&mut sub, b"echo/#", 0x01 | 0x04).await, 1);
    routed(&mut sub, &mut publisher, b"echo/warm", true).await;
    sub.send(&raw::publish(b"echo/x", 1, false, true, &[], b"mine"))
        .await;
    publish_qos1(&mut publisher, b"echo/x", b"theirs").await;
    let got = deliveries(&mut sub).await;
    let payloads: Vec<&str> = got.iter().map(|g| &g.0[..]).collect();
    assert_eq!(payloads, ["theirs"], "{got:?}");
    // ... unless another of its subscriptions matches without No Local.
    assert_eq!(subscribe_with(&mut sub, b"echo/+", 0x01).await, 1);
    let mut took = false;
    for _ in 0..50 {
        sub.send(&raw::publish(b"echo/x", 0, false, true, &[], b"mine again"))
            .await;
        if let Some(reply) = sub.read_within(Duration::from_millis(200)).await {
            let (qos, pkid, body) = delivered(&reply, true);
            if qos == 1 {
                sub.send(&puback(pkid)).await;
            }
            assert_eq!(body, b"mine again");
            took = true;
            break;
        }
    }
    assert!(
        took,
        "an overlapping subscription without No Local gets the device's own messages"
    );
    site.stop().await;
}

/// The MQTT 5 issue's item 2, on §3.1.2.11.2 (the server keeps the session state for the
/// Session Expiry Interval) and §4.1 (the session state includes subscriptions and QoS 1
/// messages queued for the client): a session that has not expired survives a restart of the
/// gateway, its subscriptions and the QoS 1 messages queued before the stop and after the
/// start both delivered when its device rejoins; its expiry counts the time the gateway was
/// down (a session of 2 s is gone after a 3 s stop); nothing of the queued payloads or of the
/// subscriptions is in the data directory in the clear.
#[tokio::test(flavor = "multi_thread")]
async fn s3_1_2_11_persistent_sessions_survive_a_restart() {
    let mut site = Site::start_with(open_site).await;
    let (a, b, c) = (
        site.device("dev-a").await,
        site.device("dev-b").await,
        site.device("dev-c").await,
    );
    let mut publisher = RawClient::connect(&site, &a, true).await;
    let (mut sub, _) = join(&site, &b, true, 0x02, 3600, &[]).await;
    subscribed(
        &mut sub,
        &mut publisher,
        b"cmd/dev-b/secret-filter/#",
        b"cmd/dev-b/secret-filter/warm",
        true,
    )
    .await;
    leave(sub, true, &[]).await;
    let (mut short, _) = join(&site, &c, true, 0x02, 2, &[]).await;
    subscribed(
        &mut short,
        &mut publisher,
        b"cmd/dev-c/#",
        b"cmd/dev-c/warm",
        true,
    )
    .await;
    leave(short, true, &[]).await;
    publish_qos1(
        &mut publisher,
        b"cmd/dev-b/secret-filter/1",
        b"queued before the stop",
    )
    .await;
    drop(publisher);

    site.halt().await;
    for needle in [&b"queued before the stop"[..], b"secret-filter"] {
        let hits = super::common::files_containing(&site.config.data_dir, needle);
        assert!(
            hits.is_empty(),
            "{:?} in the clear in {hits:?}",
            String::from_utf8_lossy(needle)
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    site.restart(|_| {}).await;
    let s = site.snapshot();
    assert_eq!((s.sessions_restored, s.sessions_expired), (1, 1), "{s:?}");

    let mut publisher = RawClient::connect(&site, &a, true).await;
    publish_qos1(
        &mut publisher,
        b"cmd/dev-b/secret-filter/2",
        b"queued after the start",
    )
    .await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(present, "the session came back with the gateway");
    let got = deliveries(&mut sub).await;
    let got: Vec<(&str, u8)> = got.iter().map(|g| (&g.0[..], g.2)).collect();
    assert_eq!(
        got,
        [("queued before the stop", 1), ("queued after the start", 1)]
    );
    leave(sub, true, &[]).await;
    let (sub, present) = join(&site, &c, true, 0x00, 3600, &[]).await;
    assert!(
        !present,
        "the 2 s session expired while the gateway was down"
    );
    leave(sub, true, &[]).await;

    // `listener.max_session_messages`: of two messages for an away session one is queued,
    // the first; the other is counted dropped as it is published.
    site.restart(|c| c.listener.max_session_messages = 1).await;
    let mut publisher = RawClient::connect(&site, &a, true).await;
    publish_qos1(&mut publisher, b"cmd/dev-b/secret-filter/3", b"kept").await;
    publish_qos1(
        &mut publisher,
        b"cmd/dev-b/secret-filter/4",
        b"over the limit",
    )
    .await;
    drop(publisher);
    let s = site.snapshot();
    assert_eq!(
        (s.session_messages_saved, s.session_messages_dropped),
        (1, 1),
        "{s:?}"
    );
    site.restart(|_| {}).await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(present);
    let got = deliveries(&mut sub).await;
    let got: Vec<&str> = got.iter().map(|g| &g.0[..]).collect();
    assert_eq!(got, ["kept"]);
    site.stop().await;
}

/// `dev-b` joins (MQTT 5, Clean Start, Session Expiry `expiry`, more CONNECT `props`) and
/// subscribes `filters` (each `<prefix>/#`, its router warmed through `<prefix>/warm`);
/// returns a connected publisher (`dev-a`), `dev-b`'s client and its credentials.
async fn joined(
    site: &Site,
    expiry: u32,
    props: &[u8],
    filters: &[&[u8]],
) -> (RawClient, RawClient, sitegate::identity::pki::IssuedDevice) {
    let (a, b) = (site.device("dev-a").await, site.device("dev-b").await);
    let mut publisher = RawClient::connect(site, &a, true).await;
    let (mut sub, _) = join(site, &b, true, 0x02, expiry, props).await;
    for filter in filters {
        let mut warm = filter[..filter.len() - 1].to_vec();
        warm.extend_from_slice(b"warm");
        subscribed(&mut sub, &mut publisher, filter, &warm, true).await;
    }
    (publisher, sub, b)
}

/// [`joined`] with a session of 3600 s, then `dev-b` leaves.
async fn away(
    site: &Site,
    filters: &[&[u8]],
) -> (RawClient, sitegate::identity::pki::IssuedDevice) {
    let (publisher, sub, b) = joined(site, 3600, &[], filters).await;
    leave(sub, true, &[]).await;
    (publisher, b)
}

/// §3.3.2.3.3 Message Expiry Interval for a message queued while its device is away: one
/// whose interval passed before the device was back is not delivered (MQTT-3.3.2-5, and
/// counted), and the others go out with the interval less the time they waited
/// (MQTT-3.3.2-6).
#[tokio::test(flavor = "multi_thread")]
async fn s3_3_2_3_3_a_queued_message_expires_and_its_wait_counts() {
    let site = Site::start_with(open_site).await;
    let (mut publisher, b) = away(&site, &[b"cmd/dev-b/#"]).await;
    for (payload, expiry) in [(&b"short"[..], 1u32), (b"long", 600)] {
        let props = raw::prop_u32(0x02, expiry);
        publisher
            .send(&raw::publish(
                b"cmd/dev-b/x",
                1,
                false,
                true,
                &props,
                payload,
            ))
            .await;
        assert_eq!(publisher.read().await.expect("PUBACK").kind(), 4);
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(present);
    let got = sub.read().await.expect("the long-lived message");
    let (qos, pkid, payload) = delivered(&got, true);
    assert_eq!((qos, &payload[..]), (1, &b"long"[..]));
    sub.send(&puback(pkid)).await;
    let body = &got.body;
    let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]])) + 2;
    let len = raw::read_varint(body, &mut at);
    let props = &body[at..at + len];
    assert_eq!(props.first(), Some(&0x02), "{props:?}");
    let left = u32::from_be_bytes(props[1..5].try_into().unwrap());
    assert!(
        (590..=598).contains(&left),
        "expiry left {left} after a 2 s wait"
    );
    assert!(sub.read_within(Duration::from_millis(500)).await.is_none());
    assert_eq!(site.snapshot().session_messages_expired, 1);
    site.stop().await;
}

/// §4.1 with the least-privilege rule on every delivery: a grant that shrank while the device
/// was away (here the site's policy, changed over a restart) also stops the messages queued
/// for the subscriptions it no longer allows; those it still allows are delivered.
#[tokio::test(flavor = "multi_thread")]
async fn s4_1_a_queued_message_for_a_subscription_no_longer_allowed_is_not_delivered() {
    let mut site = Site::start_with(open_site).await;
    let (mut publisher, b) = away(&site, &[b"cmd/dev-b/#", b"cfg/dev-b/#"]).await;
    publish_qos1(&mut publisher, b"cfg/dev-b/1", b"no longer allowed").await;
    publish_qos1(&mut publisher, b"cmd/dev-b/1", b"still allowed").await;
    drop(publisher);
    site.restart(|c| {
        c.auth = toml::from_str(&sitegate::edge::harness::OPEN_AUTH.replace(
            r#""mqtt:topicfilter:*""#,
            r#""mqtt:topicfilter:cmd/${iot:Connection.Thing.ThingName}/#""#,
        ))
        .unwrap();
    })
    .await;
    let (mut sub, present) = join(&site, &b, true, 0x00, 3600, &[]).await;
    assert!(present);
    let got = deliveries(&mut sub).await;
    let got: Vec<&str> = got.iter().map(|g| &g.0[..]).collect();
    assert_eq!(got, ["still allowed"]);
    site.stop().await;
}
