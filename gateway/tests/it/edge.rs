//! The device edge end to end: a gateway on 127.0.0.1:0, real certificates, and Debian's
//! mosquitto clients (plus rumqttc where a test needs a connection held open in code).

use crate::common;
pub(crate) mod enroll;
mod hostile;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use sitegate::auth::DeviceState;
use sitegate::identity::pki;
use sitegate::ops::admin::{AdminRequest, AdminResponse};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const SUB_WAIT: Duration = Duration::from_secs(15);

/// Publishes until the subscriber has it (its SUBSCRIBE may still be in flight), then returns
/// what the subscriber printed.
pub(crate) async fn publish_until_received(
    site: &Site,
    sub: tokio::process::Child,
    dev: &pki::IssuedDevice,
    topic: &str,
    msg: &str,
) -> String {
    let mut sub = sub;
    for _ in 0..40 {
        let out = site.publish(dev, topic, msg, 1, true).await;
        assert!(out.status.success(), "{}", text(&out));
        if tokio::time::timeout(Duration::from_millis(250), sub.wait())
            .await
            .is_ok()
        {
            break;
        }
    }
    collect(sub, SUB_WAIT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn approved_device_publishes_and_subscribed_peer_receives() {
    let site = Site::start().await;
    let controller = site.device("controller-1").await;
    let pump = site.device("pump-1").await;
    let sub = site.subscribe(&pump, "cmd/pump-1/#", false, &["-C", "1"]);
    let got = publish_until_received(&site, sub, &controller, "cmd/pump-1/start", "go").await;
    assert!(
        got.contains("cmd/pump-1/start go"),
        "subscriber got {got:?}"
    );
    assert!(site.snapshot().messages_out >= 1);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_outside_a_policy_are_denied_and_counted() {
    let site = Site::start().await;
    let sensor = site.device("sensor-1").await;
    // MQTT 5: a denied QoS 1 PUBLISH gets PUBACK "not authorized".
    let out = site
        .publish(&sensor, "dt/sensor-2/temp", "21", 1, true)
        .await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    // MQTT 3.1.1 cannot say so: acknowledged and dropped, and counted.
    let before = site.snapshot().publishes_denied;
    let out = site
        .publish(&sensor, "cmd/pump-1/start", "x", 1, false)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(site.snapshot().publishes_denied, before + 1);
    // A SUBSCRIBE outside the policy gets the failure code for that filter.
    let sub = site.subscribe(&sensor, "dt/#", true, &["-W", "5"]);
    let out = sub.wait_with_output().await.unwrap();
    assert!(
        text(&out).contains("All subscription requests were denied"),
        "{}",
        text(&out)
    );
    assert!(site.snapshot().subscriptions_denied >= 1);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_device_may_use_only_its_provisioning_topic() {
    let site = Site::start().await;
    let door = site.issue("door-1");
    let monitor = site.device("monitor-1").await;

    let out = site
        .publish(
            &door,
            "$sitegate/provisioning/door-1",
            "{\"hello\":1}",
            1,
            true,
        )
        .await;
    assert!(
        out.status.success() && !text(&out).contains("failed"),
        "{}",
        text(&out)
    );
    let out = site
        .publish(&door, "$sitegate/provisioning/door-2", "x", 1, true)
        .await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    // Its own telemetry topic is in the sensors group's policy, but it is not approved yet.
    let out = site
        .publish(&door, "dt/door-1/state", "open", 1, true)
        .await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    let sub = site.subscribe(&door, "dt/door-1/#", true, &["-W", "5"]);
    let out = sub.wait_with_output().await.unwrap();
    assert!(text(&out).contains("denied"), "{}", text(&out));

    match site.admin(AdminRequest::List).await {
        AdminResponse::Devices { devices } => {
            let d = devices.iter().find(|d| d.thing == "door-1").unwrap();
            assert_eq!(d.state, DeviceState::Pending);
            assert_eq!(d.groups, vec!["provisioning"]);
            let certs: Vec<_> = d.certs.iter().map(|c| (c.id.as_str(), c.state)).collect();
            assert_eq!(certs, vec![(door.cert_id.as_str(), DeviceState::Pending)]);
        }
        other => panic!("{other:?}"),
    }
    // The approved monitor never saw the pending device's attempt.
    let sub = site.subscribe(&monitor, "dt/#", true, &["-W", "2"]);
    assert!(!collect(sub, Duration::from_secs(4)).await.contains("open"));
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_applies_to_the_live_connection() {
    let site = Site::start().await;
    let door = site.issue("door-1");
    let monitor = site.device("monitor-1").await;
    let sub = site.subscribe(&monitor, "dt/door-1/#", true, &["-C", "1"]);

    // One mosquitto_pub connection, fed line by line.
    let (mut publisher, mut stdin) = site.line_publisher(&door, "dt/door-1/state");
    stdin.write_all(b"before-approval\n").await.unwrap();
    site.wait_for("the pending publish to be denied", |s| {
        s.publishes_denied >= 1
    })
    .await;
    let accepted = site.snapshot().connections_accepted;

    site.approve("door-1", &[]).await;
    // Resend until the monitor has it: the monitor's own SUBSCRIBE may still be in flight.
    let mut sub = sub;
    for _ in 0..40 {
        stdin.write_all(b"after-approval\n").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(250), sub.wait())
            .await
            .is_ok()
        {
            break;
        }
    }
    let got = collect(sub, SUB_WAIT).await;
    assert!(
        got.contains("dt/door-1/state after-approval"),
        "monitor got {got:?}"
    );
    assert!(
        !got.contains("before-approval"),
        "a denied message leaked: {got:?}"
    );
    assert_eq!(
        site.snapshot().connections_accepted,
        accepted,
        "approval must not need a reconnect"
    );
    drop(stdin);
    let _ = publisher.wait().await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_disconnects_within_a_second_and_refuses_from_then_on() {
    let site = Site::start().await;
    let pump = site.device("pump-1").await;
    let sub = site.subscribe(&pump, "cmd/pump-1/#", true, &[]);
    site.wait_for("pump-1 to connect", |s| s.connections_open == 1)
        .await;

    let revoked_at = std::time::Instant::now();
    match site
        .admin(AdminRequest::Revoke {
            thing: Some("pump-1".into()),
            cert: None,
        })
        .await
    {
        AdminResponse::Device { device } => assert_eq!(device.state, DeviceState::Revoked),
        other => panic!("{other:?}"),
    }
    site.wait_for("pump-1 to be disconnected", |s| {
        s.connections_open == 0 && s.revoked_disconnects == 1
    })
    .await;
    let took = revoked_at.elapsed();
    eprintln!("revocation took {took:?} to disconnect");
    drop(sub);

    let out = site.publish(&pump, "status/pump-1", "back", 1, true).await;
    assert!(
        !out.status.success(),
        "revoked device got in: {}",
        text(&out)
    );
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    site.stop().await;
}

/// Status is per certificate: a second certificate for an approved thing (a copy someone had
/// the CA sign, or a stolen device's) waits as pending; one certificate is revoked without the
/// other, approving the thing again never brings a revoked certificate back, and revoking the
/// certificate a live connection holds cuts that connection off.
#[tokio::test(flavor = "multi_thread")]
async fn status_is_per_certificate_with_real_clients() {
    let site = Site::start().await;
    let pump = site.device("pump-1").await;
    let other = pki::issue_device(
        "pump-1",
        &site.pki_dir(),
        &site.dir.path().join("second"),
        30,
    )
    .unwrap();
    assert_ne!(pump.cert_id, other.cert_id);

    let out = site.publish(&pump, "status/pump-1", "ok", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = site.publish(&other, "status/pump-1", "x", 1, true).await;
    assert!(
        text(&out).contains("Not authorized"),
        "a new certificate waits: {}",
        text(&out)
    );
    let certs = |r: AdminResponse| match r {
        AdminResponse::Device { device } => device
            .certs
            .iter()
            .map(|c| (c.id.clone(), c.state))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let list = match site.admin(AdminRequest::List).await {
        AdminResponse::Devices { devices } => devices,
        other => panic!("{other:?}"),
    };
    let d = list.iter().find(|d| d.thing == "pump-1").unwrap();
    assert_eq!(d.state, DeviceState::Approved);
    assert_eq!(
        d.certs
            .iter()
            .map(|c| (c.id.clone(), c.state))
            .collect::<Vec<_>>(),
        vec![
            (pump.cert_id.clone(), DeviceState::Approved),
            (other.cert_id.clone(), DeviceState::Pending)
        ]
    );

    // Revoked by certificate id alone; the thing's other certificate keeps working.
    let revoked = site
        .admin(AdminRequest::Revoke {
            thing: None,
            cert: Some(other.cert_id.clone()),
        })
        .await;
    assert_eq!(
        certs(revoked),
        vec![
            (pump.cert_id.clone(), DeviceState::Approved),
            (other.cert_id.clone(), DeviceState::Revoked)
        ]
    );
    site.approve("pump-1", &[]).await;
    let out = site.publish(&other, "status/pump-1", "x", 1, true).await;
    assert!(
        !out.status.success(),
        "re-approval reinstated a revoked certificate: {}",
        text(&out)
    );
    let out = site.publish(&pump, "status/pump-1", "still", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));

    // The live connection on a certificate that is revoked is cut off.
    let sub = site.subscribe(&pump, "cmd/pump-1/#", true, &[]);
    site.wait_for("pump-1 to connect", |s| s.connections_open == 1)
        .await;
    let r = site
        .admin(AdminRequest::Revoke {
            thing: None,
            cert: Some(pump.cert_id.clone()),
        })
        .await;
    assert!(matches!(r, AdminResponse::Device { .. }), "{r:?}");
    site.wait_for("the live connection to be cut off", |s| {
        s.connections_open == 0 && s.revoked_disconnects == 1
    })
    .await;
    drop(sub);
    let bad = site
        .admin(AdminRequest::Revoke {
            thing: None,
            cert: Some("ab".repeat(32)),
        })
        .await;
    assert!(
        matches!(&bad, AdminResponse::Error { message } if message.contains("no thing has certificate")),
        "{bad:?}"
    );
    site.stop().await;
}

/// Keys made on the device: `openssl req` makes the key and the CSR where the device is,
/// `sitegate device sign` signs the CSR; approved by the certificate id it prints, the device
/// connects with the key that never left it. A CSR with a bad signature, a wildcard CN or a
/// weak key is refused, naming why.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_made_on_the_device_is_signed_from_its_csr_and_connects() {
    use base64::Engine as _;
    let site = Site::start().await;
    let on_device = site.dir.path().join("on-device");
    let signed = site.dir.path().join("signed");
    std::fs::create_dir_all(&on_device).unwrap();
    let request = |name: &str, cn: &str, key: &[&str]| {
        let (k, c) = (
            on_device.join(format!("{name}.key")),
            on_device.join(format!("{name}.csr")),
        );
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
            ])
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .args(key)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (k, c)
    };
    let sign = |csr: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sitegate"))
            .args(["device", "sign", "--csr"])
            .arg(csr)
            .arg("--ca")
            .arg(site.pki_dir())
            .arg("--out")
            .arg(&signed)
            .output()
            .unwrap()
    };
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let (key, csr) = request("sensor-9", "sensor-9", &p256);
    let out = sign(&csr);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert_id = said
        .lines()
        .find_map(|l| l.strip_prefix("certificate id: "))
        .unwrap()
        .trim()
        .to_string();
    let device = pki::IssuedDevice {
        thing: "sensor-9".into(),
        cert_id: cert_id.clone(),
        cert: signed.join("sensor-9.pem"),
        key,
    };
    let r = site
        .admin(AdminRequest::Approve {
            thing: "sensor-9".into(),
            cert: Some(cert_id),
            groups: Vec::new(),
        })
        .await;
    assert!(matches!(r, AdminResponse::Device { .. }), "{r:?}");
    let out = site
        .publish(&device, "status/sensor-9", "own key", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // RSA 2048 is signed too.
    let (_, rsa) = request("pump-9", "pump-9", &["-newkey", "rsa:2048"]);
    assert!(sign(&rsa).status.success());

    let refused = |csr: &std::path::Path, why: &str| {
        let out = sign(csr);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(why),
            "want {why:?}: {err}"
        );
    };
    let (_, weak) = request("weak-1", "weak-1", &["-newkey", "rsa:1024"]);
    refused(&weak, "RSA of 1024 bits");
    let (_, wild) = request("wild", "*", &p256);
    refused(&wild, "not a valid thing name");
    let (_, wild) = request("wild-2", "sensor-*", &p256);
    refused(&wild, "not a valid thing name");
    // The good request with one bit of its signature flipped.
    let pem = std::fs::read_to_string(&csr).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let body = base64::engine::general_purpose::STANDARD.encode(&der);
    let bad = on_device.join("tampered.csr");
    std::fs::write(
        &bad,
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"),
    )
    .unwrap();
    refused(&bad, "signature does not verify");
    refused(&on_device.join("sensor-9.key"), "not a valid PKCS#10");
    assert!(
        !signed.join("weak-1.pem").exists() && !signed.join("*.pem").exists(),
        "nothing written for a refused request"
    );
    site.stop().await;
}

/// A CRL of the site CA listing `serials` (raw serial bytes), written to `out` as PEM.
fn write_crl(pki: &std::path::Path, number: u64, serials: &[Vec<u8>], out: &std::path::Path) {
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.join("ca.pem")).unwrap(), key)
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    // Written aside and renamed, as an operator's tooling would replace the file.
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, params.signed_by(&issuer).unwrap().pem().unwrap()).unwrap();
    std::fs::rename(&tmp, out).unwrap();
}

/// A gateway following `pki/devices.crl`, which lists nothing yet.
async fn site_with_an_empty_crl() -> Site {
    Site::start_with(|c| {
        let pki = c.listener.ca.parent().unwrap().to_path_buf();
        let crl = pki.join("devices.crl");
        write_crl(&pki, 1, &[], &crl);
        c.listener.crl = vec![crl];
    })
    .await
}

fn serial_of(device: &pki::IssuedDevice) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_file(&device.cert).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.raw_serial().to_vec()
}

/// `[listener] crl`: a certificate the CA's revocation list names is refused at the handshake,
/// and when the list changes a live connection on a newly listed certificate is cut off (the
/// registry says why); an unreadable list keeps the one in force; other devices carry on.
#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_list_is_followed_live() {
    let site = site_with_an_empty_crl().await;
    let crl = site.pki_dir().join("devices.crl");
    let pump = site.device("pump-1").await;
    let door = site.device("door-1").await;
    let sub = site.subscribe(&pump, "cmd/pump-1/#", true, &[]);
    site.wait_for("pump-1 to connect", |s| s.connections_open == 1)
        .await;
    let out = site.publish(&door, "status/door-1", "ok", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));

    write_crl(&site.pki_dir(), 2, &[serial_of(&pump)], &crl);
    site.wait_for("the listed certificate's connection to be cut off", |s| {
        s.connections_open == 0 && s.revoked_disconnects == 1
    })
    .await;
    drop(sub);
    let failed = site.snapshot().handshakes_failed;
    let out = site.publish(&pump, "status/pump-1", "again", 1, true).await;
    assert!(
        !out.status.success(),
        "a listed certificate got in: {}",
        text(&out)
    );
    site.wait_for("the handshake to be refused", |s| {
        s.handshakes_failed == failed + 1
    })
    .await;
    let out = site.publish(&door, "status/door-1", "still", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));
    let list = match site.admin(AdminRequest::List).await {
        AdminResponse::Devices { devices } => devices,
        other => panic!("{other:?}"),
    };
    let cert = &list.iter().find(|d| d.thing == "pump-1").unwrap().certs[0];
    assert_eq!(cert.state, DeviceState::Revoked);
    assert_eq!(cert.reason.as_deref(), Some(sitegate::auth::LISTED_IN_CRL));

    // A list that no longer reads: the one read before stays in force.
    std::fs::write(&crl, "not a CRL").unwrap();
    tokio::time::sleep(sitegate::edge::CRL_CHECK_INTERVAL * 2).await;
    let out = site.publish(&pump, "status/pump-1", "third", 1, true).await;
    assert!(!out.status.success(), "{}", text(&out));
    let out = site.publish(&door, "status/door-1", "fine", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));
    site.stop().await;
}

/// A device that reconnects resumes its TLS session from a ticket (no certificate signature
/// or chain check on either side, which is what a reconnect storm costs), and is still the
/// thing its certificate names. A revocation list change makes every ticket issued before it
/// useless, so a listed certificate cannot come back on one. RFC 8446 §2.2 (resumption and
/// PSK) and §4.6.1 (NewSessionTicket); the client is rustls's, as in the simulator.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_resumes_its_tls_session_until_the_revocation_list_changes() {
    let site = site_with_an_empty_crl().await;
    let pump = site.device("pump-1").await;
    let config = std::sync::Arc::new(site.credentials(&pump).client_config().unwrap());
    let kind = |c: &raw::RawClient| c.tls.get_ref().1.handshake_kind();
    let connect = |config| async {
        let mut c = raw::RawClient::tls_with(site.addr, config).await;
        c.send(&raw::connect(&pump.thing, false, 0x02)).await;
        let ack = c.read().await;
        (c, ack)
    };

    let (first, ack) = connect(std::sync::Arc::clone(&config)).await;
    assert_eq!(kind(&first), Some(rustls::HandshakeKind::Full));
    assert_eq!(ack.expect("CONNACK").body[1], 0);
    drop(first);
    // More devices than rustls's default in-memory session cache holds (256) come and go
    // meanwhile: a server-side cache would have forgotten the first one by now; a ticket,
    // which the device holds, still resumes.
    let creds = site.credentials(&pump);
    for _ in 0..10 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let config = std::sync::Arc::new(creds.client_config().unwrap());
            let addr = site.addr;
            batch.spawn(async move {
                let mut c = raw::RawClient::tls_with(addr, config).await;
                // Long enough for the server's ticket to be made and sent.
                let _ = tokio::time::timeout(Duration::from_millis(200), c.read()).await;
            });
        }
        while batch.join_next().await.is_some() {}
    }
    let (again, ack) = connect(std::sync::Arc::clone(&config)).await;
    assert_eq!(kind(&again), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(
        ack.expect("CONNACK").body[1],
        0,
        "a resumed session is the same thing"
    );

    let failed = site.snapshot().handshakes_failed;
    write_crl(
        &site.pki_dir(),
        2,
        &[serial_of(&pump)],
        &site.pki_dir().join("devices.crl"),
    );
    // The acceptor is rebuilt before the listed certificate's connection is cut off.
    site.wait_for("the listed certificate's connection to be cut off", |s| {
        s.connections_open == 0 && s.revoked_disconnects == 1
    })
    .await;
    drop(again);
    // The ticket was issued by the acceptor before the list changed: a full handshake, refused.
    let tcp = tokio::net::TcpStream::connect(site.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&config))
        .connect(name, tcp)
        .await;
    if let Ok(tls) = tls {
        assert_ne!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }
    site.wait_for("the handshake to be refused", |s| {
        s.handshakes_failed == failed + 1
    })
    .await;
    site.stop().await;
}

/// The device's publish fails, the gateway counts one failed handshake and no session.
async fn assert_refused_at_handshake(site: &Site, device: &pki::IssuedDevice) {
    let out = site.publish(device, "dt/sensor-1/t", "x", 1, true).await;
    assert!(!out.status.success(), "{}", text(&out));
    site.wait_for("a failed handshake", |s| s.handshakes_failed == 1)
        .await;
    assert_eq!(site.snapshot().connections_accepted, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_from_another_ca_is_refused_at_the_handshake() {
    let site = Site::start().await;
    let other = site.dir.path().join("other-ca");
    pki::init_ca(&other, "elsewhere", &[]).unwrap();
    let stranger =
        pki::issue_device("sensor-1", &other, &site.dir.path().join("strangers"), 30).unwrap();
    assert_refused_at_handshake(&site, &stranger).await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_certificate_is_refused() {
    let site = Site::start().await;
    site.approve("sensor-1", &[]).await;
    // Valid from 10 days ago for 5 days: expired 5 days ago.
    let expired =
        pki::issue_device_with_validity("sensor-1", &site.pki_dir(), &site.devices_dir(), -10, 5)
            .unwrap();
    assert_refused_at_handshake(&site, &expired).await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_id_must_equal_the_certificate_thing_name() {
    let site = Site::start().await;
    let sensor = site.device("sensor-1").await;
    for v5 in [true, false] {
        let out = site
            .publish_as(&sensor, "sensor-2", "dt/sensor-2/t", "x", 1, v5, &[])
            .await;
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out).to_lowercase().contains("not authori"),
            "{}",
            text(&out)
        );
    }
    assert_eq!(site.snapshot().connects_refused, 2);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_does_not_block_others() {
    let site = Site::start_with(|c| c.listener.handshake_timeout_ms = 3_000).await;
    let sensor = site.device("sensor-1").await;
    // Opens TCP and says nothing, before and during the real client's connection.
    let silent = tokio::net::TcpStream::connect(site.addr).await.unwrap();
    let started = std::time::Instant::now();
    let out = site.publish(&sensor, "dt/sensor-1/t", "x", 1, true).await;
    assert!(out.status.success(), "{}", text(&out));
    eprintln!(
        "publish beside a silent client took {:?}",
        started.elapsed()
    );
    assert_eq!(
        site.snapshot().handshakes_failed,
        0,
        "the silent client is still within its handshake time"
    );
    // And the silent one is dropped when its handshake time runs out.
    site.wait_for("the silent client to be dropped", |s| {
        s.handshakes_failed == 1
    })
    .await;
    drop(silent);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_without_connect_is_closed_after_the_connect_timeout() {
    use tokio::io::AsyncReadExt;
    let site = Site::start_with(|c| c.listener.connect_timeout_ms = 500).await;
    let dev = site.device("sensor-1").await;
    let creds = site.credentials(&dev);
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(creds.client_config().unwrap()));
    let tcp = tokio::net::TcpStream::connect(site.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("handshake with a valid certificate");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .expect("the gateway kept a connection without CONNECT open");
    assert_eq!(
        read.unwrap_or(0),
        0,
        "expected the gateway to close the connection"
    );
    assert_eq!(site.snapshot().connections_accepted, 0);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_packet_closes_the_connection() {
    let site =
        Site::start_with(|c| c.listener.max_packet_size = sitegate::config::ByteSize(1024)).await;
    let sensor = site.device("sensor-1").await;
    let big = "x".repeat(4096);
    // MQTT 3.1.1 clients cannot know the limit; the gateway refuses the packet from its header.
    let _ = site
        .publish(&sensor, "dt/sensor-1/blob", &big, 1, false)
        .await;
    site.wait_for("a protocol error", |s| s.protocol_errors == 1)
        .await;
    assert_eq!(site.snapshot().messages_in_qos1, 0);
    // A normal message still goes through.
    let out = site
        .publish(&sensor, "dt/sensor-1/t", "21.5", 1, false)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    site.wait_for("the small message", |s| s.messages_in_qos1 == 1)
        .await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_turns_away_extra_connections() {
    let site = Site::start_with(|c| c.listener.max_connections = 1).await;
    let sensor = site.device("sensor-1").await;
    let monitor = site.device("monitor-1").await;
    // The limit counts devices that finished their handshake (a silent socket does not take
    // a place; see hostile::half_open_handshakes_cannot_lock_devices_out).
    let _hog = site.subscribe(&monitor, "dt/#", true, &[]);
    site.wait_for("the first device", |s| s.connections_open == 1)
        .await;
    let out = site.publish(&sensor, "dt/sensor-1/t", "x", 1, true).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(site.snapshot().connections_over_limit, 1);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_reach_later_subscribers() {
    let site = Site::start().await;
    let pump = site.device("pump-1").await;
    let monitor = site.device("monitor-1").await;
    let out = site
        .publish_as(
            &pump,
            "pump-1",
            "status/pump-1",
            "running",
            1,
            false,
            &["-r"],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let sub = site.subscribe(&monitor, "status/#", false, &["-C", "1", "-W", "10"]);
    let got = collect(sub, SUB_WAIT).await;
    assert!(got.contains("status/pump-1 running"), "{got:?}");
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn last_will_is_published_when_a_device_vanishes() {
    let site = Site::start().await;
    let pump = site.device("pump-1").await;
    let monitor = site.device("monitor-1").await;
    let watcher = site.subscribe(&monitor, "status/#", true, &["-C", "1"]);
    // A pump holding a connection open with a will, then killed without DISCONNECT.
    let mut dying = Command::new("mosquitto_sub")
        .args(site.mosquitto_args(&pump.cert, &pump.key, "pump-1", true))
        .args([
            "-t",
            "cmd/pump-1/#",
            "--will-topic",
            "status/pump-1",
            "--will-payload",
            "offline",
            "--will-qos",
            "1",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    site.wait_for("both to connect", |s| s.connections_open == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    dying.kill().await.unwrap();
    let got = collect(watcher, SUB_WAIT).await;
    assert!(got.contains("status/pump-1 offline"), "{got:?}");
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qos2_publish_on_311_closes_the_connection() {
    let site = Site::start().await;
    let sensor = site.issue("sensor-1");
    site.approve("sensor-1", &[]).await;
    let creds = site.credentials(&sensor);
    let opts = creds
        .mqtt_options(site.addr, Duration::from_secs(30))
        .unwrap();
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish("dt/sensor-1/t", rumqttc::QoS::ExactlyOnce, false, "x")
        .await
        .unwrap();
    let mut closed = false;
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => continue,
            Err(_) => break,
        }
    }
    assert!(closed, "connection should be closed for QoS 2");
    site.wait_for("a protocol error", |s| s.protocol_errors == 1)
        .await;
    assert_eq!(
        site.snapshot().messages_in_qos1 + site.snapshot().messages_in_qos0,
        0
    );
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_puback_reasons_follow_a_live_approval() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event};
    let site = Site::start().await;
    let dev = site.issue("door-1");
    let creds = site.credentials(&dev);
    let opts = creds
        .mqtt5_options(site.addr, Duration::from_secs(30))
        .unwrap();
    let (client, mut events) = AsyncClient::new(opts, 10);

    let mut reasons = Vec::new();
    client
        .publish("dt/door-1/state", QoS::AtLeastOnce, false, "pending")
        .await
        .unwrap();
    while reasons.is_empty() {
        if let Event::Incoming(P5::PubAck(ack)) = tokio::time::timeout(SUB_WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            reasons.push(ack.reason);
        }
    }
    site.approve("door-1", &[]).await;
    client
        .publish("dt/door-1/state", QoS::AtLeastOnce, false, "approved")
        .await
        .unwrap();
    while reasons.len() < 2 {
        if let Event::Incoming(P5::PubAck(ack)) = tokio::time::timeout(SUB_WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            reasons.push(ack.reason);
        }
    }
    assert_eq!(
        reasons,
        vec![PubAckReason::NotAuthorized, PubAckReason::Success]
    );
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_session_keeps_subscriptions_and_queued_messages() {
    let site = Site::start().await;
    let pump = site.device("pump-1").await;
    let controller = site.device("controller-1").await;
    // First visit: subscribe with a persistent session (-c), then leave.
    let sub = site.subscribe(&pump, "cmd/pump-1/#", false, &["-c", "-C", "1"]);
    let got = publish_until_received(&site, sub, &controller, "cmd/pump-1/warmup", "1").await;
    assert!(got.contains("warmup"), "{got:?}");
    site.wait_for("pump-1 to leave", |s| s.connections_open == 0)
        .await;
    // While it is away, a QoS 1 command arrives.
    let out = site
        .publish(&controller, "cmd/pump-1/start", "queued", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // Back with the same client id and -c: the router replays what was queued for it. (A
    // clean subscriber arriving now would not see a message published before it came.)
    let sub = site.subscribe(&pump, "cmd/pump-1/#", false, &["-c", "-C", "1", "-W", "10"]);
    let got = collect(sub, SUB_WAIT).await;
    assert!(
        got.contains("cmd/pump-1/start queued"),
        "queued message lost: {got:?}"
    );
    site.stop().await;
}

#[test]
fn mosquitto_clients_are_installed() {
    // The integration tests above need them; say so plainly if they are missing.
    let out = std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output();
    assert!(
        out.is_ok(),
        "mosquitto_pub missing: run `apt-get install mosquitto-clients` (scripts/test does)"
    );
}
