//! Crash safety: a child `sitegate run` takes QoS 1 messages from a real client and is killed
//! with SIGKILL at random points, again and again. Every message it acknowledged must come out
//! of the file sink, in order; only messages in flight at a kill may appear twice.
//! `faults`: the same promise when the disk fills or the store's files are damaged.

use crate::common;
mod faults;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rumqttc::{Event, Outgoing, Packet, QoS};
use sitegate::fleet::DeviceCredentials;
use sitegate::identity::pki;
use tokio::process::{Child, Command};

const ROUNDS: usize = 20;
/// Messages offered per round at most, so the sink file stays small enough to re-read often.
const PER_ROUND: u64 = 4_000;
/// The producer pauses 1 ms after this many messages, so a round's messages span the whole
/// kill window (about half a second) and kills land while messages are in flight.
const BURST: u64 = 8;

/// The site's config: data_dir at `data`, a file sink in `<dir>/out`, extra `[spool]` keys,
/// and the key file of `<dir>/pki` unless the spool should make its own.
fn config_toml(dir: &Path, data: &Path, port: u16, spool: &str, key_file: bool) -> String {
    let encryption = if key_file {
        format!(
            "[spool.encryption]\nkey_file = \"{}/pki/spool.kek\"\n",
            dir.display()
        )
    } else {
        String::new()
    };
    format!(
        r#"
site = "crash"
data_dir = "{data}"

[listener]
mqtts = "127.0.0.1:{port}"
ca = "{dir}/pki/ca.pem"
cert = "{dir}/pki/gateway.pem"
key = "{dir}/pki/gateway.key"

[sinks.archive]
type = "file"
path = "{dir}/out/archive.jsonl"

[routes.telemetry]
from = "dt/#"
to = "archive"

[spool]
{spool}

{encryption}

{auth}
"#,
        dir = dir.display(),
        data = data.display(),
        auth = common::AUTH
            .replace("[device_groups", "[auth.device_groups")
            .replace("[policies", "[auth.policies"),
    )
}

/// A site in `root`: its CA and spool key file in `pki/`, a free loopback port, and the
/// config of [`config_toml`] written to `sitegate.toml` (data in `data/`).
fn crash_site(root: &Path) -> (pki::CaFiles, u16, std::path::PathBuf) {
    let ca = pki::init_ca(&root.join("pki"), "crash", &[]).unwrap();
    sitegate::spool::keys::generate_kek(&root.join("pki/spool.kek")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = root.join("sitegate.toml");
    std::fs::write(
        &config,
        config_toml(root, &root.join("data"), port, "", true),
    )
    .unwrap();
    (ca, port, config)
}

/// `sitegate device approve sensor-1` on the stopped gateway of `config`.
async fn approve_sensor(config: &Path) {
    let approve = sitegate()
        .args(["device", "approve", "sensor-1", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap();
    assert!(approve.status.success(), "{}", common::text(&approve));
}

fn sitegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sitegate"))
}

async fn start_gateway(config: &Path, log: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = sitegate()
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info,sled=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway did not listen on {port}");
}

/// Publishes numbered QoS 1 messages from `next` on until the connection dies; records the
/// numbers the gateway acknowledged.
async fn publish_until_killed(
    creds: Arc<DeviceCredentials>,
    port: u16,
    next: Arc<Mutex<u64>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = creds.mqtt_options(addr, Duration::from_secs(30)).unwrap();
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 200);
    let sent: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let producer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for i in 0..PER_ROUND {
                if i % BURST == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let n = {
                    let mut next = next.lock().unwrap();
                    *next += 1;
                    *next
                };
                sent.lock().unwrap().push_back(n);
                if client
                    .publish(
                        "dt/sensor-1/seq",
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"n":{n}}}"#),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut by_pkid: HashMap<u16, u64> = HashMap::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
        track(&event, &sent, &mut by_pkid, &acked);
    }
    producer.abort();
}

/// Follows one client event: a publish going out takes the next number sent, its PUBACK
/// marks that number acknowledged.
fn track(
    event: &Event,
    sent: &Mutex<VecDeque<u64>>,
    by_pkid: &mut HashMap<u16, u64>,
    acked: &Mutex<BTreeSet<u64>>,
) {
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            if let Some(n) = sent.lock().unwrap().pop_front() {
                by_pkid.insert(*pkid, n);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some(n) = by_pkid.remove(&ack.pkid) {
                acked.lock().unwrap().insert(n);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (ca, port, config) = crash_site(root);
    let device =
        pki::issue_device("sensor-1", &root.join("pki"), &root.join("devices"), 30).unwrap();
    let creds = Arc::new(
        DeviceCredentials::load("sensor-1", &ca.ca_cert, &device.cert, &device.key).unwrap(),
    );
    approve_sensor(&config).await;

    let seed: u64 = rand::thread_rng().gen();
    println!("kill-point seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let log = root.join("gateway.log");
    let next = Arc::new(Mutex::new(0u64));
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    for _ in 0..ROUNDS {
        let mut child = start_gateway(&config, &log, port).await;
        let publisher = tokio::spawn(publish_until_killed(
            creds.clone(),
            port,
            next.clone(),
            acked.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        publisher.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = *next.lock().unwrap();
    assert!(
        acked.len() > ROUNDS,
        "too few messages acknowledged to mean anything: {}",
        acked.len()
    );

    // A last start, with nobody publishing, lets the drain deliver what is left.
    let mut child = start_gateway(&config, &log, port).await;
    let out = root.join("out/archive.jsonl");
    let mut delivered: Vec<u64> = Vec::new();
    for _ in 0..600 {
        delivered = common::sink_lines(&out)
            .iter()
            .map(|l| l["payload"]["n"].as_u64().unwrap())
            .collect();
        let seen: BTreeSet<u64> = delivered.iter().copied().collect();
        if acked.is_subset(&seen) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let mut first_seen: Vec<u64> = Vec::new();
    let mut duplicates = 0;
    for n in &delivered {
        if first_seen.contains(n) {
            duplicates += 1;
        } else {
            first_seen.push(*n);
        }
    }
    let seen: BTreeSet<u64> = first_seen.iter().copied().collect();
    let missing: Vec<_> = acked.difference(&seen).collect();
    println!(
        "{ROUNDS} kills: {sent} sent, {} acknowledged, {} delivered ({} distinct, {duplicates} duplicates)",
        acked.len(),
        delivered.len(),
        first_seen.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?} (log: {})",
        log.display()
    );
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "delivered out of order: {first_seen:?}"
    );
    // A duplicate is a redelivery after a kill: at most one drain batch per kill.
    assert!(
        duplicates <= ROUNDS * sitegate::delivery::drain::DRAIN_BATCH,
        "{duplicates} duplicates"
    );
}

/// Runs a rumqttc client until `stop` says so, passing every incoming PUBLISH to `got`; the
/// client's PUBACKs go out as rumqttc sends them.
fn client_events(
    mut events: rumqttc::EventLoop,
    got: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
    suback: Option<tokio::sync::oneshot::Sender<()>>,
) -> tokio::task::JoinHandle<()> {
    let mut suback = suback;
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = got.send(p);
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = suback.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
    })
}

/// MQTT §4.1 (the server keeps a session's subscriptions, and its QoS 1 messages while the
/// client is away) and the MQTT 5 issue's item 2, through crashes: a persistent session's
/// subscription is in the store before its SUBACK, and each message a publisher had
/// acknowledged for the device while it is away before the PUBACK. A gateway killed with
/// SIGKILL right after the SUBACK (the device connected) and again right after the last
/// PUBACK still gives the device every message, in order, when it rejoins its session (3.1.1
/// Clean Session 0, rumqttc).
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_keeps_the_messages_queued_for_an_away_session() {
    const MESSAGES: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (ca, port, config) = crash_site(root);
    let mut creds = HashMap::new();
    for thing in ["pump-1", "controller-1"] {
        let issued =
            pki::issue_device(thing, &root.join("pki"), &root.join("devices"), 30).unwrap();
        let approve = sitegate()
            .args(["device", "approve", thing, "--config"])
            .arg(&config)
            .output()
            .await
            .unwrap();
        assert!(approve.status.success(), "{}", common::text(&approve));
        creds.insert(
            thing,
            DeviceCredentials::load(thing, &ca.ca_cert, &issued.cert, &issued.key).unwrap(),
        );
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let options = |thing: &str| {
        let mut o = creds[thing]
            .mqtt_options(addr, Duration::from_secs(30))
            .unwrap();
        o.set_clean_session(thing != "pump-1");
        o
    };
    let log = root.join("gateway.log");
    let mut child = start_gateway(&config, &log, port).await;

    // The pump subscribes with a session kept (Clean Session 0); the gateway is killed
    // right after the SUBACK, while the pump is connected.
    let (pump, events) = rumqttc::AsyncClient::new(options("pump-1"), 100);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed, suback) = tokio::sync::oneshot::channel();
    let task = client_events(events, tx, Some(subscribed));
    pump.subscribe("cmd/pump-1/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), suback)
        .await
        .unwrap()
        .unwrap();
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    task.abort();
    drop(pump);
    let mut child = start_gateway(&config, &log, port).await;

    // The controller publishes while the pump is away; the gateway is killed right after the
    // last PUBACK.
    let (controller, mut events) = rumqttc::AsyncClient::new(options("controller-1"), 100);
    for i in 0..MESSAGES {
        controller
            .publish(
                "cmd/pump-1/set",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"step":{i}}}"#),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < MESSAGES {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("the controller's publishes were not all acknowledged: {other:?}"),
        }
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    drop(events);

    let mut child = start_gateway(&config, &log, port).await;
    let (pump, events) = rumqttc::AsyncClient::new(options("pump-1"), 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = client_events(events, tx, None);
    let mut got = Vec::new();
    while got.len() < MESSAGES {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(p)) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                got.push(v["step"].as_u64().unwrap() as usize);
            }
            _ => break,
        }
    }
    let _ = pump.disconnect().await;
    task.abort();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(
        got,
        (0..MESSAGES).collect::<Vec<_>>(),
        "log: {}",
        log.display()
    );
}
