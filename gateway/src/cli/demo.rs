//! `sitegate demo`: a whole site on one machine, no flags, no AWS account.
//!
//! Makes a CA and device certificates in a temporary data dir, starts the gateway on loopback,
//! approves most of a small fleet, leaves `door-1` pending (then approves it on its live
//! connection halfway through), lets `thermostat-9` try a topic it may not use, and shows
//! connections, accepted and denied messages live before printing a summary. Telemetry is
//! routed into the encrypted spool and out through a file sink, and the spool depth is shown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use sitegate::config::{AuthConfig, Config, ListenerConfig, RouteConfig, RulesConfig};
use sitegate::daemon::{Gateway, Listeners};
use sitegate::fleet::DeviceCredentials;
use sitegate::identity::pki;
use sitegate::ops::admin::{self, AdminRequest, AdminResponse};
use sitegate_plugins::file::{FileConfig, DEFAULT_KEEP, DEFAULT_ROTATE_BYTES};
use sitegate_plugins::kinesis::{KinesisConfig, KinesisSink};
use sitegate_plugins::{ByteSize, SinkConfig};
use tokio::sync::watch;

/// Interval between two telemetry messages of one device.
const SEND_EVERY: Duration = Duration::from_millis(250);

const DEMO_AUTH: &str = r#"
[device_groups.thermostats]
selection_rule = "thingName: thermostat-*"
policy = "telemetry"

[device_groups.controllers]
selection_rule = "thingName: thermostat-1"
policy = "pump-control"

[device_groups.pumps]
selection_rule = "thingName: pump-*"
policy = "pump"

[device_groups.doors]
selection_rule = "thingName: door-*"
policy = "telemetry"

[policies.telemetry.connect]
operations = ["mqtt:connect"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}"]

[policies.telemetry.publish]
operations = ["mqtt:publish"]
resources = ["mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#"]

[policies.pump-control.commands]
description = "thermostat-1 drives the pumps"
operations = ["mqtt:publish"]
resources = ["mqtt:topic:cmd/pump-*"]

[policies.pump.connect]
operations = ["mqtt:connect"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}"]

[policies.pump.commands]
operations = ["mqtt:subscribe"]
resources = ["mqtt:topicfilter:cmd/${iot:Connection.Thing.ThingName}/#"]
"#;

/// What one virtual device does.
struct Plan {
    thing: &'static str,
    /// Approved at start (door-1 is not).
    approved: bool,
    /// Topics published in turn.
    publishes: &'static [&'static str],
    subscribes: Option<&'static str>,
}

const FLEET: &[Plan] = &[
    Plan {
        thing: "thermostat-1",
        approved: true,
        publishes: &["dt/thermostat-1/temp", "cmd/pump-1/speed"],
        subscribes: None,
    },
    Plan {
        thing: "thermostat-2",
        approved: true,
        publishes: &["dt/thermostat-2/temp"],
        subscribes: None,
    },
    Plan {
        thing: "thermostat-3",
        approved: true,
        publishes: &["dt/thermostat-3/temp"],
        subscribes: None,
    },
    Plan {
        thing: "pump-1",
        approved: true,
        publishes: &[],
        subscribes: Some("cmd/pump-1/#"),
    },
    // Approved, but tries to speak for thermostat-1 half the time: denied by policy.
    Plan {
        thing: "thermostat-9",
        approved: true,
        publishes: &["dt/thermostat-9/temp", "dt/thermostat-1/temp"],
        subscribes: None,
    },
    // Never approved at start: only its provisioning topic works until it is approved live.
    Plan {
        thing: "door-1",
        approved: false,
        publishes: &["$sitegate/provisioning/door-1", "dt/door-1/state"],
        subscribes: None,
    },
];

#[derive(Default)]
struct DeviceCounters {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
}

/// The demo's two rules: a filter, and a tumbling average per device. The window is 5 seconds
/// (not the example's minute) so it closes while the demo runs.
const DEMO_RULES: [(&str, &str); 2] = [
    (
        "warm_thermostats",
        "-- Readings above 23 °C, with the device's identity.\nINSERT INTO alerts\nSELECT thing_name() AS thing, temp, topic(3) AS kind\nFROM 'dt/+/temp'\nWHERE temp > 23\n",
    ),
    (
        "average_temp",
        "-- Average per thermostat over tumbling 5-second windows.\nINSERT INTO averages\nSELECT thing_name() AS thing, count(*) AS readings, avg(temp) AS avg_temp\nFROM 'dt/+/temp'\nGROUP BY thing_name(), TUMBLE(INTERVAL '5' SECOND)\n",
    ),
];

/// Stream the demo creates on `--kinesis-endpoint`.
const DEMO_STREAM: &str = "sitegate-demo";

/// `sitegate demo`: a CA, a gateway and a small fleet in one process.
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How long the fleet runs before the summary (Ctrl-C stops earlier).
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Also send telemetry to Kinesis at this endpoint (an emulator such as
    /// http://127.0.0.1:5000); the stream `sitegate-demo` is created if missing.
    #[arg(long)]
    kinesis_endpoint: Option<String>,
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    super::init_logging("warn");
    super::runtime()?.block_on(demo(
        Duration::from_secs(args.seconds),
        args.kinesis_endpoint,
    ))
}

async fn demo(duration: Duration, kinesis_endpoint: Option<String>) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sitegate-demo-")
        .tempdir()?;
    let pki_dir = dir.path().join("pki");
    let mut config = site_config(dir.path(), pki::init_ca(&pki_dir, "demo", &[])?)?;
    if let Some(endpoint) = &kinesis_endpoint {
        add_kinesis(&mut config, endpoint).await?;
    }
    config.validate()?;
    let listeners = Listeners {
        mqtts: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        admin: admin::bind(&config.admin_socket())?,
        metrics: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
        nucleus: None,
    };
    let gateway = Gateway::start(config.clone(), listeners).await?;
    let addr = gateway.local_addr().context("gateway has no address")?;
    println!(
        "sitegate demo: gateway on mqtts://{addr}, data in {}",
        dir.path().display()
    );
    let socket = config.admin_socket();
    let (stop_tx, stop) = watch::channel(false);
    let counters = Arc::new(DeviceCounters::default());
    let devices = start_fleet(dir.path(), &socket, addr, &stop, &counters).await?;
    let started = Instant::now();
    watch_live(&gateway, &socket, started, duration).await?;
    stop_tx.send_replace(true);
    for d in devices {
        let _ = tokio::time::timeout(Duration::from_secs(3), d).await;
    }
    let s = gateway.stats().snapshot();
    let list = ask(&socket, AdminRequest::List).await?;
    let spool = gateway.spool().status().await;
    let metrics = match gateway.metrics_addr() {
        Some(addr) => sitegate::ops::prometheus::scrape(addr)
            .await
            .ok()
            .map(|t| (addr, t)),
        None => None,
    };
    gateway.stop().await;
    println!("\nsummary after {:.1}s", started.elapsed().as_secs_f64());
    print_summary(dir.path(), &s, &spool, &counters);
    if let AdminResponse::Devices { devices } = list {
        print_devices(&devices);
    }
    if let Some((addr, text)) = metrics {
        print_metrics(addr, &text);
    }
    println!("\nstopped cleanly");
    Ok(())
}

/// The demo site in `dir`: its fleet's policies, three file sinks, a route and the rules.
fn site_config(dir: &Path, files: pki::CaFiles) -> Result<Config> {
    std::fs::create_dir_all(dir.join("rules"))?;
    for (name, sql) in DEMO_RULES {
        std::fs::write(dir.join(format!("rules/{name}.sql")), sql)?;
    }
    Ok(Config {
        site: Some("demo".into()),
        data_dir: dir.join("data"),
        auth: toml::from_str::<AuthConfig>(DEMO_AUTH).context("demo auth config")?,
        sinks: ["archive", "alerts", "averages"]
            .into_iter()
            .map(|name| {
                let sink = SinkConfig::File(FileConfig {
                    path: dir.join(format!("out/{name}.jsonl")),
                    rotate_bytes: ByteSize(DEFAULT_ROTATE_BYTES),
                    keep: DEFAULT_KEEP,
                    fsync: true,
                });
                (name.to_string(), sink)
            })
            .collect(),
        routes: [(
            "telemetry".to_string(),
            RouteConfig {
                from: "dt/#".into(),
                to: "archive".into(),
            },
        )]
        .into(),
        rules: RulesConfig {
            dir: Some(dir.join("rules")),
            ..RulesConfig::default()
        },
        ..Config::with_listener(ListenerConfig::with_defaults(
            "127.0.0.1:0",
            files.ca_cert.clone(),
            files.gateway_cert,
            files.gateway_key,
        ))
    })
}

/// Adds a Kinesis sink at `endpoint` (an emulator, or AWS), making its stream if missing.
async fn add_kinesis(config: &mut Config, endpoint: &str) -> Result<()> {
    let mut k = KinesisConfig::for_stream(DEMO_STREAM);
    k.endpoint = Some(endpoint.to_owned());
    // Emulators take any credentials; real ones come from the standard chain.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() && std::env::var_os("AWS_PROFILE").is_none()
    {
        std::env::set_var("AWS_ACCESS_KEY_ID", "demo");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "demo");
    }
    KinesisSink::new("kinesis", "demo", k.clone())
        .await
        .create_stream_if_missing(1)
        .await
        .with_context(|| format!("creating stream {DEMO_STREAM} at {endpoint}"))?;
    config
        .sinks
        .insert("kinesis".into(), SinkConfig::Kinesis(k));
    config.routes.insert(
        "to-kinesis".into(),
        RouteConfig {
            from: "dt/#".into(),
            to: "kinesis".into(),
        },
    );
    println!("kinesis: telemetry also goes to stream {DEMO_STREAM} at {endpoint}");
    Ok(())
}

/// Approves most of the fleet, issues every device its certificate and starts them.
async fn start_fleet(
    dir: &Path,
    socket: &Path,
    addr: SocketAddr,
    stop: &watch::Receiver<bool>,
    counters: &Arc<DeviceCounters>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    for plan in FLEET.iter().filter(|p| p.approved) {
        ask(
            socket,
            AdminRequest::Approve {
                cert: None,
                thing: plan.thing.into(),
                groups: vec![],
            },
        )
        .await?;
    }
    let mut devices = Vec::new();
    for plan in FLEET {
        let (creds, _) =
            DeviceCredentials::issue(plan.thing, &dir.join("pki"), &dir.join("devices"), 1)?;
        devices.push(tokio::spawn(device(
            creds,
            addr,
            plan,
            stop.clone(),
            Arc::clone(counters),
        )));
    }
    println!(
    "fleet: {} devices ({} approved, door-1 pending; thermostat-9 also tries thermostat-1's topic)",
    FLEET.len(),
    FLEET.iter().filter(|p| p.approved).count()
);
    Ok(devices)
}

/// A line of live figures every second until `duration` (or Ctrl-C); approves `door-1` on its
/// live connection halfway.
async fn watch_live(
    gateway: &Gateway,
    socket: &Path,
    started: Instant,
    duration: Duration,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut door_approved = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed();
        if !door_approved && elapsed >= duration / 2 {
            door_approved = true;
            ask(
                socket,
                AdminRequest::Approve {
                    cert: None,
                    thing: "door-1".into(),
                    groups: vec!["doors".into()],
                },
            )
            .await?;
            println!("[{:>2}s] operator: sitegate device approve door-1 --group doors (live, no reconnect)", elapsed.as_secs());
        }
        let s = gateway.stats().snapshot();
        let spool = gateway.spool().status().await;
        let depth: u64 = spool.queues.iter().map(|q| q.records).sum();
        println!(
        "[{:>2}s] connections {:>2} | accepted {:>4} | denied {:>3} | delivered to devices {:>3} | spool depth {:>3} | to sink {:>4}",
        elapsed.as_secs(),
        s.connections_open,
        s.messages_in_qos0 + s.messages_in_qos1,
        s.publishes_denied + s.subscriptions_denied,
        s.messages_out,
        depth,
        s.sink_records_sent,
    );
        if elapsed >= duration {
            break;
        }
    }
    Ok(())
}

fn print_summary(
    dir: &Path,
    s: &sitegate::metrics::StatsSnapshot,
    spool: &sitegate::spool::SpoolStatus,
    counters: &DeviceCounters,
) {
    println!("  connections accepted     {}", s.connections_accepted);
    println!(
        "  messages accepted        {} (QoS 1: {})",
        s.messages_in_qos0 + s.messages_in_qos1,
        s.messages_in_qos1
    );
    println!("  publishes denied         {}", s.publishes_denied);
    println!("  delivered to devices     {}", s.messages_out);
    println!(
        "  spool commits (fsyncs)   {} | records to the file sink {} | still spooled {}",
        s.spool_commits,
        s.sink_records_sent,
        spool.queues.iter().map(|q| q.records).sum::<u64>()
    );
    for (label, sink) in [
        ("rule warm_thermostats → alerts", "alerts"),
        ("rule average_temp → averages", "averages"),
    ] {
        let lines: Vec<String> = std::fs::read_to_string(dir.join(format!("out/{sink}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        println!("  {label:<32} {} rows", lines.len());
        for line in lines.iter().rev().take(3).rev() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                println!("      {}", v["payload"]);
            }
        }
    }
    if let Some(by) = &spool.keys.wrapped_by {
        println!(
            "  spool data key           {by} (blocks LZ4 + AES-256-GCM; records in {})",
            dir.join("out/archive.jsonl").display()
        );
    }
    println!(
        "  sent by the fleet        {} (PUBACKed {}, received {})",
        counters.sent.load(Relaxed),
        counters.acked.load(Relaxed),
        counters.received.load(Relaxed)
    );
}

fn print_devices(devices: &[sitegate::ops::admin::DeviceView]) {
    println!("\n  {:<14} {:<9} GROUPS", "THING", "STATE");
    for d in devices {
        println!(
            "  {:<14} {:<9} {}",
            d.thing,
            d.state.to_string(),
            d.groups.join(",")
        );
    }
}

fn print_metrics(addr: SocketAddr, text: &str) {
    println!("\n  a few of the Prometheus metrics at http://{addr}/metrics:");
    for series in [
        "sitegate_connections_open",
        "sitegate_messages_in_total{qos=\"1\"}",
        "sitegate_denied_total{reason=\"publish_not_allowed\"}",
        "sitegate_rule_rows_out_total{rule=\"warm_thermostats\"}",
        "sitegate_spool_records{sink=\"archive\"}",
        "sitegate_receive_to_durable_seconds_count",
    ] {
        if let Some(v) = sitegate::ops::prometheus::value_of(text, series) {
            println!("  {series:<58} {v}");
        }
    }
    let sum = sitegate::ops::prometheus::value_of(text, "sitegate_receive_to_durable_seconds_sum");
    let count =
        sitegate::ops::prometheus::value_of(text, "sitegate_receive_to_durable_seconds_count");
    if let (Some(sum), Some(count)) = (sum, count.filter(|c| *c > 0.0)) {
        println!(
            "  {:<58} {:.2} ms",
            "mean receive → durable",
            sum / count * 1000.0
        );
    }
}

async fn ask(socket: &Path, request: AdminRequest) -> Result<AdminResponse> {
    match admin::request(socket, &request).await? {
        AdminResponse::Error { message } => anyhow::bail!("gateway refused {request:?}: {message}"),
        r => Ok(r),
    }
}

async fn device(
    creds: DeviceCredentials,
    addr: SocketAddr,
    plan: &'static Plan,
    mut stop: watch::Receiver<bool>,
    counters: Arc<DeviceCounters>,
) {
    let Ok(opts) = creds.mqtt_options(addr, Duration::from_secs(30)) else {
        return;
    };
    let (client, mut events) = AsyncClient::new(opts, 64);
    if let Some(filter) = plan.subscribes {
        let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
    }
    let poller = {
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counters.acked.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        counters.received.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        })
    };
    let mut n: u64 = 0;
    let mut tick = tokio::time::interval(SEND_EVERY);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        if plan.publishes.is_empty() {
            continue;
        }
        let topic = plan.publishes[(n as usize) % plan.publishes.len()];
        let temp = 20.0 + ((n % 17) as f64) * 0.3;
        let payload = format!(r#"{{"thing":"{}","seq":{n},"temp":{temp:.1}}}"#, plan.thing);
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_ok()
        {
            counters.sent.fetch_add(1, Relaxed);
        }
        n += 1;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    poller.abort();
}
