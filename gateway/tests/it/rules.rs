//! SQL rules in a running gateway: rule output reaches its sink with the device's identity,
//! edits apply live without losing messages, a broken file is refused with its line and column
//! while the old version keeps running, and undecodable payloads go to the error sink. Also
//! `sitegate rules check` and `sitegate rules test`.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{text, wait_lines, Site};
use sitegate::ops::admin::{AdminRequest, AdminResponse};
use sitegate::pipeline::RulesReport;
use sitegate_plugins::file::FileConfig;
use sitegate_plugins::{ByteSize, SinkConfig};

fn file_sink(path: PathBuf) -> SinkConfig {
    SinkConfig::File(FileConfig {
        path,
        rotate_bytes: ByteSize(64 << 20),
        keep: 1,
        fsync: true,
    })
}

fn root(config: &sitegate::Config) -> PathBuf {
    config.data_dir.parent().unwrap().to_path_buf()
}

/// Writes rule `name` into the site's rules folder and points `[rules] dir` at it.
fn rule_file(config: &mut sitegate::Config, name: &str, sql: &str) {
    let dir = root(config).join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.sql")), sql).unwrap();
    config.rules.dir = Some(dir);
}

async fn report(site: &Site) -> RulesReport {
    match site.admin(AdminRequest::RulesStatus).await {
        AdminResponse::Rules { rules } => rules,
        other => panic!("{other:?}"),
    }
}

async fn wait_until<F: Fn(&RulesReport) -> bool>(site: &Site, what: &str, check: F) -> RulesReport {
    for _ in 0..60 {
        let r = report(site).await;
        if check(&r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}: {:?}", report(site).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_run_reload_live_and_refuse_broken_files() {
    let site = Site::start_with(|c| {
        let root = root(c);
        rule_file(
            c,
            "alerts",
            "INSERT INTO alerts\nSELECT thing_name() AS thing, temp, topic(3) AS kind\nFROM 'dt/+/temp'\nWHERE temp > 0\n",
        );
        c.rules.error_sink = Some("errors".into());
        c.sinks.insert("alerts".into(), file_sink(root.join("out/alerts.jsonl")));
        c.sinks.insert("errors".into(), file_sink(root.join("out/errors.jsonl")));
    })
    .await;
    let root = root(&site.config);
    let alerts = root.join("out/alerts.jsonl");
    let sensor = site.device("sensor-1").await;
    let publish = |payload: &'static str| {
        let site = &site;
        let sensor = &sensor;
        async move {
            let o = site
                .publish(sensor, "dt/sensor-1/temp", payload, 1, false)
                .await;
            assert!(o.status.success(), "{}", text(&o));
        }
    };
    wait_until(&site, "the rule to load", |r| {
        r.rules.iter().any(|r| r.name == "alerts")
    })
    .await;
    publish(r#"{"temp":5}"#).await;
    publish(r#"{"temp":-5}"#).await;
    let lines = wait_lines(&alerts, 1).await;
    assert_eq!(
        lines[0]["payload"],
        serde_json::json!({"thing":"sensor-1","temp":5,"kind":"temp"})
    );
    assert_eq!(lines[0]["thing_name"], "sensor-1");
    assert_eq!(lines[0]["cert_id"], sensor.cert_id);
    assert_eq!(lines[0]["rule"], "alerts");

    // Edit: applies within a second, no restart.
    std::fs::write(
        root.join("rules/alerts.sql"),
        "INSERT INTO alerts SELECT temp * 10 AS deci FROM 'dt/+/temp' WHERE temp > 10",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    publish(r#"{"temp":7}"#).await;
    publish(r#"{"temp":12}"#).await;
    let lines = wait_lines(&alerts, 2).await;
    assert_eq!(lines[1]["payload"], serde_json::json!({"deci":120}));

    // A broken edit is refused with file, line and column; the running version stays.
    std::fs::write(
        root.join("rules/alerts.sql"),
        "INSERT INTO alerts\nSELECT temp\nFROM dt/+/temp",
    )
    .unwrap();
    let r = wait_until(&site, "the refusal", |r| r.refused.contains_key("alerts")).await;
    let why = &r.refused["alerts"];
    assert!(why.contains("alerts.sql:3:6"), "{why}");
    assert!(why.contains("quoted topic filter"), "{why}");
    publish(r#"{"temp":20}"#).await;
    let lines = wait_lines(&alerts, 3).await;
    assert_eq!(
        lines[2]["payload"],
        serde_json::json!({"deci":200}),
        "the previous version kept running"
    );

    // Undecodable payloads go to the error sink with the reason and the original bytes.
    publish("not json").await;
    let errors = wait_lines(&root.join("out/errors.jsonl"), 1).await;
    let e = &errors[0]["payload"];
    assert_eq!(e["ruleName"], "alerts");
    assert_eq!(e["clientId"], "sensor-1");
    assert_eq!(e["base64OriginalPayload"], "bm90IGpzb24=");
    assert!(e["reason"].as_str().unwrap().contains("not JSON"));

    // Deleting the file removes the rule.
    std::fs::remove_file(root.join("rules/alerts.sql")).unwrap();
    wait_until(&site, "the removal", |r| {
        r.rules.is_empty() && r.refused.is_empty()
    })
    .await;
    assert!(site.snapshot().rule_rows_out >= 4);
    site.stop().await;
}

fn sitegate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn rules_check_lists_errors_and_rules_test_prints_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("good.sql"),
        "INSERT INTO a SELECT temp FROM 'dt/#' WHERE temp > 1",
    )
    .unwrap();
    let ok = sitegate(&["rules", "check", rules.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
    std::fs::write(
        rules.join("bad.sql"),
        "INSERT INTO a\nSELECT nosuchfn(temp) FROM 'dt/#'",
    )
    .unwrap();
    let bad = sitegate(&["rules", "check", rules.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad.sql:2:"), "{err}");
    assert!(err.to_lowercase().contains("nosuchfn"), "{err}");

    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"topic\":\"dt/f-1/t\",\"thing\":\"f-1\",\"payload\":{\"temp\":3},\"ts\":1}\n{\"topic\":\"dt/f-2/t\",\"thing\":\"f-2\",\"payload\":{\"temp\":0},\"ts\":2}\n",
    )
    .unwrap();
    let out = sitegate(&[
        "rules",
        "test",
        rules.join("good.sql").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("sink") && table.contains("temp"), "{table}");
    assert!(table.contains("f-1") && !table.contains("f-2"), "{table}");
    assert!(table.contains("(1 rows)"), "{table}");
}

#[test]
fn the_example_rules_check_against_the_example_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = sitegate(&[
        "rules",
        "check",
        root.join("examples/rules").to_str().unwrap(),
        "--config",
        root.join("examples/sitegate.toml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("freezer_alert.sql: ok") && stdout.contains("freezer_stats.sql: ok"),
        "{stdout}"
    );
}

/// `get_mqtt_property` and `get_user_properties` read what a real MQTT 5 client published
/// with (mosquitto_pub's `-D publish …`, MQTT 5 §3.3.2.3); the gateway's own marks on a
/// publish never show, and a device cannot forge one into a rule's input.
#[tokio::test(flavor = "multi_thread")]
async fn rules_read_the_mqtt5_properties_and_the_address_a_device_published_with() {
    let site = Site::start_with(|c| {
        let root = root(c);
        rule_file(
            c,
            "props",
            "INSERT INTO props SELECT v, get_mqtt_property('content_type') AS ct, \
             get_mqtt_property('format_indicator') AS fmt, \
             get_mqtt_property('response_topic') AS rt, \
             get_mqtt_property('correlation_data') AS cd, \
             get_user_properties('site') AS site, get_user_properties('sitegate:qos0') AS mark, \
             sourceip() AS ip, length(traceid()) AS tl FROM 'dt/+/props'",
        );
        c.sinks
            .insert("props".into(), file_sink(root.join("out/props.jsonl")));
    })
    .await;
    let root = root(&site.config);
    let sensor = site.device("sensor-1").await;
    wait_until(&site, "the rule to load", |r| {
        r.rules.iter().any(|r| r.name == "props")
    })
    .await;
    let d = |p: &'static [&'static str]| p.iter().copied();
    let extra: Vec<&str> = d(&["-D", "publish", "content-type", "application/json"])
        .chain(d(&["-D", "publish", "payload-format-indicator", "1"]))
        .chain(d(&["-D", "publish", "response-topic", "reply/sensor-1"]))
        .chain(d(&["-D", "publish", "correlation-data", "req-1"]))
        .chain(d(&["-D", "publish", "user-property", "site", "north"]))
        .chain(d(&[
            "-D",
            "publish",
            "user-property",
            "sitegate:qos0",
            "forged",
        ]))
        .collect();
    let o = site
        .publish_as(
            &sensor,
            "sensor-1",
            "dt/sensor-1/props",
            r#"{"v":1}"#,
            0,
            true,
            &extra,
        )
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = site
        .publish(&sensor, "dt/sensor-1/props", r#"{"v":2}"#, 1, true)
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let lines = wait_lines(&root.join("out/props.jsonl"), 2).await;
    assert_eq!(
        lines[0]["payload"],
        serde_json::json!({
            "v": 1,
            "ct": "application/json",
            "fmt": "UTF8_DATA",
            "rt": "reply/sensor-1",
            "cd": "cmVxLTE=",
            "site": ["north"],
            "ip": "127.0.0.1",
            "tl": 36
        })
    );
    assert_eq!(
        lines[1]["payload"],
        serde_json::json!({"v": 2, "ip": "127.0.0.1", "tl": 36})
    );
}

/// iot-substitution-templates, with real clients: "an expression in a substitution template is
/// evaluated separately from the SELECT statement … You can only reference information present
/// in the original payload, functions, and operators". A republish sink's topic
/// `status/${upper(zone)}/${topic(2)}` takes `zone` from the device's message although the
/// rule selects only `temp AS t`; mosquitto_sub, as a monitor, gets the record on that topic.
/// A new template applied live is computed by the running rule. The same expression on a
/// route's sink is refused when the config loads
/// (`fixtures/invalid/route-to-sink-with-expression.toml`).
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_template_is_evaluated_against_the_original_message() {
    let site = Site::start_with(|c| {
        rule_file(
            c,
            "sirens",
            "INSERT INTO sirens SELECT temp AS t FROM 'dt/+/freezer' WHERE temp > 0",
        );
        c.sinks.insert(
            "sirens".into(),
            toml::from_str(
                "type = \"republish\"\ntopic = \"status/${upper(zone)}/${topic(2)}\"\nqos = 1",
            )
            .unwrap(),
        );
    })
    .await;
    let sensor = site.device("sensor-1").await;
    let monitor = site.device("monitor-1").await;
    wait_until(&site, "the rule to load", |r| {
        r.rules.iter().any(|r| r.name == "sirens")
    })
    .await;
    // What the monitor, subscribed to `status/#`, gets for one freezer reading.
    let heard = |payload: &'static str| {
        let sub = site.subscribe(&monitor, "status/#", true, &["-C", "1"]);
        crate::edge::publish_until_received(&site, sub, &sensor, "dt/sensor-1/freezer", payload)
    };
    let got = heard(r#"{"temp":5,"zone":"b7"}"#).await;
    assert!(got.contains(r#"status/B7/sensor-1 {"t":5}"#), "{got:?}");
    // A live reconfiguration with another template: the running rule is read again and
    // computes the new template's expressions.
    let mut next = site.config.clone();
    next.sinks.insert(
        "sirens".into(),
        toml::from_str(
            "type = \"republish\"\ntopic = \"status/${lower(zone)}-${temp + 1}\"\nqos = 1",
        )
        .unwrap(),
    );
    site.live().apply(next).await.unwrap();
    let got = heard(r#"{"temp":5,"zone":"B7"}"#).await;
    assert!(got.contains(r#"status/b7-6 {"t":5}"#), "{got:?}");
    site.stop().await;
}
