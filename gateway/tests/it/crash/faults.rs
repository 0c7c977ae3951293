//! Storage faults against a child `sitegate run`: a full disk (a small tmpfs, so these tests
//! run as root, as CI does), damaged and truncated store files, a deleted key file. A QoS 1
//! client records every PUBACK; at the end every acknowledged message must be at the file
//! sink, or be counted (dropped by `drop_oldest`, or lost with the damaged files).

use super::*;

use std::path::PathBuf;
use std::process::Output;

/// A site whose data_dir may sit on its own filesystem, with a file sink that can be blocked
/// (its folder replaced by a plain file) to play an uplink outage.
struct FaultSite {
    root: PathBuf,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    creds: Arc<DeviceCredentials>,
    mount: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for FaultSite {
    fn drop(&mut self) {
        if let Some(m) = &self.mount {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl FaultSite {
    /// `tmpfs_mib`: put data_dir on a tmpfs of that size. `spool`: extra `[spool]` keys.
    /// `key_file`: configure `[spool.encryption] key_file`, else the default in data_dir.
    async fn new(tmpfs_mib: Option<u64>, spool: &str, key_file: bool) -> FaultSite {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let ca = pki::init_ca(&root.join("pki"), "faults", &[]).unwrap();
        sitegate::spool::keys::generate_kek(&root.join("pki/spool.kek")).unwrap();
        let device =
            pki::issue_device("sensor-1", &root.join("pki"), &root.join("devices"), 30).unwrap();
        let creds = Arc::new(
            DeviceCredentials::load("sensor-1", &ca.ca_cert, &device.cert, &device.key).unwrap(),
        );
        let mut mount = None;
        let data = match tmpfs_mib {
            Some(mib) => {
                let m = root.join("disk");
                std::fs::create_dir_all(&m).unwrap();
                let ok = std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                    .arg(&m)
                    .status()
                    .unwrap();
                assert!(ok.success(), "mount -t tmpfs needs root (as in CI)");
                mount = Some(m.clone());
                m.join("data")
            }
            None => root.join("data"),
        };
        let port = free_port();
        let config = root.join("sitegate.toml");
        std::fs::write(&config, config_toml(&root, &data, port, spool, key_file)).unwrap();
        approve_sensor(&config).await;
        FaultSite {
            log: root.join("gateway.log"),
            root,
            data,
            config,
            port,
            creds,
            mount,
            _dir: dir,
        }
    }

    fn out(&self) -> PathBuf {
        self.root.join("out/archive.jsonl")
    }

    /// The sink's folder becomes a plain file: every write fails, records wait in the spool.
    fn block_sink(&self) {
        let out = self.root.join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::write(&out, b"not a folder").unwrap();
    }

    fn unblock_sink(&self) {
        let out = self.root.join("out");
        let _ = std::fs::remove_file(&out);
        std::fs::create_dir_all(&out).unwrap();
    }

    async fn start(&self) -> Child {
        start_gateway(&self.config, &self.log, self.port).await
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn sitegate(&self, args: &[&str]) -> Output {
        sitegate().args(args).output().await.unwrap()
    }

    /// Numbers delivered to the sink, first sightings in order, and the count of repeats.
    fn delivered(&self) -> (Vec<u64>, usize) {
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        let mut dups = 0;
        for l in common::sink_lines(&self.out()) {
            let n = l["payload"]["n"].as_u64().unwrap();
            if seen.insert(n) {
                order.push(n);
            } else {
                dups += 1;
            }
        }
        (order, dups)
    }

    async fn wait_delivered(&self, want: &BTreeSet<u64>, limit: Duration) -> (Vec<u64>, usize) {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let got = self.delivered();
            let seen: BTreeSet<u64> = got.0.iter().copied().collect();
            if want.is_subset(&seen) || tokio::time::Instant::now() > end {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self) -> serde_json::Value {
        let out = self
            .sitegate(&[
                "spool",
                "status",
                "--json",
                "--config",
                self.config.to_str().unwrap(),
            ])
            .await;
        assert!(out.status.success(), "{}", common::text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Sends SIGTERM and waits; returns the exit status and how long it took.
async fn terminate(child: &mut Child) -> (std::process::ExitStatus, Duration) {
    let pid = child.id().unwrap();
    let started = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the gateway did not end within 60 s of SIGTERM")
        .unwrap();
    (status, started.elapsed())
}

/// A QoS 1 publisher that records acknowledged numbers, until stopped.
struct Publisher {
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Incompressible filler, so that the spool's bytes track the messages' bytes.
fn noise(n: u64, len: usize) -> String {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

impl Publisher {
    fn start(site: &FaultSite, size: usize) -> Publisher {
        let next: Arc<Mutex<u64>> = Arc::default();
        let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let creds = site.creds.clone();
        let port = site.port;
        let (n2, a2) = (next.clone(), acked.clone());
        let task = tokio::spawn(async move {
            loop {
                if *stopped.borrow() {
                    return;
                }
                publish_session(&creds, port, &n2, &a2, size, stopped.clone()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Publisher { acked, stop, task }
    }

    fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits until `want` more acknowledgements arrive, or `limit` passes; the count seen.
    async fn wait_acks(&self, from: usize, want: usize, limit: Duration) -> usize {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let n = self.acked.lock().unwrap().len();
            if n >= from + want || tokio::time::Instant::now() > end {
                return n - from;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> BTreeSet<u64> {
        self.stop.send_replace(true);
        let acked = self.acked.clone();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        let out = acked.lock().unwrap().clone();
        out
    }
}

/// One MQTT session: publishes with at most 20 in flight, records PUBACKs, ends when the
/// connection does or `stopped` turns true.
async fn publish_session(
    creds: &DeviceCredentials,
    port: u16,
    next: &Mutex<u64>,
    acked: &Mutex<BTreeSet<u64>>,
    size: usize,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let Ok(mut opts) = creds.mqtt_options(addr, Duration::from_secs(30)) else {
        return;
    };
    opts.set_inflight(20);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 20);
    let sent: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let producer = {
        let sent = sent.clone();
        let first = *next.lock().unwrap();
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(first));
        let c2 = counter.clone();
        let handle = tokio::spawn(async move {
            loop {
                let n = c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                sent.lock().unwrap().push_back(n);
                let body = format!(r#"{{"n":{n},"fill":"{}"}}"#, noise(n, size));
                if client
                    .publish("dt/sensor-1/seq", QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        (handle, counter)
    };
    let mut by_pkid: HashMap<u16, u64> = HashMap::new();
    loop {
        tokio::select! {
            ev = tokio::time::timeout(Duration::from_secs(30), events.poll()) => match ev {
                Ok(Ok(event)) => track(&event, &sent, &mut by_pkid, acked),
                Ok(Err(_)) | Err(_) => break,
            },
            _ = stopped.changed() => {
                // Stop sending, but hear the PUBACKs of what is in flight, so that the
                // acknowledged set is exactly what the gateway promised.
                producer.0.abort();
                loop {
                    match tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
                        Ok(Ok(event)) => track(&event, &sent, &mut by_pkid, acked),
                        Ok(Err(_)) => break,
                        Err(_) if by_pkid.is_empty() => break,
                        Err(_) => {}
                    }
                }
                break;
            }
        }
    }
    producer.0.abort();
    let used = producer.1.load(std::sync::atomic::Ordering::SeqCst);
    let mut n = next.lock().unwrap();
    *n = (*n).max(used);
}

/// Fills the filesystem of `dir` until `leave` bytes are free; returns the filler's path.
fn fill_until(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    let free = fs2::available_space(dir).unwrap();
    let size = free.saturating_sub(leave);
    let f = std::fs::File::create(&filler).unwrap();
    use std::io::Write as _;
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![0x5au8; 1 << 16];
    let mut written = 0;
    while written < size {
        let n = chunk.len().min((size - written) as usize);
        if w.write_all(&chunk[..n]).is_err() {
            break;
        }
        written += n as u64;
    }
    let _ = w.flush();
    filler
}

async fn disk_full_round(when_full: &str) {
    let site = FaultSite::new(
        Some(48),
        &format!("when_full = \"{when_full}\"\ndisk_reserve = \"8MiB\""),
        true,
    )
    .await;
    site.block_sink();
    let mut child = site.start().await;
    let publisher = Publisher::start(&site, 2000);
    assert!(publisher.wait_acks(0, 500, Duration::from_secs(30)).await >= 500);
    // Leave 12 MiB: the spool reaches its 8 MiB reserve after a few MiB more.
    let filler = fill_until(&site.data, 12 << 20);
    let mut quiet = false;
    for _ in 0..60 {
        let before = publisher.acked().len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if publisher.acked().len() == before {
            quiet = true;
            break;
        }
        if when_full == "drop_oldest" && site.log_text().contains("dropping its oldest blocks") {
            // Keep going below the reserve for a while: the queue must hold its size.
            publisher
                .wait_acks(publisher.acked().len(), 3000, Duration::from_secs(30))
                .await;
            break;
        }
    }
    let held_at = publisher.acked().len();
    let log = site.log_text();
    if when_full == "block" {
        assert!(quiet, "PUBACKs never stopped below the reserve");
        assert!(log.contains("holding PUBACKs until space returns"), "{log}");
    } else {
        assert!(!quiet, "drop_oldest must keep acknowledging");
        assert!(log.contains("dropping its oldest blocks"), "{log}");
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the gateway died: {log}"
    );
    assert!(
        !log.contains("No space left"),
        "sled met a full disk: {log}"
    );
    // Space comes back: PUBACKs resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    let resumed = publisher
        .wait_acks(held_at, 200, Duration::from_secs(30))
        .await;
    assert!(
        resumed >= 200,
        "PUBACKs did not resume after space returned ({resumed})"
    );
    let acked = publisher.stop().await;
    site.unblock_sink();
    let (delivered, dups) = site.wait_delivered(&acked, Duration::from_secs(90)).await;
    let status = site.status().await;
    let dropped = status["queues"][0]["dropped_records"].as_u64().unwrap();
    let (code, took) = terminate(&mut child).await;
    let seen: BTreeSet<u64> = delivered.iter().copied().collect();
    let missing = acked.difference(&seen).count() as u64;
    println!(
        "disk full ({when_full}): {} acked, {} delivered, {dups} duplicated, {missing} missing, {dropped} dropped; SIGTERM took {took:?}",
        acked.len(),
        delivered.len()
    );
    assert!(code.success(), "exit {code:?}: {}", site.log_text());
    assert!(took < sitegate::daemon::STOP_DEADLINE + Duration::from_secs(5));
    assert!(delivered.windows(2).all(|w| w[0] < w[1]), "out of order");
    if when_full == "block" {
        assert_eq!(missing, 0, "acknowledged and not delivered");
    } else {
        assert_eq!(missing, dropped, "every missing message is a counted drop");
        assert!(
            delivered.len() >= 1000,
            "below the reserve the queue keeps its size, it does not dwindle ({} left)",
            delivered.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_holds_pubacks_in_block_mode_and_resumes_without_a_restart() {
    disk_full_round("block").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_drops_oldest_in_drop_oldest_mode_and_counts_it() {
    disk_full_round("drop_oldest").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_reserve_a_store_error_ends_the_process_and_a_restart_delivers_everything() {
    let site = FaultSite::new(Some(24), "disk_reserve = 0", true).await;
    site.block_sink();
    let mut child = site.start().await;
    let publisher = Publisher::start(&site, 2000);
    assert!(publisher.wait_acks(0, 200, Duration::from_secs(30)).await >= 200);
    let filler = fill_until(&site.data, 1 << 20);
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the gateway neither failed nor stopped with its disk full")
        .unwrap();
    assert!(
        !status.success(),
        "a failed store must exit non-zero: {status:?}"
    );
    let acked = publisher.stop().await;
    let log = site.log_text();
    assert!(log.contains("the spool's store failed"), "{log}");
    std::fs::remove_file(&filler).unwrap();
    site.unblock_sink();
    let mut child = site.start().await;
    let (delivered, dups) = site.wait_delivered(&acked, Duration::from_secs(90)).await;
    let seen: BTreeSet<u64> = delivered.iter().copied().collect();
    let missing: Vec<_> = acked.difference(&seen).collect();
    println!(
        "ENOSPC with no reserve: exit {status:?}; {} acked, {} delivered, {dups} duplicated, {} missing",
        acked.len(),
        delivered.len(),
        missing.len()
    );
    let (code, _) = terminate(&mut child).await;
    assert!(code.success());
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {} (log {})",
        missing.len(),
        site.log.display()
    );
}

/// How a damaged store is damaged, between a clean stop and the next start.
#[derive(Debug, Clone, Copy)]
enum Harm {
    FlipLogByte,
    ZeroLogPage,
    TruncateLogTail,
    FlipConfByte,
    FlipSnapshotByte,
}

fn harm(data: &Path, how: Harm) {
    let store = data.join("db");
    let pick = |prefix: &str| -> PathBuf {
        std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {}", store.display()))
    };
    let edit = |path: &Path, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = std::fs::read(path).unwrap();
        f(&mut bytes);
        std::fs::write(path, bytes).unwrap();
    };
    match how {
        Harm::FlipLogByte => edit(&store.join("db"), &|b| {
            let at = b.len() / 3;
            b[at] ^= 0x20;
        }),
        Harm::ZeroLogPage => edit(&store.join("db"), &|b| {
            let at = (b.len() / 2) & !4095;
            let end = (at + 4096).min(b.len());
            b[at..end].fill(0);
        }),
        Harm::TruncateLogTail => edit(&store.join("db"), &|b| {
            let keep = b.len().saturating_sub(64 << 10);
            b.truncate(keep);
        }),
        Harm::FlipConfByte => edit(&store.join("conf"), &|b| b[3] ^= 0x01),
        Harm::FlipSnapshotByte => edit(&pick("snap."), &|b| {
            let at = b.len() / 2;
            b[at] ^= 0x10;
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_store_files_never_stop_the_gateway_and_losses_are_counted_and_recovered() {
    for how in [
        Harm::FlipLogByte,
        Harm::ZeroLogPage,
        Harm::TruncateLogTail,
        Harm::FlipConfByte,
        Harm::FlipSnapshotByte,
    ] {
        let site = FaultSite::new(None, "", true).await;
        site.block_sink();
        let mut child = site.start().await;
        let publisher = Publisher::start(&site, 300);
        publisher.wait_acks(0, 3000, Duration::from_secs(60)).await;
        let acked = publisher.stop().await;
        let (code, _) = terminate(&mut child).await;
        assert!(code.success());
        harm(&site.data, how);

        let mut child = site.start().await;
        let status = site.status().await;
        let lost_at_start = status["queues"][0]["lost_records"].as_u64().unwrap();
        let (code, _) = terminate(&mut child).await;
        assert!(code.success(), "{how:?}: {}", site.log_text());
        let aside: Vec<PathBuf> = std::fs::read_dir(&site.data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("db.damaged-")
            })
            .collect();
        let mut recovered = 0u64;
        for dir in &aside {
            let out = site
                .sitegate(&[
                    "spool",
                    "recover",
                    "--json",
                    "--config",
                    site.config.to_str().unwrap(),
                    dir.to_str().unwrap(),
                ])
                .await;
            assert!(out.status.success(), "{how:?}: {}", common::text(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            recovered += report["recovered"]["archive"].as_u64().unwrap_or(0);
        }
        site.unblock_sink();
        let mut child = site.start().await;
        let (delivered, dups) = site.wait_delivered(&acked, Duration::from_secs(60)).await;
        let status = site.status().await;
        let lost = status["queues"][0]["lost_records"].as_u64().unwrap();
        let (code, _) = terminate(&mut child).await;
        assert!(code.success());
        let seen: BTreeSet<u64> = delivered.iter().copied().collect();
        let missing = acked.difference(&seen).count() as u64;
        println!(
            "{how:?}: {} acked, {} delivered, {dups} duplicated, {missing} missing; lost at start {lost_at_start}, recovered {recovered}, still lost {lost}; set aside: {}",
            acked.len(),
            delivered.len(),
            aside.len()
        );
        assert_eq!(
            missing,
            lost,
            "{how:?}: every missing message is counted lost, and only those ({})",
            site.log.display()
        );
        if lost_at_start > 0 {
            assert!(
                site.log_text().contains("missing from the store"),
                "{how:?}: losses are logged"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_default_key_file_stops_the_start_with_the_fix_spelled_out() {
    let site = FaultSite::new(None, "", false).await;
    site.block_sink();
    let mut child = site.start().await;
    let publisher = Publisher::start(&site, 100);
    publisher.wait_acks(0, 500, Duration::from_secs(30)).await;
    publisher.stop().await;
    terminate(&mut child).await;
    std::fs::remove_file(site.data.join("spool.kek")).unwrap();
    let out = site
        .sitegate(&["run", "--config", site.config.to_str().unwrap()])
        .await;
    let text = common::text(&out);
    assert!(!out.status.success());
    assert!(text.contains("spool.kek is missing"), "{text}");
    assert!(text.contains("Put the key file back"), "{text}");
    assert!(
        !site.data.join("spool.kek").exists(),
        "no new key replaces the lost one"
    );
}
