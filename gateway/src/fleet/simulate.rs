//! `sitegate simulate`: a fleet of virtual devices, light enough that one machine plays a site.
//!
//! Every device has its own key and certificate (issued in memory from the site CA, or loaded
//! from a folder of issued ones) and its own MQTT 5 connection over mutual TLS, client id = thing
//! name, through rumqttc: the gateway cannot tell it from hardware. Devices publish profile
//! telemetry (thermostat, freezer, door) at a fleet-wide rate with jitter and the odd alert;
//! a few misbehave on request (bad JSON, oversize payloads, forbidden topics). MQTT 5 is used
//! because its PUBACK says when a publish was not authorized, so denials can be counted.
//!
//! Each device is two tasks: one drives rumqttc's event loop (connects, reconnects, times
//! publish → PUBACK), the other paces publishes. All devices share one runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::fleet::DeviceCredentials;
use crate::identity::pki::{self, SiteCa};

/// Keep-alive of every virtual device.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Wait before a device retries a failed connection (doubled up to `MAX_RETRY`).
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Latency samples a device collects before handing them to the shared pool.
const SAMPLE_CHUNK: usize = 256;
/// Publishes a device may have queued in its client before the pacer waits.
const CLIENT_QUEUE: usize = 64;
/// Size of an oversize payload from a misbehaving device: beyond any sane packet limit.
const OVERSIZE_BYTES: usize = 2 * 1024 * 1024;
/// One publish in this many from a misbehaving device misbehaves.
const MISBEHAVE_EVERY: u64 = 5;
/// One publish in this many is an alert (on the device's `alert` topic).
const ALERT_EVERY: u64 = 50;

/// A kind of device, as a thing type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Thermostat,
    Freezer,
    Door,
    /// Thermostats, freezers and doors in turn.
    Mixed,
}

impl Profile {
    fn for_device(self, n: usize) -> Profile {
        match self {
            Profile::Mixed => [Profile::Thermostat, Profile::Freezer, Profile::Door][n % 3],
            p => p,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Profile::Thermostat => "thermostat",
            Profile::Freezer => "freezer",
            Profile::Door => "door",
            Profile::Mixed => "mixed",
        }
    }

    /// One reading, as JSON, padded with a `pad` field to `min_bytes` when given.
    fn reading(self, seq: u64, rng: &mut impl Rng, min_bytes: Option<usize>) -> String {
        let ts = crate::clock::now_ms();
        let mut body = match self {
            Profile::Freezer => format!(
                r#"{{"temp":{:.1},"door_open":{},"compressor":{},"seq":{seq},"ts":{ts}"#,
                rng.gen_range(-24.0..-14.0),
                rng.gen_bool(0.05),
                rng.gen_bool(0.6)
            ),
            Profile::Door => format!(
                r#"{{"open":{},"battery":{},"seq":{seq},"ts":{ts}"#,
                rng.gen_bool(0.2),
                rng.gen_range(20..100)
            ),
            _ => format!(
                r#"{{"temp":{:.1},"humidity":{},"setpoint":21.0,"seq":{seq},"ts":{ts}"#,
                rng.gen_range(17.0..27.0),
                rng.gen_range(30..60)
            ),
        };
        if let Some(min) = min_bytes.filter(|&min| body.len() + 1 < min) {
            // `,"pad":"` + `"}` is 10 bytes.
            body.push_str(r#","pad":""#);
            body.extend(std::iter::repeat_n('x', min.saturating_sub(body.len() + 2)));
            body.push('"');
        }
        body.push('}');
        body
    }
}

/// Dropping most of the fleet at once and letting it reconnect.
#[derive(Debug, Clone, Copy)]
pub struct StormOptions {
    /// Devices that stay connected through the storm (they show whether the gateway stays
    /// responsive); the rest are dropped.
    pub keep: usize,
    /// How long the fleet publishes before the storm, and again after it.
    pub settle: Duration,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateway's host name or address (what its certificate names) and port.
    pub host: String,
    pub port: u16,
    /// Folder with the site CA (`ca.pem`; `ca.key` too when certificates are issued here).
    pub ca_dir: PathBuf,
    /// Load `<thing>.pem` / `<thing>.key` from here instead of issuing in memory.
    pub certs_dir: Option<PathBuf>,
    pub devices: usize,
    /// Messages per second across the fleet; 0 publishes as fast as PUBACKs come back.
    pub rate: f64,
    pub duration: Duration,
    pub profile: Profile,
    pub qos: u8,
    /// Pad payloads to at least this many bytes.
    pub payload_bytes: Option<usize>,
    /// Device names are `<prefix>-<profile>-<n>`.
    pub prefix: String,
    /// This many devices (the first ones) misbehave.
    pub misbehaving: usize,
    /// New connections per second while the fleet comes up.
    pub connect_rate: f64,
    /// Chance per publish that a device disconnects and reconnects.
    pub reconnect_chance: f64,
    /// Publishes a device keeps in flight (QoS 1).
    pub inflight: u16,
    pub storm: Option<StormOptions>,
    /// Draw a progress bar on the terminal.
    pub progress: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut micros: Vec<u32>) -> Latency {
        if micros.is_empty() {
            return Latency::default();
        }
        micros.sort_unstable();
        let at = |q: f64| {
            let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
            f64::from(micros[i.min(micros.len() - 1)]) / 1000.0
        };
        Latency {
            samples: micros.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// How the fleet came back from a storm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StormSummary {
    pub dropped: usize,
    /// Dropped devices connected again before the storm phase ended.
    pub reconnected: usize,
    /// From the drop until the last dropped device had its CONNACK.
    pub all_back_s: f64,
    pub handshakes_per_s: f64,
    /// PUBACK latency of the devices that stayed, before and during the storm.
    pub kept_before: Latency,
    pub kept_during: Latency,
}

/// The run's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub devices: usize,
    pub profile: String,
    pub qos: u8,
    /// Devices that got a CONNACK at least once.
    pub connected: usize,
    /// Time until every device was connected (or the connect phase gave up).
    pub connect_s: f64,
    /// Initial connections per second (TLS handshake + CONNECT).
    pub handshakes_per_s: f64,
    pub sent: u64,
    /// Publishes the gateway acknowledged as accepted (QoS 1).
    pub acknowledged: u64,
    /// Publishes refused as not authorized (MQTT 5 PUBACK reason).
    pub denied: u64,
    /// Connection errors: refused, reset, timed out, closed by the gateway.
    pub errors: u64,
    pub reconnects: u64,
    pub publish_s: f64,
    /// Accepted messages per second (acknowledged at QoS 1, sent at QoS 0).
    pub rate: f64,
    pub latency: Latency,
    pub storm: Option<StormSummary>,
}

impl Summary {
    /// The summary as people read it.
    pub fn text(&self) -> String {
        let mut s = format!(
            "devices       {} {} (QoS {})\nconnected     {} in {:.1} s ({:.0} handshakes/s)\nsent          {}\nacknowledged  {}\ndenied        {}\nerrors        {}\nreconnects    {}\nrate          {:.0} msg/s over {:.1} s\nlatency       p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({} samples)\n",
            self.devices,
            self.profile,
            self.qos,
            self.connected,
            self.connect_s,
            self.handshakes_per_s,
            self.sent,
            self.acknowledged,
            self.denied,
            self.errors,
            self.reconnects,
            self.rate,
            self.publish_s,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.latency.samples,
        );
        if let Some(st) = &self.storm {
            s.push_str(&format!(
                "storm         {} dropped, {} back in {:.2} s ({:.0} handshakes/s)\n              kept devices p99 {:.2} ms before, {:.2} ms during\n",
                st.dropped,
                st.reconnected,
                st.all_back_s,
                st.handshakes_per_s,
                st.kept_before.p99_ms,
                st.kept_during.p99_ms
            ));
        }
        s
    }
}

/// Why a simulation could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("{0}")]
    Invalid(String),
}

/// Phases, broadcast to every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Publishing,
    /// Storm number n: dropped devices reconnect.
    Storm,
    /// Publishers stop; outstanding PUBACKs still count.
    Stopping,
    /// Devices hand in their samples and end.
    Done,
}

#[derive(Default)]
struct Shared {
    connected_once: AtomicUsize,
    connected_now: AtomicUsize,
    sent: AtomicU64,
    acknowledged: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    /// Dropped devices connected again since the storm began.
    storm_back: AtomicUsize,
    /// (latency µs, phase when sent, kept through the storm)
    samples: Mutex<Vec<(u32, Phase, bool)>>,
}

/// Device names, in order.
pub fn device_names(prefix: &str, profile: Profile, devices: usize) -> Vec<String> {
    (0..devices)
        .map(|n| format!("{prefix}-{}-{n}", profile.for_device(n).name()))
        .collect()
}

fn credentials(
    options: &Options,
    names: &[String],
) -> Result<Vec<DeviceCredentials>, SimulateError> {
    let ca_cert = options.ca_dir.join(pki::CA_CERT_FILE);
    if let Some(dir) = &options.certs_dir {
        return names
            .iter()
            .map(|thing| {
                DeviceCredentials::load(
                    thing,
                    &ca_cert,
                    &dir.join(format!("{thing}.pem")),
                    &dir.join(format!("{thing}.key")),
                )
                .map_err(SimulateError::from)
            })
            .collect();
    }
    let ca = SiteCa::load(&options.ca_dir)?;
    names
        .iter()
        .map(|thing| {
            let cert = ca.issue(thing, 0, 30)?;
            Ok(DeviceCredentials {
                thing: thing.clone(),
                ca_pem: ca.ca_pem.clone().into_bytes(),
                cert_pem: cert.cert_pem.into_bytes(),
                key_pem: cert.key_pem.into_bytes(),
            })
        })
        .collect()
}

fn validate(options: &Options) -> Result<(), SimulateError> {
    let bad = |m: &str| Err(SimulateError::Invalid(m.to_string()));
    if options.devices == 0 {
        return bad("--devices must be at least 1");
    }
    if options.qos > 1 {
        return bad("--qos must be 0 or 1 (the gateway does not take QoS 2)");
    }
    if !(options.rate >= 0.0 && options.rate.is_finite()) {
        return bad("--rate must be a number of messages per second, 0 for as fast as possible");
    }
    if options.connect_rate <= 0.0 {
        return bad("--connect-rate must be above 0");
    }
    if !(0.0..=1.0).contains(&options.reconnect_chance) {
        return bad("--reconnect-chance must be between 0 and 1");
    }
    if options.misbehaving > options.devices {
        return bad("--misbehaving cannot exceed --devices");
    }
    if let Some(s) = options.storm {
        if s.keep >= options.devices {
            return bad("--storm-keep must leave some devices to drop");
        }
    }
    Ok(())
}

/// Runs the fleet and returns its summary. Devices are named by [`device_names`].
pub async fn run(options: Options) -> Result<Summary, SimulateError> {
    validate(&options)?;
    crate::daemon::raise_fd_limit();
    let names = device_names(&options.prefix, options.profile, options.devices);
    let creds = credentials(&options, &names)?;
    let shared = Arc::new(Shared::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    // Wakes devices out of a wait on the network only for what needs an answer now (the storm
    // and the end), so that connections being set up are not cut short by other phase changes.
    let (interrupt_tx, interrupt_rx) = watch::channel(());
    let bar = progress_bar(&options);
    let started = Instant::now();
    let (mut tasks, last_start) =
        spawn_fleet(&options, &names, creds, &shared, &phase_rx, &interrupt_rx)?;

    // Connect phase: until everyone is in, or long enough that the rest are clearly failing.
    let connect_deadline = last_start + Duration::from_secs(30);
    while shared.connected_once.load(Relaxed) < options.devices
        && tokio::time::Instant::now() < connect_deadline
    {
        tick(&bar, &shared, "connecting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = started.elapsed().as_secs_f64();
    let connected = shared.connected_once.load(Relaxed);

    let publish_started = Instant::now();
    let sent_before = shared.sent.load(Relaxed);
    let acked_before = shared.acknowledged.load(Relaxed);
    let _ = phase_tx.send(Phase::Publishing);
    let mut storm = match options.storm {
        None => {
            wait_publishing(&bar, &shared, options.duration).await;
            None
        }
        Some(s) => {
            let dropped = options.devices - s.keep;
            Some(storm_phase(&bar, &shared, &phase_tx, &interrupt_tx, s, dropped).await)
        }
    };
    let publish_s = publish_started.elapsed().as_secs_f64();
    stop_fleet(&mut tasks, &phase_tx, &interrupt_tx, &bar).await;

    let samples = shared
        .samples
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    if let Some(st) = storm.as_mut() {
        let kept = |phase: Phase| {
            samples
                .iter()
                .filter(|(_, p, k)| *k && *p == phase)
                .map(|(us, _, _)| *us)
                .collect::<Vec<_>>()
        };
        st.kept_before = Latency::of(kept(Phase::Publishing));
        st.kept_during = Latency::of(kept(Phase::Storm));
    }
    let sent = shared.sent.load(Relaxed);
    let acknowledged = shared.acknowledged.load(Relaxed);
    let accepted = if options.qos == 1 {
        acknowledged - acked_before
    } else {
        sent - sent_before
    };
    Ok(Summary {
        devices: options.devices,
        profile: options.profile.name().to_string(),
        qos: options.qos,
        connected,
        connect_s,
        handshakes_per_s: connected as f64 / connect_s.max(1e-3),
        sent,
        acknowledged,
        denied: shared.denied.load(Relaxed),
        errors: shared.errors.load(Relaxed),
        reconnects: shared.reconnects.load(Relaxed),
        publish_s,
        rate: accepted as f64 / publish_s.max(1e-3),
        latency: Latency::of(samples.into_iter().map(|(us, _, _)| us).collect()),
        storm,
    })
}

/// Starts every device's connection and publisher, `connect_rate` apart; returns their tasks
/// and when the last one starts.
fn spawn_fleet(
    options: &Options,
    names: &[String],
    creds: Vec<DeviceCredentials>,
    shared: &Arc<Shared>,
    phase_rx: &watch::Receiver<Phase>,
    interrupt_rx: &watch::Receiver<()>,
) -> Result<(Vec<tokio::task::JoinHandle<()>>, tokio::time::Instant), SimulateError> {
    let per_device_period = (options.rate > 0.0)
        .then(|| Duration::from_secs_f64(options.devices as f64 / options.rate));
    let mut tasks = Vec::with_capacity(options.devices * 2);
    let connect_gap = Duration::from_secs_f64(1.0 / options.connect_rate);
    let mut next_start = tokio::time::Instant::now();
    for (n, c) in creds.into_iter().enumerate() {
        let mut opts = c.mqtt5_options_for(&options.host, options.port, KEEP_ALIVE)?;
        opts.set_outgoing_inflight_upper_limit(options.inflight.max(1));
        opts.set_connection_timeout(30);
        opts.set_max_packet_size(Some(OVERSIZE_BYTES as u32 * 2));
        let kept = options.storm.is_some_and(|s| n < s.keep);
        let device = Device {
            thing: c.thing,
            profile: options.profile.for_device(n),
            qos: if options.qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            payload_bytes: options.payload_bytes,
            misbehaves: n < options.misbehaving,
            other: names[(n + 1) % names.len()].clone(),
            period: per_device_period,
        };
        let (client, eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
        let start_at = next_start;
        next_start += connect_gap;
        tasks.push(tokio::spawn(drive(
            eventloop,
            kept,
            options.reconnect_chance,
            start_at,
            shared.clone(),
            phase_rx.clone(),
            interrupt_rx.clone(),
        )));
        tasks.push(tokio::spawn(publish(
            device,
            client,
            shared.clone(),
            phase_rx.clone(),
        )));
    }
    Ok((tasks, next_start))
}

/// The storm: after `settle`, `dropped` devices lose their connections at once; waits until
/// they are all back (or two minutes), then lets the kept devices publish for `settle` again.
async fn storm_phase(
    bar: &Option<indicatif::ProgressBar>,
    shared: &Shared,
    phase_tx: &watch::Sender<Phase>,
    interrupt_tx: &watch::Sender<()>,
    s: StormOptions,
    dropped: usize,
) -> StormSummary {
    wait_publishing(bar, shared, s.settle).await;
    let storm_started = Instant::now();
    shared.storm_back.store(0, Relaxed);
    let _ = phase_tx.send(Phase::Storm);
    interrupt_tx.send_replace(());
    let storm_deadline = storm_started + Duration::from_secs(120);
    let mut all_back = None;
    while Instant::now() < storm_deadline {
        tick(bar, shared, "storm");
        if shared.storm_back.load(Relaxed) >= dropped {
            all_back = Some(storm_started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_back = all_back.unwrap_or_else(|| storm_started.elapsed());
    // Let the kept devices show how the gateway does right after the storm too.
    let _ = phase_tx.send(Phase::Publishing);
    wait_publishing(bar, shared, s.settle).await;
    let reconnected = shared.storm_back.load(Relaxed);
    StormSummary {
        dropped,
        reconnected,
        all_back_s: all_back.as_secs_f64(),
        handshakes_per_s: reconnected as f64 / all_back.as_secs_f64().max(1e-3),
        ..StormSummary::default()
    }
}

/// Ends the run: outstanding PUBACKs get a moment, then every device stops (or is aborted
/// after five seconds).
async fn stop_fleet(
    tasks: &mut [tokio::task::JoinHandle<()>],
    phase_tx: &watch::Sender<Phase>,
    interrupt_tx: &watch::Sender<()>,
    bar: &Option<indicatif::ProgressBar>,
) {
    let _ = phase_tx.send(Phase::Stopping);
    // Give outstanding PUBACKs a moment, then collect every device's samples.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = phase_tx.send(Phase::Done);
    interrupt_tx.send_replace(());
    let ending = async {
        for t in tasks.iter_mut() {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), ending)
        .await
        .is_err()
    {
        for t in tasks.iter() {
            t.abort();
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
}

fn progress_bar(options: &Options) -> Option<indicatif::ProgressBar> {
    if !options.progress {
        return None;
    }
    let bar = indicatif::ProgressBar::new(options.devices as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} connected  {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

fn tick(bar: &Option<indicatif::ProgressBar>, shared: &Shared, phase: &str) {
    if let Some(bar) = bar {
        bar.set_position(shared.connected_now.load(Relaxed) as u64);
        bar.set_message(format!(
            "{phase}: sent {} acked {} denied {} errors {}",
            shared.sent.load(Relaxed),
            shared.acknowledged.load(Relaxed),
            shared.denied.load(Relaxed),
            shared.errors.load(Relaxed)
        ));
    }
}

async fn wait_publishing(bar: &Option<indicatif::ProgressBar>, shared: &Shared, span: Duration) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        tick(bar, shared, "publishing");
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
    }
}

/// What one device publishes.
struct Device {
    thing: String,
    profile: Profile,
    qos: QoS,
    payload_bytes: Option<usize>,
    misbehaves: bool,
    /// Another device's name: a misbehaving device publishes on its topics (forbidden).
    other: String,
    /// Time between two publishes; `None`: as fast as the client takes them.
    period: Option<Duration>,
}

impl Device {
    /// Topic, payload and QoS of publish number `seq`.
    fn message(&self, seq: u64, rng: &mut impl Rng) -> (String, Vec<u8>, QoS) {
        let (topic, payload) = self.topic_and_payload(seq, rng);
        // An oversize publish goes at QoS 0: at QoS 1 the client would resend it after every
        // reconnect and the device would never get past it.
        let qos = if payload.len() >= OVERSIZE_BYTES {
            QoS::AtMostOnce
        } else {
            self.qos
        };
        (topic, payload, qos)
    }

    fn topic_and_payload(&self, seq: u64, rng: &mut impl Rng) -> (String, Vec<u8>) {
        let kind = self.profile.name();
        if self.misbehaves && seq % MISBEHAVE_EVERY == MISBEHAVE_EVERY - 1 {
            return match (seq / MISBEHAVE_EVERY) % 3 {
                0 => (
                    format!("dt/{}/{kind}", self.thing),
                    br#"{"temp": 21.5, "unterminated"#.to_vec(),
                ),
                1 => (
                    format!("dt/{}/{kind}", self.thing),
                    vec![b'x'; OVERSIZE_BYTES],
                ),
                _ => (
                    format!("dt/{}/{kind}", self.other),
                    self.profile
                        .reading(seq, rng, self.payload_bytes)
                        .into_bytes(),
                ),
            };
        }
        if seq % ALERT_EVERY == ALERT_EVERY - 1 {
            let alert = format!(
                r#"{{"alert":"{}","seq":{seq},"ts":{}}}"#,
                match self.profile {
                    Profile::Freezer => "temperature_high",
                    Profile::Door => "left_open",
                    _ => "sensor_fault",
                },
                crate::clock::now_ms()
            );
            return (format!("dt/{}/alert", self.thing), alert.into_bytes());
        }
        (
            format!("dt/{}/{kind}", self.thing),
            self.profile
                .reading(seq, rng, self.payload_bytes)
                .into_bytes(),
        )
    }
}

/// Paces one device's publishes (jittered around its period, random phase at start).
async fn publish(
    device: Device,
    client: AsyncClient,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let _ = phase.wait_for(|p| *p != Phase::Connecting).await;
    let mut rng = rand::rngs::StdRng::from_entropy();
    if let Some(period) = device.period {
        tokio::time::sleep(period.mul_f64(rng.gen_range(0.0..1.0))).await;
    }
    let mut seq = 0u64;
    loop {
        if matches!(*phase.borrow(), Phase::Stopping | Phase::Done) {
            return;
        }
        let (topic, payload, qos) = device.message(seq, &mut rng);
        seq += 1;
        if client.publish(topic, qos, false, payload).await.is_err() {
            return;
        }
        shared.sent.fetch_add(1, Relaxed);
        if let Some(period) = device.period {
            tokio::time::sleep(period.mul_f64(rng.gen_range(0.5..1.5))).await;
        }
    }
}

/// Drives one device's connection: connects at `start_at`, reconnects after errors (and after
/// being dropped by a storm), and times publish → PUBACK.
async fn drive(
    mut eventloop: EventLoop,
    kept: bool,
    reconnect_chance: f64,
    start_at: tokio::time::Instant,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    mut interrupt: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(start_at) => break,
            _ = interrupt.changed() => {
                if *phase.borrow() == Phase::Done {
                    return;
                }
            }
        }
    }
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut sent_at: HashMap<u16, (Instant, Phase)> = HashMap::new();
    let mut samples: Vec<(u32, Phase, bool)> = Vec::with_capacity(SAMPLE_CHUNK);
    let mut ever_connected = false;
    let mut connected = false;
    let mut dropped_in_storm = false;
    let mut retry = FIRST_RETRY;
    loop {
        let now = *phase.borrow();
        if now == Phase::Done {
            break;
        }
        if now == Phase::Storm && !kept && !dropped_in_storm {
            // The storm: this device's connection vanishes (as when a site's switch reboots)
            // and it reconnects at once.
            dropped_in_storm = true;
            if connected {
                connected = false;
                shared.connected_now.fetch_sub(1, Relaxed);
            }
            eventloop.clean();
            sent_at.clear();
            continue;
        }
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = interrupt.changed() => continue,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                retry = FIRST_RETRY;
                connected = true;
                shared.connected_now.fetch_add(1, Relaxed);
                if !ever_connected {
                    ever_connected = true;
                    shared.connected_once.fetch_add(1, Relaxed);
                } else {
                    shared.reconnects.fetch_add(1, Relaxed);
                }
                if dropped_in_storm && *phase.borrow() == Phase::Storm {
                    shared.storm_back.fetch_add(1, Relaxed);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                sent_at.insert(pkid, (Instant::now(), *phase.borrow()));
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if ack.reason == PubAckReason::NotAuthorized {
                    shared.denied.fetch_add(1, Relaxed);
                } else {
                    shared.acknowledged.fetch_add(1, Relaxed);
                }
                if let Some((at, p)) = sent_at.remove(&ack.pkid) {
                    let us = at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    samples.push((us, p, kept));
                    if samples.len() >= SAMPLE_CHUNK {
                        flush_samples(&shared, &mut samples);
                    }
                }
                if reconnect_chance > 0.0 && rng.gen_bool(reconnect_chance) {
                    // Now and then a device loses its link; unacknowledged publishes are sent
                    // again once it is back.
                    eventloop.clean();
                    connected = false;
                    shared.connected_now.fetch_sub(1, Relaxed);
                    sent_at.clear();
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(_))) => {}
            Ok(_) => {}
            Err(_) => {
                if matches!(*phase.borrow(), Phase::Stopping | Phase::Done) {
                    break;
                }
                shared.errors.fetch_add(1, Relaxed);
                if connected {
                    connected = false;
                    shared.connected_now.fetch_sub(1, Relaxed);
                }
                sent_at.clear();
                flush_samples(&shared, &mut samples);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
        if *phase.borrow() == Phase::Publishing {
            dropped_in_storm = false;
        }
    }
    flush_samples(&shared, &mut samples);
}

fn flush_samples(shared: &Shared, samples: &mut Vec<(u32, Phase, bool)>) {
    if samples.is_empty() {
        return;
    }
    if let Ok(mut all) = shared.samples.lock() {
        all.append(samples);
    }
    samples.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_and_padded() {
        let mut rng = rand::thread_rng();
        for p in [Profile::Thermostat, Profile::Freezer, Profile::Door] {
            let plain = p.reading(3, &mut rng, None);
            assert!(
                serde_json::from_str::<serde_json::Value>(&plain).is_ok(),
                "{plain}"
            );
            let padded = p.reading(3, &mut rng, Some(100));
            let v: serde_json::Value = serde_json::from_str(&padded).unwrap();
            assert_eq!(padded.len(), 100, "{padded}");
            assert_eq!(v["seq"], 3);
        }
    }

    #[test]
    fn names_follow_the_profile() {
        assert_eq!(
            device_names("sim", Profile::Mixed, 4),
            [
                "sim-thermostat-0",
                "sim-freezer-1",
                "sim-door-2",
                "sim-thermostat-3"
            ]
        );
    }

    #[test]
    fn misbehaving_devices_send_bad_json_oversize_and_forbidden_topics() {
        let d = Device {
            thing: "sim-door-0".into(),
            profile: Profile::Door,
            qos: QoS::AtLeastOnce,
            payload_bytes: None,
            misbehaves: true,
            other: "sim-door-1".into(),
            period: None,
        };
        let mut rng = rand::thread_rng();
        let bad: Vec<(String, Vec<u8>, QoS)> = (0..15)
            .map(|s| d.message(s, &mut rng))
            .filter(|(t, p, _)| {
                !t.starts_with("dt/sim-door-0/")
                    || serde_json::from_slice::<serde_json::Value>(p).is_err()
            })
            .collect();
        assert_eq!(bad.len(), 3);
        assert!(bad
            .iter()
            .any(|(_, p, q)| p.len() == OVERSIZE_BYTES && *q == QoS::AtMostOnce));
        assert!(bad.iter().any(|(t, _, _)| t.starts_with("dt/sim-door-1/")));
    }

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (51.0, 99.0, 100.0));
    }
}
