//! The IoT Core sink against a real Mosquitto broker standing in for IoT Core: mutual TLS,
//! `require_certificate`, `use_identity_as_username`. A `mosquitto_sub` in MQTT 5 prints each
//! record's user properties; stopping and restarting the broker loses nothing.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{collect, text, Site};
use sitegate::config::RouteConfig;
use sitegate::identity::pki::{self, IssuedDevice};
use sitegate_plugins::iotcore::IotCoreConfig;
use sitegate_plugins::SinkConfig;
use tokio::process::{Child, Command};

/// The "cloud": a Mosquitto with its own CA, as IoT Core has Amazon's.
pub(crate) struct Cloud {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    broker: Option<Child>,
}

fn mosquitto_binary() -> String {
    for candidate in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "mosquitto".into()
}

impl Cloud {
    pub(crate) async fn start(dir: &Path) -> Cloud {
        let pki_dir = dir.join("cloud-pki");
        pki::init_ca(&pki_dir, "cloud", &[]).unwrap();
        std::fs::create_dir_all(dir.join("mosquitto")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = format!(
            "listener {port} 127.0.0.1\n\
             cafile {p}/ca.pem\ncertfile {p}/gateway.pem\nkeyfile {p}/gateway.key\n\
             require_certificate true\nuse_identity_as_username true\nallow_anonymous true\n\
             persistence true\npersistence_location {d}/\n\
             user root\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            p = pki_dir.display(),
            d = dir.join("mosquitto").display(),
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let mut cloud = Cloud {
            dir: dir.to_path_buf(),
            port,
            broker: None,
        };
        cloud.restart().await;
        cloud
    }

    pub(crate) async fn restart(&mut self) {
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto runs (apt-get install mosquitto)");
        self.broker = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mosquitto did not listen on {}", self.port);
    }

    /// SIGTERM, so Mosquitto saves its persistent sessions, then wait for it.
    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.broker.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// A gateway whose `cloud` sink publishes here as `identity`, with `dt/#` routed to it.
    async fn site(&self, identity: &IssuedDevice, adjust: impl FnOnce(&mut IotCoreConfig)) -> Site {
        let mut sink = self.sink(identity);
        adjust(&mut sink);
        Site::start_with(|c| {
            c.sinks.insert("cloud".into(), SinkConfig::Iotcore(sink));
            c.routes.insert(
                "raw".into(),
                RouteConfig {
                    from: "dt/#".into(),
                    to: "cloud".into(),
                },
            );
        })
        .await
    }

    /// An `iotcore` sink publishing here as `identity`, client id `plant-7-gateway`.
    pub(crate) fn sink(&self, identity: &IssuedDevice) -> IotCoreConfig {
        let mut sink = IotCoreConfig::new(
            &format!("127.0.0.1:{}", self.port),
            identity.cert.clone(),
            identity.key.clone(),
            self.dir.join("cloud-pki/ca.pem"),
        );
        sink.client_id = Some("plant-7-gateway".into());
        sink
    }

    /// The mosquitto clients' arguments to reach this broker as `identity`.
    pub(crate) fn client_args(&self, identity: &IssuedDevice, client_id: &str) -> Vec<String> {
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "--cafile".into(),
            self.dir.join("cloud-pki/ca.pem").display().to_string(),
            "--cert".into(),
            identity.cert.display().to_string(),
            "--key".into(),
            identity.key.display().to_string(),
            "-i".into(),
            client_id.into(),
            "-V".into(),
            "mqttv5".into(),
        ]
    }

    pub(crate) fn issue(&self, name: &str) -> IssuedDevice {
        pki::issue_device(
            name,
            &self.dir.join("cloud-pki"),
            &self.dir.join("cloud-clients"),
            30,
        )
        .unwrap()
    }

    /// A persistent MQTT 5 reader of `sitegate/#` printing `topic|user properties|payload`.
    fn reader(&self, reader: &IssuedDevice) -> Child {
        // Line-buffered, so that what it printed is all there when it is stopped.
        Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cafile")
            .arg(self.dir.join("cloud-pki/ca.pem"))
            .arg("--cert")
            .arg(&reader.cert)
            .arg("--key")
            .arg(&reader.key)
            .args([
                "-i",
                "cloud-reader",
                "-c",
                "-x",
                "3600",
                "-q",
                "1",
                "-V",
                "mqttv5",
                "-t",
                "sitegate/#",
                "-F",
                "%t|%P|%p",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub runs (apt-get install mosquitto-clients)")
    }
}

async fn read_until(child: Child, lines: usize, limit: Duration) -> Vec<String> {
    // mosquitto_sub -C N exits after N messages; without it, collect until the limit.
    let out = collect(child, limit).await;
    let got: Vec<String> = out.lines().map(str::to_string).collect();
    assert!(got.len() >= lines, "expected {lines} lines, got {got:?}");
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn records_reach_the_broker_with_identity_and_survive_a_broker_restart() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(cloud_dir.path()).await;
    let gateway_identity = cloud.issue("plant-7-gateway");
    let reader_identity = cloud.issue("cloud-reader");
    // Subscribe once so the broker keeps the reader's session (and queues for it) from now on.
    let reader = cloud.reader(&reader_identity);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let site = cloud.site(&gateway_identity, |_| {}).await;
    let sensor = site.device("sensor-1").await;
    for n in 0..2 {
        let o = site
            .publish(
                &sensor,
                "dt/sensor-1/temp",
                &format!(r#"{{"n":{n}}}"#),
                1,
                false,
            )
            .await;
        assert!(o.status.success(), "{}", text(&o));
    }
    let lines = read_until(reader, 2, Duration::from_secs(3)).await;
    for (n, line) in lines.iter().enumerate() {
        let mut parts = line.splitn(3, '|');
        let (topic, props, payload) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert_eq!(topic, "sitegate/test/sensor-1/raw");
        assert!(
            props.contains("thing-name") && props.contains("sensor-1"),
            "{props}"
        );
        assert!(
            props.contains("cert-id") && props.contains(&sensor.cert_id),
            "{props}"
        );
        assert!(
            props.contains("source-topic") && props.contains("dt/sensor-1/temp"),
            "{props}"
        );
        assert!(props.contains("record-id"), "{props}");
        let body: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(body["payload"]["n"], n);
        assert_eq!(body["thing_name"], "sensor-1");
        assert_eq!(body["cert_id"], sensor.cert_id);
    }

    // The cloud goes away: records wait in the spool.
    cloud.stop().await;
    for n in 2..5 {
        let o = site
            .publish(
                &sensor,
                "dt/sensor-1/temp",
                &format!(r#"{{"n":{n}}}"#),
                1,
                true,
            )
            .await;
        assert!(o.status.success(), "{}", text(&o));
    }
    site.wait_for("a failed send while the broker is down", |s| {
        s.sink_send_failures > 0
    })
    .await;
    assert!(site.spool_status().await.queues[0].records > 0);
    // A ten-second outage: long enough for the drain's backoff to reach its cap.
    tokio::time::sleep(Duration::from_secs(10)).await;

    // Back: the broker restores the reader's session and queues what the sink now delivers.
    cloud.restart().await;
    let back = std::time::Instant::now();
    for _ in 0..300 {
        if site.spool_status().await.queues[0].records == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A figure for the record, not a bound: the backoff cap is BACKOFF_MAX.
    println!(
        "IoT Core sink drained {:?} after the broker returned from a 10 s outage (backoff cap {:?})",
        back.elapsed(),
        sitegate::delivery::drain::BACKOFF_MAX
    );
    assert_eq!(
        site.spool_status().await.queues[0].records,
        0,
        "drained after the broker came back"
    );
    let lines = read_until(cloud.reader(&reader_identity), 3, Duration::from_secs(3)).await;
    let ns: Vec<u64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l.splitn(3, '|').nth(2).unwrap()).unwrap()
                ["payload"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut distinct = ns.clone();
    distinct.dedup();
    assert_eq!(distinct, vec![2, 3, 4], "in order, nothing lost: {ns:?}");
    cloud.stop().await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batched_publishes_carry_many_records_each_so_the_publish_rate_does_not_bound_throughput() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(cloud_dir.path()).await;
    let gateway_identity = cloud.issue("plant-7-gateway");
    let reader_identity = cloud.issue("cloud-reader");
    // A rumqttc reader: it hands over each publish whole, however large.
    let reader_creds = sitegate::fleet::DeviceCredentials::load(
        "cloud-reader",
        &cloud_dir.path().join("cloud-pki/ca.pem"),
        &reader_identity.cert,
        &reader_identity.key,
    )
    .unwrap();
    let mut reader_opts = reader_creds
        .mqtt_options(
            format!("127.0.0.1:{}", cloud.port).parse().unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    // Batched publishes are larger than rumqttc's 10 KiB default.
    reader_opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (reader, mut reader_events) = rumqttc::AsyncClient::new(reader_opts, 100);
    reader
        .subscribe("sitegate/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let received = tokio::spawn(async move {
        let mut got: Vec<(String, bytes::Bytes)> = Vec::new();
        while let Ok(Ok(event)) =
            tokio::time::timeout(Duration::from_secs(10), reader_events.poll()).await
        {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                got.push((p.topic.clone(), p.payload.clone()));
                let records: usize = got
                    .iter()
                    .map(|(_, b)| {
                        serde_json::from_slice::<serde_json::Value>(b)
                            .map(|v| v.as_array().map_or(0, Vec::len))
                            .unwrap_or(0)
                    })
                    .sum();
                if records >= 300 {
                    break;
                }
            }
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let site = cloud
        .site(&gateway_identity, |sink| {
            // Five publishes a second: one record each would take a minute for 300.
            sink.max_publish_rate = 5;
            sink.batch_records = 100;
        })
        .await;
    let sensor = site.device("sensor-1").await;
    let creds = site.credentials(&sensor);
    let opts = creds
        .mqtt_options(site.addr, Duration::from_secs(30))
        .unwrap();
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 400);
    for n in 0..300u64 {
        client
            .publish(
                "dt/sensor-1/temp",
                rumqttc::QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{n}}}"#),
            )
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < 300 {
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("publishing stopped: {other:?}"),
        }
    }
    let mut ns = Vec::new();
    let mut publishes = 0;
    for (topic, payload) in received.await.unwrap() {
        assert_eq!(topic, "sitegate/test/sensor-1/raw");
        let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        for envelope in body.as_array().unwrap() {
            assert_eq!(envelope["thing_name"], "sensor-1");
            assert_eq!(envelope["cert_id"], sensor.cert_id);
            ns.push(envelope["payload"]["n"].as_u64().unwrap());
        }
        publishes += 1;
    }
    println!("300 records in {publishes} publishes");
    assert_eq!(
        ns,
        (0..300).collect::<Vec<_>>(),
        "every record once, in order"
    );
    assert!(
        publishes < 300 / 2,
        "records were not batched: {publishes} publishes"
    );
    cloud.stop().await;
    site.stop().await;
}
