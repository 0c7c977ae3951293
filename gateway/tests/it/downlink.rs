//! Cloud to device, with a real Mosquitto (mutual TLS, `require_certificate`, persistence)
//! standing in for IoT Core as in the uplink tests: downlinks reach only devices whose policy
//! allows the topic, wait for offline devices across a gateway restart, and survive the cloud
//! broker restarting; AWS's IoT Device SDK for Python runs jobs and shadow round trips through
//! the relay.

use crate::common;
use crate::iotcore::Cloud;

use std::process::Stdio;
use std::time::Duration;

use common::Site;
use sitegate::config::{Config, DownlinkConfig, RelayConfig};
use sitegate::downlink::Status;
use sitegate::identity::pki::IssuedDevice;
use sitegate::ops::admin::{AdminRequest, AdminResponse};
use sitegate_plugins::SinkConfig;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A running client's output, line by line.
struct Output {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Output {
    fn of(mut child: Child) -> Output {
        let stdout = child.stdout.take().expect("piped stdout");
        Output {
            _child: child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next line, waiting at most `limit`.
    async fn next(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
    }

    /// The next line; fails the test after 20 s.
    async fn expect(&mut self, what: &str) -> String {
        self.next(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no line for {what}"))
    }
}

/// The "cmd" downlink (cloud `cmd/<site>/#` → local `cmd/#`) and the jobs and shadow relay, on
/// the `cloud` sink, which publishes to `cloud` as `identity`; the test policies and
/// [`KIOSK_AUTH`].
fn with_downlinks(cloud: &Cloud, identity: &IssuedDevice) -> impl FnOnce(&mut Config) {
    downlinks_on(cloud.sink(identity))
}

/// The same on any `iotcore` sink.
fn downlinks_on(sink: sitegate_plugins::iotcore::IotCoreConfig) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.sinks.insert("cloud".into(), SinkConfig::Iotcore(sink));
        c.downlinks.insert(
            "cmd".into(),
            DownlinkConfig {
                sink: "cloud".into(),
                from: "cmd/${site}/#".into(),
                to: Some("cmd/#".into()),
            },
        );
        c.relay = Some(RelayConfig {
            sink: "cloud".into(),
            jobs: true,
            shadow: true,
            session_expiry_secs: 3600,
        });
        c.auth = toml::from_str(&format!("{}{KIOSK_AUTH}", common::AUTH)).unwrap();
    }
}

async fn status(site: &Site) -> Status {
    match site.admin(AdminRequest::DownlinkStatus).await {
        AdminResponse::Downlinks { status } => status,
        other => panic!("{other:?}"),
    }
}

/// Waits until the cloud link has connected `n` times, is up, and the cloud has acknowledged
/// every filter.
async fn link_up(site: &Site, n: u64) {
    for _ in 0..400 {
        let s = status(site).await;
        let up = |l: &sitegate::downlink::LinkReport| {
            let l = &l.link;
            l.connected && l.connections >= n && l.subscribed.len() == l.filters.len()
        };
        if s.links.get("cloud").is_some_and(up) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the cloud link never came up: {:?}", status(site).await);
}

/// `mosquitto_pub` of one QoS 1 message into the cloud as the operator.
async fn cloud_publish(cloud: &Cloud, operator: &IssuedDevice, topic: &str, message: &str) {
    let out = Command::new("mosquitto_pub")
        .args(cloud.client_args(operator, "operator"))
        .args(["-t", topic, "-m", message, "-q", "1"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("mosquitto_pub runs");
    assert!(out.status.success(), "{}", common::text(&out));
}

/// A local `mosquitto_sub` (MQTT 5, QoS 1) printing `topic payload`; persistent when `keep`.
fn local_sub(site: &Site, device: &IssuedDevice, filters: &[&str], keep: bool) -> Output {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub"])
        .args(site.mosquitto_args(&device.cert, &device.key, &device.thing, true))
        .args(["-q", "1", "-v"]);
    for f in filters {
        cmd.args(["-t", f]);
    }
    if keep {
        cmd.args(["-c", "-x", "3600"]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub runs");
    Output::of(child)
}

/// Waits until the gateway has `n` device connections open.
async fn connections(site: &Site, n: u64) {
    site.wait_for(&format!("{n} connections"), |s| s.connections_open == n)
        .await;
}

/// A command from the cloud reaches the device whose policy allows its topic and no other (a
/// refused filter gets SUBACK 0x87, MQTT 5 §3.9.3); a device that is away gets it when it is
/// back, across a gateway restart; one sent while the gateway itself is down waits in the
/// cloud's session for the gateway's link (Clean Start 0 with a Session Expiry Interval,
/// §3.1.2.4 and §3.1.2.11.2: the server keeps QoS 1 messages for the session, §4.1).
#[tokio::test(flavor = "multi_thread")]
async fn cloud_commands_reach_only_allowed_devices_and_wait_for_offline_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let gateway_id = cloud.issue("plant-7-gateway");
    let operator = cloud.issue("operator");
    let mut site = Site::start_with(with_downlinks(&cloud, &gateway_id)).await;
    link_up(&site, 1).await;
    let pump1 = site.device("pump-1").await;
    let pump2 = site.device("pump-2").await;

    // pump-2 asks for pump-1's commands too; its policy grants only its own.
    let mut one = local_sub(&site, &pump1, &["cmd/pump-1/#"], true);
    let mut two = local_sub(&site, &pump2, &["cmd/pump-1/#", "cmd/pump-2/#"], false);
    connections(&site, 2).await;
    site.wait_for("pump-2's refused filter", |s| s.subscriptions_denied >= 1)
        .await;

    cloud_publish(&cloud, &operator, "cmd/test/pump-1/start", "one").await;
    assert_eq!(one.expect("pump-1's command").await, "cmd/pump-1/start one");
    // One cloud link, one router: pump-2's own command comes after pump-1's, so had pump-1's
    // reached pump-2 it would be its first line.
    cloud_publish(&cloud, &operator, "cmd/test/pump-2/start", "two").await;
    assert_eq!(two.expect("pump-2's command").await, "cmd/pump-2/start two");
    // A topic outside every downlink's filter is not subscribed in the cloud at all; one no
    // device subscribes to is counted.
    cloud_publish(&cloud, &operator, "cmd/other-site/pump-1/start", "not ours").await;
    cloud_publish(&cloud, &operator, "cmd/test/valve-9/open", "nobody").await;
    site.wait_for("the command nobody subscribed to", |s| {
        s.downlink_unheard == 1
    })
    .await;
    // Hostile topics from the cloud are held to the site's own rules (256 bytes, 8 levels)
    // after mapping, refused and acknowledged, never handed to the router.
    let long = format!("cmd/test/{}", "x".repeat(300));
    cloud_publish(&cloud, &operator, &long, "too long").await;
    cloud_publish(&cloud, &operator, "cmd/test/a/b/c/d/e/f/g/h", "too deep").await;
    site.wait_for("the hostile topics refused", |s| s.downlink_refused == 2)
        .await;

    // pump-1 goes away (its session kept); a command waits for it in the gateway's store.
    drop(one);
    connections(&site, 1).await;
    cloud_publish(&cloud, &operator, "cmd/test/pump-1/stop", "three").await;
    site.wait_for("the command queued for pump-1", |s| s.downlink_queued >= 1)
        .await;
    let before = status(&site).await;
    let cmd = &before.downlinks["cmd"];
    assert_eq!(
        (
            cmd.counts.delivered,
            cmd.counts.queued,
            cmd.counts.no_subscriber,
            cmd.counts.refused
        ),
        (4, 1, 1, 2),
        "{before:?}"
    );
    assert_eq!(cmd.from, "cmd/test/#");
    assert_eq!(before.links["cloud"].unmatched, 0, "{before:?}");
    // The same, as an operator reads it.
    let config = site.dir.path().join("sitegate.toml");
    std::fs::write(&config, toml::to_string(&site.config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args(["downlink", "status", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(table.contains("cloud            connected"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("cmd "))
        .unwrap_or_default();
    let numbers: Vec<&str> = row.split_whitespace().skip(3).collect();
    assert_eq!(numbers, ["4", "1", "1", "2"], "{table}");

    // The gateway restarts; while it is down the cloud sends another, which the cloud keeps
    // in the link's persistent session.
    drop(two);
    let (cloud_port, ca, cert, key) = (
        cloud.port,
        cloud.dir.join("cloud-pki/ca.pem"),
        operator.cert.clone(),
        operator.key.clone(),
    );
    site.restart(move |_| {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &cloud_port.to_string()])
            .arg("--cafile")
            .arg(&ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-i", "operator", "-V", "mqttv5", "-q", "1"])
            .args(["-t", "cmd/test/pump-1/reboot", "-m", "four"])
            .output()
            .expect("mosquitto_pub runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    link_up(&site, 1).await;
    let mut back = local_sub(&site, &pump1, &["cmd/pump-1/#"], true);
    let mut got = vec![
        back.expect("the queued command").await,
        back.expect("the command sent while the gateway was down")
            .await,
    ];
    got.sort();
    assert_eq!(got, ["cmd/pump-1/reboot four", "cmd/pump-1/stop three"]);
    assert_eq!(back.next(Duration::from_millis(500)).await, None);
    site.stop().await;
}

/// The cloud broker restarts: QoS 1 messages the gateway had not acknowledged come again
/// (MQTT-4.4.0-1: on a resumed session the server resends unacknowledged PUBLISHes), and once
/// the broker has forgotten the gateway's session altogether (CONNACK Session Present 0,
/// §3.2.2.1.1) the link subscribes again. A relayed request while the link is down gets PUBACK
/// 0x80 and another thing's topic 0x87 (§3.4.2.1), a filter with a wildcard for the thing
/// SUBACK 0x87 (§3.9.3).
#[tokio::test(flavor = "multi_thread")]
async fn the_downlink_survives_the_cloud_broker_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(dir.path()).await;
    let gateway_id = cloud.issue("plant-7-gateway");
    let operator = cloud.issue("operator");
    let site = Site::start_with(with_downlinks(&cloud, &gateway_id)).await;
    link_up(&site, 1).await;
    let pump = site.device("pump-1").await;
    let mut sub = local_sub(&site, &pump, &["cmd/pump-1/#"], true);
    connections(&site, 1).await;

    // A burst, then the broker stops at once (saving its sessions) and starts again.
    let mut burst = Command::new("mosquitto_pub")
        .args(cloud.client_args(&operator, "operator"))
        .args(["-t", "cmd/test/pump-1/set", "-q", "1", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = burst.stdin.take().unwrap();
        for i in 0..20 {
            stdin.write_all(format!("m{i}\n").as_bytes()).await.unwrap();
        }
    }
    assert!(burst.wait().await.unwrap().success());
    cloud.stop().await;
    cloud.restart().await;
    link_up(&site, 2).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let line = sub.expect("every message of the burst").await;
        seen.insert(line);
    }
    let want: std::collections::BTreeSet<String> =
        (0..20).map(|i| format!("cmd/pump-1/set m{i}")).collect();
    assert_eq!(seen, want);

    // Now the broker loses the gateway's session (no persistence file): only a new SUBSCRIBE
    // brings commands down.
    cloud.stop().await;
    let _ = std::fs::remove_file(dir.path().join("mosquitto/mosquitto.db"));
    // Meanwhile an MQTT 5 device's relayed request is refused at once (0x80), so it knows to
    // try again; another thing's topics stay refused (0x87), whatever the link does.
    for _ in 0..200 {
        if !status(&site).await.links["cloud"].link.connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kiosk = site.device("kiosk-1").await;
    let mut raw = common::raw::RawClient::connect(&site, &kiosk, true).await;
    for (topic, reason) in [
        (&b"$aws/things/kiosk-1/shadow/get"[..], 0x80),
        (b"$aws/things/kiosk-2/jobs/start-next", 0x87),
    ] {
        raw.send(&common::raw::publish(topic, 1, false, true, &[], b"{}"))
            .await;
        let ack = raw.read().await.expect("PUBACK");
        assert_eq!((ack.kind(), ack.reason()), (4, reason), "{ack:?}");
    }
    raw.send(&common::raw::subscribe(
        9,
        &[
            (&b"$aws/things/+/shadow/#"[..], 1),
            (b"$aws/things/kiosk-1/shadow/#", 1),
        ],
        true,
        &[],
    ))
    .await;
    let suback = raw.read().await.expect("SUBACK");
    assert_eq!(suback.suback_codes(true), [0x87, 0x01]);
    cloud.restart().await;
    link_up(&site, 3).await;
    cloud_publish(&cloud, &operator, "cmd/test/pump-1/after", "fresh").await;
    // Duplicates of the burst may still arrive; they are skipped.
    let mut delivered = false;
    while let Some(line) = sub.next(Duration::from_secs(10)).await {
        if line == "cmd/pump-1/after fresh" {
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "no command after the broker lost the session: {:?}",
        status(&site).await
    );
    site.stop().await;
}

/// A device's own jobs and shadow topics may be used; another thing's never, whatever the
/// policy says (this one grants kiosk-2's jobs to everyone on purpose).
const KIOSK_AUTH: &str = r#"
[device_groups.kiosks]
selection_rule = "thingName: kiosk-*"
policy = "kiosk"

[policies.kiosk.all]
operations = ["mqtt:connect", "mqtt:publish", "mqtt:subscribe"]
resources = [
  "mqtt:clientId:${iot:Connection.Thing.ThingName}",
  "mqtt:topic:$aws/things/${iot:Connection.Thing.ThingName}/jobs/*",
  "mqtt:topic:$aws/things/${iot:Connection.Thing.ThingName}/shadow/*",
  "mqtt:topicfilter:$aws/things/${iot:Connection.Thing.ThingName}/jobs/*",
  "mqtt:topicfilter:$aws/things/${iot:Connection.Thing.ThingName}/shadow/*",
  "mqtt:topic:$aws/things/kiosk-2/jobs/*",
]
"#;

/// A request the cloud services saw: its topic and user properties.
type Seen = (String, Vec<(String, String)>);

/// IoT Core's jobs and shadow services, as far as the round trips need them, answering on the
/// reserved topics with the documented payloads: developer guide, "Jobs device MQTT API
/// operations" (StartNextPendingJobExecution, UpdateJobExecution: `…/accepted` replies) and
/// "Jobs notifications" (`notify-next`); "Device Shadow service MQTT topics" (`update`, `get`,
/// `…/accepted`, `update/delta`).
async fn cloud_services(
    cloud: &Cloud,
    identity: &IssuedDevice,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let tls = sitegate_plugins::tls::mtls_client_config(
        &std::fs::read(cloud.dir.join("cloud-pki/ca.pem")).unwrap(),
        &std::fs::read(&identity.cert).unwrap(),
        &std::fs::read(&identity.key).unwrap(),
    )
    .unwrap();
    let mut options = MqttOptions::new("iot-core-services", "127.0.0.1", cloud.port);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    let (client, mut events) = AsyncClient::new(options, 64);
    client
        .subscribe("$aws/things/+/jobs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("$aws/things/+/shadow/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let answers = client.clone();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        let mut subacks = 0;
        while let Ok(event) = events.poll().await {
            let publish = match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 2 {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    continue;
                }
                Event::Incoming(Packet::Publish(p)) => p,
                _ => continue,
            };
            let topic = String::from_utf8_lossy(&publish.topic).into_owned();
            let Some(rest) = topic.strip_prefix("$aws/things/") else {
                continue;
            };
            let (thing, op) = rest.split_once('/').unwrap_or((rest, ""));
            let request: serde_json::Value =
                serde_json::from_slice(&publish.payload).unwrap_or_default();
            let token = request["clientToken"].clone();
            let now = 1_700_000_000u64;
            let base = format!("$aws/things/{thing}");
            let replies: Vec<(String, serde_json::Value)> = match op {
                "jobs/start-next" => vec![(
                    format!("{base}/jobs/start-next/accepted"),
                    serde_json::json!({"clientToken": token, "timestamp": now, "execution": {
                        "jobId": "job-7", "thingName": thing, "status": "IN_PROGRESS",
                        "jobDocument": {"operation": "reboot"}, "queuedAt": now,
                        "startedAt": now, "lastUpdatedAt": now, "versionNumber": 2,
                        "executionNumber": 1}}),
                )],
                op if op.starts_with("jobs/") && op.ends_with("/update") => {
                    let job = &op["jobs/".len()..op.len() - "/update".len()];
                    vec![
                        (
                            format!("{base}/jobs/{job}/update/accepted"),
                            serde_json::json!({"clientToken": token, "timestamp": now,
                                "executionState": {"status": request["status"], "versionNumber": 3}}),
                        ),
                        // The list is empty now: notify-next without an execution.
                        (
                            format!("{base}/jobs/notify-next"),
                            serde_json::json!({"timestamp": now}),
                        ),
                    ]
                }
                "shadow/update" => vec![(
                    format!("{base}/shadow/update/accepted"),
                    serde_json::json!({"state": request["state"], "metadata": {}, "version": 1,
                        "timestamp": now, "clientToken": token}),
                )],
                "shadow/get" => vec![
                    (
                        format!("{base}/shadow/get/accepted"),
                        serde_json::json!({"state": {"desired": {"speed": 5}, "reported": {"speed": 1},
                            "delta": {"speed": 5}}, "metadata": {}, "version": 2, "timestamp": now,
                            "clientToken": token}),
                    ),
                    (
                        format!("{base}/shadow/update/delta"),
                        serde_json::json!({"state": {"speed": 5}, "metadata": {}, "version": 2,
                            "timestamp": now}),
                    ),
                ],
                // Its own answers, and notifications, come back to it too.
                _ => continue,
            };
            let props = publish
                .properties
                .map(|p| p.user_properties)
                .unwrap_or_default();
            let _ = seen_tx.send((topic.clone(), props));
            for (topic, body) in replies {
                let _ = answers
                    .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                    .await;
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), subscribed)
        .await
        .expect("the cloud services subscribed")
        .unwrap();
    (client, seen)
}

/// AWS's IoT Device SDK for Python (`tests/fixtures/sdk_jobs_shadow.py`, its `iotjobs` and
/// `iotshadow` clients) as the local device: notify-next, start-next, update to SUCCEEDED,
/// then a shadow update, get and delta, all through the gateway's relay. The cloud sees every
/// request with the device's identity, and never the request the device made for another
/// thing's jobs.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_and_shadow_round_trips_with_the_aws_iot_device_sdk() {
    use rumqttc::v5::mqttbytes::QoS;
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(dir.path()).await;
    let gateway_id = cloud.issue("plant-7-gateway");
    let services_id = cloud.issue("iot-core");
    let (services, mut seen) = cloud_services(&cloud, &services_id).await;
    let site = Site::start_with(with_downlinks(&cloud, &gateway_id)).await;
    link_up(&site, 1).await;
    let kiosk = site.device("kiosk-1").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sdk_jobs_shadow.py"
    );
    let child = Command::new("python3")
        .arg(script)
        .args(["--port", &site.addr.port().to_string()])
        .arg("--ca")
        .arg(&site.ca.ca_cert)
        .arg("--cert")
        .arg(&kiosk.cert)
        .arg("--key")
        .arg(&kiosk.key)
        .args(["--thing", "kiosk-1", "--other", "kiosk-2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut device = Output::of(child);
    let mut next = async |what: &str| -> serde_json::Value {
        let line = device
            .next(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| {
                panic!("the SDK device said nothing for {what} (pip install awsiotsdk)")
            });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_ne!(v["event"], "error", "{v}");
        v
    };
    assert_eq!(next("connecting").await["event"], "connected");
    let subscribed = next("subscribing").await;
    assert_eq!(
        subscribed["granted"],
        serde_json::json!(vec![1; 10]),
        "{subscribed}"
    );
    // Every relayed filter is subscribed in the cloud (acknowledged) before the job is
    // queued there: the downlink's and the device's ten.
    let mut cloud_filters = 0;
    for _ in 0..400 {
        cloud_filters = status(&site).await.links["cloud"].link.subscribed.len();
        if cloud_filters == 1 + 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cloud_filters, 11, "{:?}", status(&site).await);
    services
        .publish(
            "$aws/things/kiosk-1/jobs/notify-next",
            QoS::AtLeastOnce,
            false,
            serde_json::json!({"timestamp": 1_700_000_000u64, "execution": {
                "jobId": "job-7", "thingName": "kiosk-1", "status": "QUEUED",
                "queuedAt": 1_700_000_000u64, "versionNumber": 1, "executionNumber": 1,
                "jobDocument": {"operation": "reboot"}}})
            .to_string(),
        )
        .await
        .unwrap();
    let notified = next("notify-next").await;
    assert_eq!(
        (&notified["job_id"], &notified["status"]),
        (&serde_json::json!("job-7"), &serde_json::json!("QUEUED")),
        "{notified}"
    );
    let started = next("start-next").await;
    assert_eq!(
        (
            &started["status"],
            &started["client_token"],
            &started["document"]
        ),
        (
            &serde_json::json!("IN_PROGRESS"),
            &serde_json::json!("start-1"),
            &serde_json::json!({"operation": "reboot"})
        ),
        "{started}"
    );
    assert_eq!(next("update").await["client_token"], "update-1");
    let updated = next("shadow update").await;
    assert_eq!(
        updated["reported"],
        serde_json::json!({"speed": 1}),
        "{updated}"
    );
    let got = next("shadow get").await;
    assert_eq!(got["desired"], serde_json::json!({"speed": 5}), "{got}");
    let delta = next("shadow delta").await;
    assert_eq!(delta["state"], serde_json::json!({"speed": 5}), "{delta}");
    assert_eq!(next("disconnecting").await["event"], "done");

    let mut requests = Vec::new();
    while let Ok(r) = seen.try_recv() {
        requests.push(r);
    }
    let topics: Vec<&str> = requests.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "$aws/things/kiosk-1/jobs/start-next",
            "$aws/things/kiosk-1/jobs/job-7/update",
            "$aws/things/kiosk-1/shadow/update",
            "$aws/things/kiosk-1/shadow/get",
        ],
        "kiosk-2's start-next must never reach the cloud"
    );
    let identity = vec![
        ("thing-name".to_string(), "kiosk-1".to_string()),
        ("cert-id".to_string(), kiosk.cert_id.clone()),
    ];
    for (topic, props) in &requests {
        assert_eq!(props, &identity, "{topic}");
    }
    let s = site.snapshot();
    assert_eq!((s.relayed_up, s.other_thing_refused), (4, 1), "{s:?}");
    assert!(s.relayed_down >= 6, "{s:?}");

    // The cloud goes away; the device, back, asks for its shadow and gets the last document
    // the cloud gave, with its own client token.
    cloud.stop().await;
    for _ in 0..200 {
        if !status(&site).await.links["cloud"].link.connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = b"$aws/things/kiosk-1/shadow/get/accepted";
    let mut raw = common::raw::RawClient::connect(&site, &kiosk, true).await;
    raw.send(&common::raw::subscribe(4, &[(&accepted[..], 1)], true, &[]))
        .await;
    assert_eq!(raw.read().await.expect("SUBACK").suback_codes(true), [0x01]);
    raw.send(&common::raw::publish(
        b"$aws/things/kiosk-1/shadow/get",
        1,
        false,
        true,
        &[],
        br#"{"clientToken":"offline-1"}"#,
    ))
    .await;
    let mut answer = None;
    while let Some(reply) = raw.read_within(Duration::from_secs(5)).await {
        match reply.kind() {
            4 => assert_eq!(reply.reason(), 0, "{reply:?}"),
            3 => {
                answer = Some(reply);
                break;
            }
            _ => {}
        }
    }
    let answer = answer.expect("the shadow from the cache");
    let body = answer.body.as_slice();
    let json_at = body.iter().position(|&b| b == b'{').unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&body[json_at..]).unwrap();
    assert_eq!(doc["clientToken"], "offline-1", "{doc}");
    assert_eq!(
        doc["state"]["desired"],
        serde_json::json!({"speed": 5}),
        "{doc}"
    );
    assert_eq!(site.snapshot().shadow_answers_cached, 1);
    site.stop().await;
}

/// On Greengrass (`via = "nucleus"`), the same through IPC: a downlink's filter and a device's
/// relayed filter are `SubscribeToIoTCore` streams, a relayed request is a `PublishToIoTCore`
/// with the device's identity, against the nucleus stand-in playing IoT Core's side.
#[tokio::test(flavor = "multi_thread")]
async fn downlinks_and_the_relay_go_through_the_nucleus() {
    use sitegate_plugins::nucleus::{standin::StandIn, Nucleus};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nucleus.socket");
    let standin = StandIn::start(
        &socket,
        "svcuid",
        "io.sitegate.Gateway",
        serde_json::json!({}),
    )
    .unwrap();
    let nucleus = std::sync::Arc::new(Nucleus::connect(&socket, "svcuid").await.unwrap());
    let downlinks = downlinks_on(sitegate_plugins::iotcore::IotCoreConfig::through_nucleus());
    let site = Site::start_with_nucleus(
        |c| {
            c.greengrass.ipc = true;
            downlinks(c);
        },
        Some(nucleus),
    )
    .await;
    link_up(&site, 1).await;
    assert_eq!(standin.iot_core_filters(), ["cmd/test/#"]);
    let pump = site.device("pump-1").await;
    let mut commands = local_sub(&site, &pump, &["cmd/pump-1/#"], false);
    connections(&site, 1).await;
    standin.from_iot_core("cmd/test/pump-1/start", b"go");
    assert_eq!(commands.expect("the command").await, "cmd/pump-1/start go");

    // One connection subscribes and asks, as a shadow client does.
    let kiosk = site.device("kiosk-1").await;
    let reply = "$aws/things/kiosk-1/shadow/get/accepted";
    let mut raw = common::raw::RawClient::connect(&site, &kiosk, true).await;
    raw.send(&common::raw::subscribe(
        3,
        &[(reply.as_bytes(), 1)],
        true,
        &[],
    ))
    .await;
    let suback = raw.read().await.expect("SUBACK");
    assert_eq!(suback.suback_codes(true), [0x01]);
    for _ in 0..200 {
        if standin.iot_core_filters().iter().any(|f| f == reply) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(standin.iot_core_filters().iter().any(|f| f == reply));
    raw.send(&common::raw::publish(
        b"$aws/things/kiosk-1/shadow/get",
        1,
        false,
        true,
        &[],
        b"{}",
    ))
    .await;
    let ack = raw.read().await.expect("PUBACK");
    assert_eq!((ack.kind(), ack.reason()), (4, 0), "{ack:?}");
    let mut asked = None;
    for _ in 0..200 {
        asked = standin
            .published()
            .into_iter()
            .find(|p| p.topic == "$aws/things/kiosk-1/shadow/get");
        if asked.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = asked.expect("the shadow get through PublishToIoTCore");
    assert_eq!(
        asked.user_properties,
        [
            ("thing-name".to_string(), "kiosk-1".to_string()),
            ("cert-id".to_string(), kiosk.cert_id.clone())
        ]
    );
    let shadow = br#"{"state":{"desired":{"speed":5}},"version":2}"#;
    standin.from_iot_core(reply, shadow);
    let delivery = raw.read().await.expect("the shadow");
    assert_eq!(delivery.kind(), 3, "{delivery:?}");
    assert!(delivery.body.ends_with(shadow), "{delivery:?}");
    assert!(
        delivery
            .body
            .windows(reply.len())
            .any(|w| w == reply.as_bytes()),
        "{delivery:?}"
    );
    site.stop().await;
}
