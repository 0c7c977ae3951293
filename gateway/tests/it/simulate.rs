//! `sitegate simulate` against a live gateway: a fleet with misbehaving devices approved in a
//! batch, a fleet left pending, and a reconnect storm; the gateway's Prometheus metrics agree
//! with what the fleet saw.

use crate::common;

use std::path::Path;

use common::{simulate, Site};
use sitegate::config::RouteConfig;
use sitegate::ops::prometheus::{scrape, value_of};
use sitegate_plugins::file::{FileConfig, DEFAULT_KEEP, DEFAULT_ROTATE_BYTES};
use sitegate_plugins::SinkConfig;

async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

fn file_sink(path: &Path) -> SinkConfig {
    SinkConfig::File(FileConfig {
        path: path.to_path_buf(),
        rotate_bytes: sitegate_plugins::ByteSize(DEFAULT_ROTATE_BYTES),
        keep: DEFAULT_KEEP,
        fsync: true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_fleet_with_misbehaving_devices_and_the_metrics_agree() {
    let site = Site::start_with(|c| {
        c.sinks.insert(
            "archive".into(),
            file_sink(&c.data_dir.join("archive.jsonl")),
        );
        c.routes.insert(
            "telemetry".into(),
            RouteConfig {
                from: "dt/#".into(),
                to: "archive".into(),
            },
        );
    })
    .await;
    let s = simulate(
        &site,
        &[
            "--devices",
            "40",
            "--rate",
            "400",
            "--duration",
            "4",
            "--prefix",
            "sensor",
            "--profile",
            "mixed",
            "--misbehaving",
            "4",
            "--approve-as",
            "sensors",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(s.connected, 40, "{s:?}");
    assert!(s.acknowledged > 500, "{s:?}");
    // Forbidden topics are refused by policy with an MQTT 5 reason code...
    assert!(s.denied > 0, "{s:?}");
    // ...and oversize payloads cost the sender its connection (refused by the client against
    // the gateway's advertised maximum packet size, or closed by the gateway).
    assert!(s.errors > 0 && s.reconnects > 0, "{s:?}");
    assert!(
        s.latency.samples > 0 && s.latency.p50_ms <= s.latency.p99_ms,
        "{s:?}"
    );

    let stats = site.snapshot();
    assert_eq!(stats.publishes_denied, s.denied, "{stats:?} {s:?}");
    // Bad JSON is still accepted by the edge (no rule reads it here), so it is acknowledged.
    // Acknowledged publishes were accepted; resends after a dropped link may add a few more.
    assert!(stats.messages_in_qos1 >= s.acknowledged, "{stats:?} {s:?}");

    let text = scrape(site.metrics).await.unwrap();
    let get =
        |series: &str| value_of(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    let live = site.snapshot();
    assert_eq!(
        get("sitegate_messages_in_total{qos=\"1\"}"),
        live.messages_in_qos1 as f64
    );
    assert_eq!(
        get("sitegate_denied_total{reason=\"publish_not_allowed\"}"),
        live.publishes_denied as f64
    );
    assert_eq!(
        get("sitegate_connections_accepted_total"),
        live.connections_accepted as f64
    );
    assert!(get("sitegate_receive_to_durable_seconds_count") >= s.acknowledged as f64);
    assert!(get("sitegate_sink_records_sent_total{sink=\"archive\"}") > 0.0);
    assert!(value_of(&text, "sitegate_spool_records{sink=\"archive\"}").is_some());
    assert!(text.contains("sitegate_receive_to_sink_ack_seconds_bucket{sink=\"archive\""));
    for (request, status) in [
        ("GET /nope HTTP/1.1\r\n\r\n", "404"),
        ("POST /metrics HTTP/1.1\r\n\r\n", "405"),
    ] {
        assert!(http(site.metrics, request)
            .await
            .starts_with(&format!("HTTP/1.1 {status}")));
    }
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_nobody_approved_can_do_nothing() {
    let site = Site::start().await;
    let s = simulate(
        &site,
        &[
            "--devices",
            "5",
            "--rate",
            "50",
            "--duration",
            "2",
            "--prefix",
            "sensor",
            "--profile",
            "door",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(s.connected, 5, "{s:?}");
    assert_eq!(s.acknowledged, 0, "{s:?}");
    assert!(s.denied >= 50, "{s:?}");
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_comes_back_and_kept_devices_are_served() {
    // The gateway runs in this process: one descriptor per connection, old and new.
    sitegate::daemon::raise_fd_limit();
    let site = Site::start().await;
    let s = simulate(
        &site,
        &[
            "--devices",
            "300",
            "--rate",
            "2000",
            "--duration",
            "2",
            "--prefix",
            "sensor",
            "--profile",
            "thermostat",
            "--approve-as",
            "sensors",
            "--storm",
            "--storm-keep",
            "20",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(s.connected, 300, "{s:?}");
    let storm = s.storm.clone().expect("storm summary");
    assert_eq!(storm.dropped, 280, "{s:?}");
    assert_eq!(storm.reconnected, 280, "{s:?}");
    assert!(
        storm.all_back_s > 0.0 && storm.handshakes_per_s > 0.0,
        "{s:?}"
    );
    assert!(storm.kept_before.samples > 0, "{s:?}");
    assert!(
        storm.kept_during.samples > 0,
        "kept devices were served during the storm: {s:?}"
    );
    assert!(site.snapshot().connections_accepted >= 580);
    site.stop().await;
}
