//! One approved device against everyone else: hostile topics, filters and packets, each sent
//! to the running gateway by a real client (mosquitto) or as raw bytes over mutual TLS where no
//! client will send them. Each test names the MQTT rule or finding it checks.

use std::time::Duration;

use super::common::raw::{self, RawClient};
use super::common::*;
use sitegate::config::AuthConfig;

/// Devices `dev-*` may publish anywhere, and subscribe under their own name at the second level
/// or to `+/alerts`: enough rope for every attack below.
const OPEN_AUTH: &str = r#"
[device_groups.devs]
selection_rule = "thingName: dev-*"
policy = "open"

[policies.open.connect]
operations = ["mqtt:connect"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}"]

[policies.open.publish]
operations = ["mqtt:publish"]
resources = ["mqtt:topic:*"]

[policies.open.subscribe]
operations = ["mqtt:subscribe"]
resources = ["mqtt:topicfilter:+/${iot:Connection.Thing.ThingName}/#", "mqtt:topicfilter:+/alerts", "mqtt:topicfilter:${iot:Connection.Thing.ThingName}/#"]
"#;

async fn open_site(adjust: impl FnOnce(&mut sitegate::config::Config)) -> Site {
    Site::start_with(|c| {
        c.auth = toml::from_str::<AuthConfig>(OPEN_AUTH).unwrap();
        adjust(c);
    })
    .await
}

use super::publish_until_received as until_received;

/// Finding 1: `é/dev-b/x` (a first character wider than a byte) used to panic rumqttd's router
/// thread, after which nothing was delivered. Now it is delivered like any topic, and the
/// router lives on (no rebuild was needed).
#[tokio::test(flavor = "multi_thread")]
async fn a_non_ascii_first_character_is_delivered_and_the_router_lives() {
    let site = open_site(|_| {}).await;
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    let sub = site.subscribe(&b, "+/dev-b/#", true, &["-C", "1"]);
    let got = until_received(&site, sub, &a, "é/dev-b/x", "hello").await;
    assert!(got.contains("é/dev-b/x hello"), "{got:?}");
    // Later subscriptions and publishes still work.
    let sub = site.subscribe(&b, "dev-b/#", false, &["-C", "1"]);
    let got = until_received(&site, sub, &a, "dev-b/after", "still").await;
    assert!(got.contains("dev-b/after still"), "{got:?}");
    assert_eq!(site.snapshot().router_rebuilds, 0);
    site.stop().await;
}

/// Finding 1, the republish path: a topic template filled from a device's field
/// (`${zone}/alerts`, `{"zone":"été"}`) is checked like a device's topic and delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_republished_topic_from_a_device_field_is_checked_and_delivered() {
    let site = open_site(|c| {
        c.sinks.insert(
            "local".into(),
            toml::from_str("type = \"republish\"\ntopic = \"${zone}/alerts\"").unwrap(),
        );
        c.routes.insert(
            "zones".into(),
            sitegate::config::RouteConfig {
                from: "zone/#".into(),
                to: "local".into(),
            },
        );
    })
    .await;
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    let sub = site.subscribe(&b, "+/alerts", true, &["-C", "1"]);
    let got = until_received(&site, sub, &a, "zone/x", r#"{"zone":"été"}"#).await;
    assert!(got.contains("été/alerts"), "{got:?}");
    assert_eq!(site.snapshot().router_rebuilds, 0);
    site.stop().await;
}

/// Finding 2: a Subscription Identifier (MQTT-3.3.4-6) or a topic alias (0 and 65535; none
/// are offered, MQTT-3.3.2-8) in a PUBLISH closes that connection with the right reason, and
/// publish-only devices (the router's shared link) are still delivered afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_v5_publish_properties_cost_only_their_connection() {
    let site = open_site(|_| {}).await;
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    let c = site.device("dev-c").await;
    // The subscriber links first, so publishes go to the router.
    let sub = site.subscribe(&b, "+/dev-b/#", true, &["-C", "2"]);
    let first = until_received(&site, sub, &c, "x/dev-b/before", "1").await;
    assert!(first.contains("x/dev-b/before"), "{first:?}");
    for (props, reason) in [
        (&[0x0b, 0x01][..], 0x82),       // Subscription Identifier 1
        (&[0x23, 0x00, 0x00][..], 0x94), // Topic Alias 0
        (&[0x23, 0xff, 0xff][..], 0x94), // Topic Alias 65535
    ] {
        let mut raw = RawClient::connect(&site, &a, true).await;
        raw.send(&raw::publish(b"x/dev-b/bad", 1, false, true, props, b"x"))
            .await;
        let reply = raw.read().await.expect("a DISCONNECT");
        assert_eq!((reply.kind(), reply.reason()), (14, reason), "{reply:?}");
        assert!(raw.closed().await);
    }
    let sub = site.subscribe(&b, "+/dev-b/#", true, &["-C", "1"]);
    let after = until_received(&site, sub, &c, "x/dev-b/after", "2").await;
    assert!(after.contains("x/dev-b/after 2"), "{after:?}");
    assert_eq!(site.snapshot().protocol_errors, 3);
    site.stop().await;
}

/// Finding 3: `$share/dev-b/#` matched `+/dev-b/#` as text while the router read it as `#`.
/// It is refused with 0x9E (MQTT 5) / 0x80 (3.1.1), and nothing reaches that connection.
#[tokio::test(flavor = "multi_thread")]
async fn shared_subscriptions_are_refused_and_receive_nothing() {
    let site = open_site(|_| {}).await;
    let a = site.device("dev-a").await;
    let b = site.device("dev-b").await;
    for v5 in [true, false] {
        let mut raw = RawClient::connect(&site, &b, v5).await;
        raw.send(&raw::subscribe(7, &[(b"$share/dev-b/#", 1)], v5, &[]))
            .await;
        let ack = raw.read().await.expect("SUBACK");
        assert_eq!(ack.suback_codes(v5), vec![if v5 { 0x9e } else { 0x80 }]);
        let out = site.publish(&a, "x/dev-a/secret", "s", 1, true).await;
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            raw.read_within(Duration::from_secs(1)).await.is_none(),
            "a refused $share filter received a message"
        );
    }
    assert_eq!(site.snapshot().shared_subscriptions_refused, 2);
    site.stop().await;
}

/// Finding 4, the limits: topic bytes and levels (PUBACK 0x90), filters per SUBSCRIBE and
/// subscriptions per connection (SUBACK 0x97), retained messages per site (PUBACK 0x97).
#[tokio::test(flavor = "multi_thread")]
async fn topic_subscription_and_retained_limits_answer_with_their_codes() {
    let site = open_site(|c| {
        c.listener.max_subscriptions = 10;
        c.listener.max_retained_messages = 2;
    })
    .await;
    let a = site.device("dev-a").await;
    let mut raw = RawClient::connect(&site, &a, true).await;
    let long = format!("dev-a/{}", "x".repeat(251));
    assert_eq!(long.len(), 257);
    for topic in [long.as_str(), "dev-a/1/2/3/4/5/6/7/8"] {
        raw.send(&raw::publish(topic.as_bytes(), 1, false, true, &[], b"x"))
            .await;
        let ack = raw.read().await.expect("PUBACK");
        assert_eq!((ack.kind(), ack.reason()), (4, 0x90), "{topic}: {ack:?}");
    }
    let nine: Vec<String> = (0..9).map(|i| format!("dev-a/f{i}")).collect();
    let filters: Vec<(&[u8], u8)> = nine.iter().map(|f| (f.as_bytes(), 1)).collect();
    raw.send(&raw::subscribe(1, &filters, true, &[])).await;
    let codes = raw.read().await.expect("SUBACK").suback_codes(true);
    assert_eq!(codes, [vec![1; 8], vec![0x97]].concat());
    let three: Vec<String> = (10..13).map(|i| format!("dev-a/f{i}")).collect();
    let filters: Vec<(&[u8], u8)> = three.iter().map(|f| (f.as_bytes(), 0)).collect();
    raw.send(&raw::subscribe(2, &filters, true, &[])).await;
    let codes = raw.read().await.expect("SUBACK").suback_codes(true);
    assert_eq!(codes, vec![0, 0, 0x97]);
    for (i, want) in [(1, 0), (2, 0), (3, 0x97)] {
        let topic = format!("dev-a/retained/{i}");
        raw.send(&raw::publish(topic.as_bytes(), 1, true, true, &[], b"r"))
            .await;
        // Deliveries of our own subscriptions may come first.
        let ack = loop {
            let r = raw.read().await.expect("PUBACK");
            if r.kind() == 4 {
                break r;
            }
        };
        assert_eq!(ack.reason(), want, "retained {i}: {ack:?}");
    }
    let s = site.snapshot();
    assert_eq!((s.topics_too_long, s.topics_too_deep), (1, 1));
    assert_eq!(s.subscribe_quota_refused, 2);
    assert_eq!(s.retained_quota_refused, 1);
    site.stop().await;
}

/// Finding 9 and MQTT §1.5.4: U+0000 (and control characters) in a topic are a malformed
/// packet: DISCONNECT 0x81 on MQTT 5, the connection closed on 3.1.1; nothing is relayed.
#[tokio::test(flavor = "multi_thread")]
async fn nul_and_control_characters_in_topics_are_malformed() {
    let site = open_site(|_| {}).await;
    let a = site.device("dev-a").await;
    for (topic, v5) in [
        (&b"dev-a/a\0b"[..], true),
        (b"dev-a/\x1b[2J", true),
        (b"dev-a/a\0b", false),
    ] {
        let mut raw = RawClient::connect(&site, &a, v5).await;
        raw.send(&raw::publish(topic, 1, false, v5, &[], b"x"))
            .await;
        if v5 {
            let reply = raw.read().await.expect("DISCONNECT");
            assert_eq!((reply.kind(), reply.reason()), (14, 0x81), "{reply:?}");
        }
        assert!(raw.closed().await);
    }
    let mut raw = RawClient::connect(&site, &a, true).await;
    raw.send(&raw::subscribe(1, &[(b"dev-a/\0", 0)], true, &[]))
        .await;
    let reply = raw.read().await.expect("DISCONNECT");
    assert_eq!((reply.kind(), reply.reason()), (14, 0x81), "{reply:?}");
    let s = site.snapshot();
    assert_eq!(s.messages_in_qos1, 0);
    assert_eq!(s.protocol_errors, 4);
    site.stop().await;
}

/// Finding 11: bad CONNECT and SUBSCRIBE flags (MQTT-3.1.2-3, -13, MQTT-3.8.1-1, MQTT-3-8.3-4)
/// and a first packet announcing 268 MB close the connection at once, long before the
/// CONNECT deadline (set to a minute here).
#[tokio::test(flavor = "multi_thread")]
async fn reserved_flags_and_huge_announcements_close_at_once() {
    let site = open_site(|c| c.listener.connect_timeout_ms = 60_000).await;
    let a = site.device("dev-a").await;
    let huge = [0x10u8, 0xff, 0xff, 0xff, 0x7f];
    for bytes in [
        raw::connect("dev-a", false, 0x03),        // reserved bit
        raw::connect("dev-a", true, 0x02 | 0x20),  // will retain without a will
        raw::connect("dev-a", false, 0x02 | 0x40), // 3.1.1 password without user name
        huge.to_vec(),
    ] {
        let mut raw = RawClient::tls(&site, &a).await;
        raw.send(&bytes).await;
        assert!(raw.closed().await, "{bytes:02x?} kept open");
    }
    for first in [0x80u8, 0x8a] {
        let mut raw = RawClient::connect(&site, &a, true).await;
        let mut sub = raw::subscribe(1, &[(b"dev-a/x", 0)], true, &[]);
        sub[0] = first;
        raw.send(&sub).await;
        assert!(raw.closed().await);
    }
    let mut raw = RawClient::connect(&site, &a, false).await;
    raw.send(&raw::subscribe(1, &[(b"dev-a/x", 0b0000_0100)], false, &[]))
        .await;
    assert!(raw.closed().await);
    assert_eq!(site.snapshot().connections_accepted, 3);
    site.stop().await;
}

/// `n` TCP connections to `addr` from 127.0.0.2 that never send a byte.
async fn silent_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut hogs = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        hogs.push(socket.connect(addr).await.unwrap());
    }
    hogs
}

/// Finding 6: sockets that never finish a handshake used to take `max_connections`. With
/// their own budget (and a per-address cap), devices still get in.
#[tokio::test(flavor = "multi_thread")]
async fn half_open_handshakes_cannot_lock_devices_out() {
    let site = open_site(|c| {
        c.listener.max_connections = 4;
        c.listener.max_pending_connections = 16;
        c.listener.max_pending_per_address = 4;
        c.listener.handshake_timeout_ms = 60_000;
    })
    .await;
    let a = site.device("dev-a").await;
    // Ten silent sockets from another loopback address.
    let hogs = silent_sockets(site.addr, 10).await;
    site.wait_for("the per-address cap", |s| s.pending_over_limit >= 6)
        .await;
    for i in 0..3 {
        let out = site.publish(&a, "dev-a/t", &i.to_string(), 1, true).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(site.snapshot().connections_over_limit, 0);
    drop(hogs);
    site.stop().await;
}

/// A device that comes while every handshake place is taken waits in the accept queue until
/// one frees, rather than being closed: closed, each device of a reconnect storm backs off
/// and the fleet comes back at the pace of its back-off (README, "Reconnect storm").
#[tokio::test(flavor = "multi_thread")]
async fn a_device_waits_for_a_handshake_place_rather_than_being_closed() {
    let site = open_site(|c| {
        c.listener.max_pending_connections = 2;
        c.listener.max_pending_per_address = 2;
        c.listener.handshake_timeout_ms = 1_500;
    })
    .await;
    let a = site.device("dev-a").await;
    // Two silent sockets from another loopback address take both places.
    let hogs = silent_sockets(site.addr, 2).await;
    site.wait_for("both places taken", |s| s.handshakes_pending == 2)
        .await;
    let out = site.publish(&a, "dev-a/t", "1", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));
    let s = site.snapshot();
    // It got in only after the silent sockets' handshake time ran out.
    assert_eq!(s.handshakes_failed, 2);
    assert_eq!(s.pending_over_limit, 0);
    assert_eq!(s.handshakes_pending, 0);
    drop(hogs);
    site.stop().await;
}

/// Finding 8: data_dir is created 0700, so other local users cannot read the device list.
#[tokio::test(flavor = "multi_thread")]
async fn data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let site = open_site(|_| {}).await;
    let mode = std::fs::metadata(&site.config.data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    site.stop().await;
}

/// Finding 10: a certificate whose subject holds two CNs names no single thing; which one a
/// reader takes is a guess, so the connection is refused after the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_with_two_common_names_is_refused() {
    let site = open_site(|_| {}).await;
    site.approve("dev-a", &[]).await;
    let dir = site.dir.path().join("twocn");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k.pem");
    let csr = dir.join("r.csr");
    let cert = dir.join("c.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |x: &std::path::Path| x.to_str().unwrap().to_owned();
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p(&key),
        "-subj",
        "/CN=dev-a/CN=dev-b",
        "-out",
        &p(&csr),
    ]);
    // A v3 certificate with the extensions a device certificate has.
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&site.ca.ca_cert),
        "-CAkey",
        &p(&site.ca.ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    let creds =
        sitegate::fleet::DeviceCredentials::load("dev-a", &site.ca.ca_cert, &cert, &key).unwrap();
    let mut raw = RawClient::tls_to(site.addr, &creds).await;
    raw.send(&raw::connect("dev-a", true, 0x02)).await;
    assert!(raw.closed().await, "a two-CN certificate was served");
    site.wait_for("the refusal", |s| s.handshakes_failed == 1)
        .await;
    assert_eq!(site.snapshot().connections_accepted, 0);
    site.stop().await;
}
