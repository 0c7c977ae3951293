//! Running as a Greengrass component: the checked-in recipe is what the binary generates; the
//! gateway reads its configuration as the recipe passes it, takes its site from
//! AWS_IOT_THING_NAME, keeps data under the work folder, signs AWS calls with credentials from
//! the token exchange service's container endpoint, and stops cleanly on SIGTERM.

use crate::common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::aws::{read_http_request, Moto, Sniffer};
use sitegate::identity::pki;
use sitegate::ops::admin::{self, AdminRequest, AdminResponse};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;

fn sitegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sitegate"))
}

#[tokio::test]
async fn the_checked_in_recipe_is_the_generated_one() {
    let version = env!("CARGO_PKG_VERSION");
    let uri = format!("s3://YOUR-BUCKET/sitegate/{version}/sitegate-{{arch}}");
    let out = sitegate()
        .args(["greengrass", "recipe", "--artifact-uri", &uri])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/greengrass/recipe.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        checked_in, generated,
        "gateway/greengrass/recipe.yaml is stale: regenerate with `sitegate greengrass recipe --artifact-uri '{uri}' > gateway/greengrass/recipe.yaml`"
    );
    let recipe: serde_yaml::Value = serde_yaml::from_str(&checked_in).unwrap();
    assert_eq!(recipe["RecipeFormatVersion"].as_str(), Some("2020-01-25"));
    assert_eq!(recipe["ComponentVersion"].as_str(), Some(version));
    let archs: Vec<&str> = recipe["Manifests"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["Platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, vec!["amd64", "aarch64"]);
}

/// Serves credentials the way the token exchange service's container endpoint does, to
/// callers that present `token`; counts the calls it answered.
async fn token_exchange_service(token: &'static str) -> (String, Arc<Mutex<u32>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!(
        "http://{}/2016-11-01/credentialprovider/",
        listener.local_addr().unwrap()
    );
    let served: Arc<Mutex<u32>> = Arc::default();
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, _)) = read_http_request(&mut socket, &mut buf).await {
                    let authorized = head.lines().any(|l| {
                        l.to_ascii_lowercase().starts_with("authorization:")
                            && l.trim_end().ends_with(token)
                    });
                    let (status, body) = if authorized {
                        *count.lock().unwrap() += 1;
                        (
                            "200 OK",
                            r#"{"AccessKeyId":"ASIATESCREDS0001","SecretAccessKey":"tes-secret","Token":"tes-session-token","Expiration":"2099-01-01T00:00:00Z"}"#,
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            r#"{"message":"missing or wrong token"}"#,
                        )
                    };
                    let reply = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (uri, served)
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_from_the_component_configuration_with_token_exchange_credentials() {
    let moto = Moto::start().await;
    moto.create_stream("site-telemetry", 1).await;
    let sniffer = Sniffer::start(&moto.endpoint).await;
    let (tes_uri, tes_calls) = token_exchange_service("tes-auth-token").await;

    // The component's work folder, as the recipe's Install step leaves it.
    let work = tempfile::tempdir().unwrap();
    let install = sitegate()
        .args(["ca", "init", "--if-missing", "--site", "hub-7", "--dir"])
        .arg(work.path().join("pki"))
        .output()
        .await
        .unwrap();
    assert!(install.status.success(), "{}", common::text(&install));
    let again = sitegate()
        .args(["ca", "init", "--if-missing", "--dir"])
        .arg(work.path().join("pki"))
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    let sensor = pki::issue_device(
        "sensor-1",
        &work.path().join("pki"),
        &work.path().join("devices"),
        30,
    )
    .unwrap();

    // The recipe's default configuration, merged with a deployment's sinks, routes and auth.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = serde_json::to_value(sitegate::control::greengrass::default_config()).unwrap();
    config["listener"]["mqtts"] = format!("127.0.0.1:{port}").into();
    config["sinks"] = serde_json::json!({"telemetry": {"type": "kinesis", "stream": "site-telemetry", "endpoint": sniffer.endpoint()}});
    config["routes"] = serde_json::json!({"raw": {"from": "dt/#", "to": "telemetry"}});
    config["auth"] = serde_json::json!({
        "device_groups": {"sensors": {"selection_rule": "thingName: sensor-*", "policy": "telemetry"}},
        "policies": {"telemetry": {"all": {"operations": ["mqtt:connect", "mqtt:publish"], "resources": ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#"]}}}
    });
    // The nucleus: the recipe's default turns on IPC, so sitegate connects and follows updates.
    let nucleus = sitegate_plugins::nucleus::standin::StandIn::start(
        &work.path().join("ipc.socket"),
        "svcuid-hub-7",
        sitegate::control::greengrass::COMPONENT_NAME,
        serde_json::json!({ "sitegate": config.clone() }),
    )
    .unwrap();
    let mut child = sitegate()
        .args(["run", "--config-env", "--base-dir"])
        .arg(work.path())
        .env(
            sitegate::control::greengrass::CONFIG_ENV,
            config.to_string(),
        )
        .env(sitegate_plugins::nucleus::SOCKET_ENV, nucleus.socket())
        .env(sitegate_plugins::nucleus::SVCUID_ENV, "svcuid-hub-7")
        .env("AWS_IOT_THING_NAME", "hub-7")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &tes_uri)
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN", "tes-auth-token")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("RUST_LOG", "info,sled=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let socket = work.path().join("data/admin.sock");
    for _ in 0..200 {
        if socket.exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let approved = admin::request(
        &socket,
        &AdminRequest::Approve {
            cert: None,
            thing: "sensor-1".into(),
            groups: vec![],
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(approved, AdminResponse::Device { .. }),
        "{approved:?}"
    );
    // One QoS 1 reading from sensor-1, with mosquitto_pub.
    let publish = |body: String| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
            .arg(work.path().join("pki/ca.pem"))
            .arg("--cert")
            .arg(&sensor.cert)
            .arg("--key")
            .arg(&sensor.key)
            .args(["-i", "sensor-1", "-t", "dt/sensor-1/temp", "-q", "1", "-m"])
            .arg(body);
        async move {
            let out = cmd.output().await.unwrap();
            assert!(out.status.success(), "{}", common::text(&out));
        }
    };
    publish(r#"{"t":4.5}"#.to_string()).await;

    let mut records = Vec::new();
    for _ in 0..100 {
        records = moto.read_stream("site-telemetry").await;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(records.len(), 1);
    let envelope: serde_json::Value = serde_json::from_slice(&records[0].data).unwrap();
    assert_eq!(
        envelope["site"], "hub-7",
        "site defaults to the Greengrass thing name"
    );
    assert_eq!(envelope["thing_name"], "sensor-1");
    assert!(
        *tes_calls.lock().unwrap() >= 1,
        "credentials came from the container endpoint"
    );
    let heads = sniffer.heads.lock().unwrap().clone();
    assert!(
        heads
            .iter()
            .any(|h| h.contains("Credential=ASIATESCREDS0001/")
                && h.to_ascii_lowercase()
                    .contains("x-amz-security-token: tes-session-token")),
        "Kinesis call signed with the token exchange credentials: {heads:?}"
    );
    assert!(
        work.path().join("data/db").exists(),
        "state lives under the work folder"
    );
    assert_eq!(
        nucleus.connections(),
        (1, 0),
        "one IPC connection, SVCUID accepted"
    );

    // A deployment adds a file sink and a route to it; the relative path lands in the work folder.
    nucleus.set_configuration(
        &["sitegate", "sinks", "copy"],
        serde_json::json!({"type": "file", "path": "out/copy.jsonl"}),
    );
    nucleus.set_configuration(
        &["sitegate", "routes", "copy"],
        serde_json::json!({"from": "dt/#", "to": "copy"}),
    );
    let copy = work.path().join("out/copy.jsonl");
    let mut lines = Vec::new();
    for attempt in 0..100 {
        // Publish until the route is live (the update applies a few hundred ms after the events).
        publish(format!(r#"{{"t":5,"n":{attempt}}}"#)).await;
        lines = common::sink_lines(&copy);
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["thing_name"], "sensor-1");

    // Greengrass stops a component with SIGTERM: it must exit 0, promptly.
    let started = Instant::now();
    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exit within 15 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    println!("stopped {:?} after SIGTERM", started.elapsed());
}

mod ipc {
    //! `[greengrass] ipc = true` against a nucleus stand-in that speaks the published protocol:
    //! configuration updates apply live while a device stays connected, bad ones are refused
    //! with the running configuration kept, and an `iotcore` sink publishes through the nucleus.
    use super::common::{self, Site};
    use rumqttc::{Event, Outgoing, Packet, QoS};
    use serde_json::{json, Value};
    use sitegate::ops::admin::{AdminRequest, AdminResponse};
    use sitegate_plugins::nucleus::{standin::StandIn, Nucleus};
    use std::sync::Arc;
    use std::time::Duration;

    const SVCUID: &str = "test-svcuid";

    /// A device that stays connected and publishes on demand, counting its PUBACKs.
    struct Device {
        client: rumqttc::AsyncClient,
        acked: Arc<std::sync::atomic::AtomicUsize>,
        reconnects: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Device {
        async fn connect(site: &Site, thing: &str) -> Device {
            let issued = site.device(thing).await;
            let opts = site
                .credentials(&issued)
                .mqtt_options(site.addr, Duration::from_secs(30))
                .unwrap();
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
            let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let reconnects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (a, r) = (acked.clone(), reconnects.clone());
            tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
            Device {
                client,
                acked,
                reconnects,
            }
        }

        /// Publishes and waits for the PUBACK.
        async fn publish(&self, topic: &str, body: Value) {
            let before = self.acked.load(std::sync::atomic::Ordering::SeqCst);
            self.client
                .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                .await
                .unwrap();
            for _ in 0..200 {
                if self.acked.load(std::sync::atomic::Ordering::SeqCst) > before {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("no PUBACK for {topic}");
        }
    }

    async fn rules_report(site: &Site) -> sitegate::pipeline::RulesReport {
        match site.admin(AdminRequest::RulesStatus).await {
            AdminResponse::Rules { rules } => rules,
            other => panic!("{other:?}"),
        }
    }

    async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..400 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn configuration_updates_from_the_nucleus_apply_live_and_iotcore_publishes_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nucleus.socket");
        // The stand-in holds the component configuration; it is filled in once the site's
        // paths are known.
        let standin = StandIn::start(&socket, SVCUID, "io.sitegate.Gateway", json!({})).unwrap();
        let nucleus = Arc::new(Nucleus::connect(&socket, SVCUID).await.unwrap());
        let site = Site::start_with_nucleus(
            |c| {
                c.greengrass.ipc = true;
                c.sinks.insert(
                    "archive".into(),
                    serde_json::from_value(
                        json!({"type": "file", "path": c.data_dir.join("../out/archive.jsonl")}),
                    )
                    .unwrap(),
                );
                c.routes.insert(
                    "all".into(),
                    serde_json::from_value(json!({"from": "dt/#", "to": "archive"})).unwrap(),
                );
            },
            Some(nucleus),
        )
        .await;
        let initial = serde_json::to_value(&site.config).unwrap();
        standin.set_configuration(&["sitegate"], initial.clone());
        let archive = site.dir.path().join("out/archive.jsonl");
        let device = Device::connect(&site, "sensor-1").await;
        device
            .publish("dt/sensor-1/temp", json!({"temp": 21}))
            .await;
        common::wait_lines(&archive, 1).await;
        let applied = || site.snapshot().config_updates_applied;
        let refused = || site.snapshot().config_updates_refused;

        // A deployment adds an iotcore sink through the nucleus and an inline rule feeding it.
        standin.set_configuration(
            &["sitegate", "sinks", "cloud"],
            json!({"type": "iotcore", "via": "nucleus"}),
        );
        standin.set_configuration(
            &["sitegate", "rules", "sql"],
            json!({"hot": "INSERT INTO cloud SELECT thing_name() AS thing, temp FROM 'dt/+/temp' WHERE temp > 30"}),
        );
        wait_until("the update to apply", || applied() >= 1).await;
        assert!(site.live().running().await.rules.sql.contains_key("hot"));
        assert!(rules_report(&site)
            .await
            .rules
            .iter()
            .any(|r| r.name == "hot"));
        device
            .publish("dt/sensor-1/temp", json!({"temp": 35}))
            .await;
        device
            .publish("dt/sensor-1/temp", json!({"temp": 20}))
            .await;
        wait_until("a publish through the nucleus", || {
            !standin.published().is_empty()
        })
        .await;
        let published = standin.published();
        assert_eq!(published[0].topic, "sitegate/test/sensor-1/hot");
        assert!(published[0]
            .user_properties
            .contains(&("thing-name".into(), "sensor-1".into())));
        let body: Value = serde_json::from_slice(&published[0].payload).unwrap();
        assert_eq!(body["payload"]["temp"], 35, "{body}");
        assert_eq!(body["thing_name"], "sensor-1", "{body}");
        common::wait_lines(&archive, 3).await;

        // A rule with bad SQL is refused by name; everything else keeps running.
        standin.set_configuration(
            &["sitegate", "rules", "sql", "broken"],
            json!("SELEC temp FRUM"),
        );
        let mut report = rules_report(&site).await;
        for _ in 0..100 {
            if report.refused.contains_key("broken") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            report = rules_report(&site).await;
        }
        assert!(
            report.refused["broken"].contains("rules.sql.broken"),
            "{report:?}"
        );
        assert!(report.rules.iter().any(|r| r.name == "hot"), "{report:?}");

        // An invalid configuration is refused as a whole; the running one stays.
        let before = refused();
        standin.set_configuration(&["sitegate", "sinks", "cloud", "via"], json!("pigeon"));
        wait_until("the invalid update to be refused", || refused() > before).await;
        device
            .publish("dt/sensor-1/temp", json!({"temp": 40}))
            .await;
        wait_until("the rule to still publish", || {
            standin.published().len() == 2
        })
        .await;

        // Removing the sink while the rule still writes to it is refused…
        let before = refused();
        let mut without_cloud = initial.clone();
        without_cloud["rules"]["sql"] =
            json!({"hot": "INSERT INTO cloud SELECT temp FROM 'dt/+/temp'"});
        standin.set_configuration(&["sitegate"], without_cloud);
        wait_until("the sink removal to be refused", || refused() > before).await;
        // …and applied when the rule goes in the same update.
        let applied_before = applied();
        standin.set_configuration(&["sitegate"], initial.clone());
        wait_until("the removal to apply", || applied() > applied_before).await;
        device
            .publish("dt/sensor-1/temp", json!({"temp": 50}))
            .await;
        common::wait_lines(&archive, 5).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            standin.published().len(),
            2,
            "the removed rule and sink stay gone"
        );
        assert!(rules_report(&site).await.rules.is_empty());

        // The device never had to reconnect, and every message reached the archive.
        assert_eq!(
            device.reconnects.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(site.snapshot().connections_accepted, 1);
        assert_eq!(common::sink_lines(&archive).len(), 5);
        site.stop().await;
    }
}
