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
