//! MQTT conformance of the running gateway, one test per item of the MQTT 5 issue done so far,
//! each named after the section of the MQTT 5 standard (OASIS, 7 March 2019) it checks, with
//! raw packets over mutual TLS where no client will send the packet. Items refused on purpose
//! (topic aliases, subscription identifiers, shared subscriptions) are checked in
//! `edge::hostile`.

use super::common::raw::{self, RawClient};
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

/// §3.8.4 (MQTT-3.8.4-8): a message is delivered at the minimum of the QoS it was published
/// with and the QoS granted to the subscription. A QoS 0 publish reaches a QoS 1 subscriber as
/// QoS 0 (it used to arrive as QoS 1), a QoS 1 publish as QoS 1, on 3.1.1 and 5; and the
/// deliveries after a lowered one keep flowing (the router's acknowledgements stay in order).
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
        sub.send(&raw::subscribe(1, &[(b"dt/#", 1)], v5, &[])).await;
        let suback = sub.read().await.expect("SUBACK");
        assert_eq!(suback.suback_codes(v5), [1]);
        // The SUBACK comes from the session; the router may take the filter a moment later.
        let mut warm = None;
        for _ in 0..50 {
            publisher
                .send(&raw::publish(b"dt/warm", 1, false, true, &[], b"warm"))
                .await;
            assert_eq!(publisher.read().await.expect("PUBACK").kind(), 4);
            warm = sub.read_within(std::time::Duration::from_millis(200)).await;
            if warm.is_some() {
                break;
            }
        }
        let (_, pkid, _) = delivered(&warm.expect("the subscription never took effect"), v5);
        sub.send(&raw::packet(0x40, &pkid.to_be_bytes())).await;
        // Warm-ups still on their way.
        while let Some(late) = sub.read_within(std::time::Duration::from_millis(300)).await {
            let (_, pkid, _) = delivered(&late, v5);
            sub.send(&raw::packet(0x40, &pkid.to_be_bytes())).await;
        }
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
    }
    assert_eq!(site.snapshot().router_rebuilds, 0);
    site.stop().await;
}
