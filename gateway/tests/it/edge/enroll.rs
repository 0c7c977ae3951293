//! In-band enrollment by claim certificate (`[auth.enrollment]`), end to end with real clients:
//! `openssl req` makes the device's key and CSR, `mosquitto_rr` is the claim device (it
//! subscribes to the answer topic and publishes the request on one MQTT 5 connection, as a
//! device running AWS IoT fleet provisioning by claim does), and the certificate it gets back
//! connects with `mosquitto_pub`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use sitegate::auth::{DeviceState, EnrollmentConfig};
use sitegate::config::Config;
use sitegate::identity::pki::{self, IssuedDevice};
use sitegate::ops::admin::{AdminRequest, AdminResponse};
use sitegate::ops::prometheus::{scrape, value_of};
use sitegate_plugins::units::Period;
use tokio::process::{Child, Command};

/// Adds `[auth.enrollment]` to `c`, with a claim CA of its own beside the site's CA (as
/// `sitegate ca init` makes one); returns the claim CA's directory.
pub(crate) fn enable_enrollment(c: &mut Config, per_minute: u32, sessions: usize) -> PathBuf {
    let root = c.data_dir.parent().unwrap().to_path_buf();
    let claims = pki::init_ca(&root.join("claim-ca"), "claims", &[]).unwrap();
    c.auth.enrollment = Some(EnrollmentConfig {
        claim_ca: claims.ca_cert,
        ca_dir: root.join("pki"),
        cert_days: 30,
        max_requests_per_minute: per_minute,
        max_pending: 10,
        max_sessions: sessions,
        session_limit: Period(Duration::from_secs(60)),
    });
    root.join("claim-ca")
}

/// The shared claim certificate, from the claim CA in `claim_ca`.
pub(crate) fn claim_cert(site: &Site, claim_ca: &Path) -> IssuedDevice {
    pki::issue_device("claim-1", claim_ca, &site.dir.path().join("claim"), 30).unwrap()
}

/// A key and CSR made "on the device" by openssl, P-256.
pub(crate) fn device_csr(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (key, csr) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
    );
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", &format!("/CN={cn}")])
        .args([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "{}", text(&out));
    (key, csr)
}

/// `mosquitto_rr` with the claim certificate: subscribes to `answer`, publishes `csr` to
/// `request`, prints the one answer it gets (or times out after `wait_secs`).
pub(crate) fn claim_request(
    site: &Site,
    claim: &IssuedDevice,
    client_id: &str,
    request: &str,
    answer: &str,
    csr: &Path,
    wait_secs: u32,
) -> Child {
    Command::new("mosquitto_rr")
        .args(site.mosquitto_args(&claim.cert, &claim.key, client_id, true))
        .args([
            "-t",
            request,
            "-e",
            answer,
            "-q",
            "1",
            "-W",
            &wait_secs.to_string(),
        ])
        // mosquitto_rr has no -f: the request is the file's text.
        .arg("-m")
        .arg(std::fs::read_to_string(csr).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_rr runs (apt-get install mosquitto-clients)")
}

pub(crate) async fn answer_of(child: Child) -> serde_json::Value {
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("mosquitto_rr ends")
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(said.trim()).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

async fn pending_cert(site: &Site, thing: &str) -> Option<String> {
    let AdminResponse::Devices { devices } = site.admin(AdminRequest::List).await else {
        panic!("device list");
    };
    devices
        .into_iter()
        .find(|d| d.thing == thing)?
        .certs
        .into_iter()
        .find(|c| c.state == DeviceState::Pending)
        .map(|c| c.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_certificate_enrolls_a_device_and_can_do_nothing_else() {
    let mut claim_ca = PathBuf::new();
    let site = Site::start_with(|c| claim_ca = enable_enrollment(c, 3, 4)).await;
    let claim = claim_cert(&site, &claim_ca);
    let on_device = site.dir.path().join("on-device");
    std::fs::create_dir_all(&on_device).unwrap();

    // A device already connected under the client id the claim connection will use.
    let monitor = site.device("monitor-1").await;
    let watching = site.subscribe(&monitor, "status/#", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. The request: pending until an operator approves it; then the answer carries the
    //    certificate, and the device connects with it and its own key.
    let (key, csr) = device_csr(&on_device, "pump-9", "pump-9");
    let asking = claim_request(
        &site,
        &claim,
        "monitor-1",
        "$sitegate/enroll/pump-9",
        "$sitegate/enroll/pump-9/accepted",
        &csr,
        25,
    );
    let mut cert_id = None;
    for _ in 0..100 {
        cert_id = pending_cert(&site, "pump-9").await;
        if cert_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cert_id = cert_id.expect("the enrollment is pending in the registry");
    assert_eq!(site.snapshot().claim_sessions_open, 1);
    site.approve("pump-9", &[]).await;
    let answer = answer_of(asking).await;
    assert_eq!(answer["thingName"], "pump-9");
    assert_eq!(answer["certificateId"], cert_id.as_str());
    let pem = answer["certificatePem"].as_str().unwrap();
    let cert = on_device.join("pump-9.pem");
    std::fs::write(&cert, pem).unwrap();
    let pump = IssuedDevice {
        thing: "pump-9".into(),
        cert_id: cert_id.clone(),
        cert,
        key: key.clone(),
    };
    let out = site
        .publish(&pump, "status/pump-9", "enrolled", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // The monitor that shares the claim connection's client id was not taken over.
    let seen = collect(watching, Duration::from_secs(3)).await;
    assert!(seen.contains("status/pump-9 enrolled"), "{seen:?}");

    // 2. The claim certificate can do nothing else: a publish elsewhere closes its
    //    connection and reaches nobody; a subscription elsewhere is refused.
    let refused_before = site.snapshot().claims_refused;
    let watching = site.subscribe(&monitor, "status/#", true, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = site
        .publish_as(&claim, "claim-1", "status/pump-9", "forged", 1, true, &[])
        .await;
    assert!(!out.status.success(), "{}", text(&out));
    let mut sub = Command::new("mosquitto_sub")
        .args(site.mosquitto_args(&claim.cert, &claim.key, "claim-1", true))
        .args(["-t", "status/#", "-C", "1", "-W", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), sub.wait()).await;
    let seen = collect(watching, Duration::from_secs(2)).await;
    assert!(!seen.contains("forged"), "{seen:?}");
    assert!(
        site.snapshot().claims_refused >= refused_before + 2,
        "{:?}",
        site.snapshot()
    );

    // 3. Requests that are refused, each answered on `…/rejected` with its reason.
    let rejected = |thing: &str, csr: &Path| {
        claim_request(
            &site,
            &claim,
            "claim-1",
            &format!("$sitegate/enroll/{thing}"),
            &format!("$sitegate/enroll/{thing}/rejected"),
            csr,
            10,
        )
    };
    // Another key for a thing already enrolled.
    let (_, other) = device_csr(&on_device, "pump-9b", "pump-9");
    let answer = answer_of(rejected("pump-9", &other)).await;
    assert_eq!(answer["statusCode"], 409, "{answer}");
    // A CSR for another thing than the topic names.
    let (_, mismatch) = device_csr(&on_device, "pump-10", "pump-10");
    let answer = answer_of(rejected("pump-11", &mismatch)).await;
    assert_eq!(answer["statusCode"], 400, "{answer}");
    assert!(
        answer["errorMessage"].as_str().unwrap().contains("pump-10"),
        "{answer}"
    );
    // Three requests a minute at most: of four in a row, one is turned away.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let answer = answer_of(rejected("pump-11", &mismatch)).await;
        codes.push((answer["statusCode"].clone(), answer["errorCode"].clone()));
    }
    assert!(
        codes.contains(&(429.into(), "Throttling".into())),
        "{codes:?}"
    );

    let text = scrape(site.metrics).await.unwrap();
    assert!(
        value_of(&text, "sitegate_enrollments_total{result=\"accepted\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        value_of(&text, "sitegate_enrollments_total{result=\"rejected\"}").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    site.stop().await;
}

/// What no enrollment client sends, as raw packets over mutual TLS with the claim certificate:
/// wildcard and foreign answer filters, a second thing, an oversized request, QoS 2, and more
/// claim connections than `auth.enrollment.max_sessions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_connection_refuses_what_no_enrollment_client_sends() {
    use crate::common::raw::{self, RawClient};
    let mut claim_ca = PathBuf::new();
    let site = Site::start_with(|c| claim_ca = enable_enrollment(c, 10, 2)).await;
    let claim = claim_cert(&site, &claim_ca);
    let creds = site.credentials(&claim);
    let connect = |id: &'static str| {
        let creds = &creds;
        async move { RawClient::connect_to(site.addr, creds, id, true).await }
    };

    // Only the exact answer topics of one thing; granted at QoS 0 (answers are re-asked for).
    let mut c = connect("anything").await;
    let filters: [(&[u8], u8); 4] = [
        (b"$sitegate/enroll/+/accepted", 1),
        (b"$sitegate/enroll/#", 1),
        (b"#", 0),
        (b"$sitegate/enroll/pump-1/accepted", 1),
    ];
    c.send(&raw::subscribe(1, &filters, true, &[])).await;
    let ack = c.read().await.expect("SUBACK");
    assert_eq!(ack.suback_codes(true), vec![0x87, 0x87, 0x87, 0x00]);
    // A second thing on the same connection closes it (DISCONNECT 0x87 first).
    c.send(&raw::subscribe(
        2,
        &[(b"$sitegate/enroll/pump-2/rejected", 0)],
        true,
        &[],
    ))
    .await;
    let bye = c.read().await.expect("DISCONNECT");
    assert_eq!((bye.kind(), bye.reason()), (14, 0x87), "{bye:?}");
    assert!(c.closed().await);

    // A request larger than any CSR: 0x95 Packet too large.
    let mut c = connect("big").await;
    let huge = vec![b'A'; 20 * 1024];
    c.send(&raw::publish(
        b"$sitegate/enroll/pump-1",
        1,
        false,
        true,
        &[],
        &huge,
    ))
    .await;
    let bye = c.read().await.expect("DISCONNECT");
    assert_eq!((bye.kind(), bye.reason()), (14, 0x95), "{bye:?}");

    // QoS 2: 0x9B QoS not supported.
    let mut c = connect("qos2").await;
    c.send(&raw::publish(
        b"$sitegate/enroll/pump-1",
        2,
        false,
        true,
        &[],
        b"x",
    ))
    .await;
    let bye = c.read().await.expect("DISCONNECT");
    assert_eq!((bye.kind(), bye.reason()), (14, 0x9B), "{bye:?}");

    // Two claim connections at most: a third is closed before its CONNACK, and takes no
    // device's place.
    let _one = connect("one").await;
    let _two = connect("two").await;
    let mut three = RawClient::tls_to(site.addr, &creds).await;
    three.send(&raw::connect("three", true, 0x02)).await;
    assert!(three.read().await.is_none(), "no CONNACK over max_sessions");
    let monitor = site.device("monitor-1").await;
    let out = site.publish(&monitor, "status/x", "x", 0, true).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(site.snapshot().claims_refused >= 4, "{:?}", site.snapshot());
    site.stop().await;
}
