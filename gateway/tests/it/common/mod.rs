//! A site for integration tests: a real CA, a gateway on 127.0.0.1:0, real device certificates,
//! and helpers that drive Debian's `mosquitto_pub` / `mosquitto_sub` against it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sitegate::config::{AuthConfig, Config, ListenerConfig, RouteConfig};
use sitegate::daemon::{Gateway, Listeners};
use sitegate::fleet::simulate::Summary;
use sitegate::fleet::DeviceCredentials;
use sitegate::identity::pki::{self, CaFiles, IssuedDevice};
use sitegate::metrics::{Stats, StatsSnapshot};
use sitegate::ops::admin::{self, AdminRequest, AdminResponse};
use sitegate_plugins::file::FileConfig;
use sitegate_plugins::{ByteSize, SinkConfig};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// Policies used by most tests: sensors publish their telemetry, pumps take commands,
/// a controller commands pumps, a monitor watches all telemetry.
pub(crate) const AUTH: &str = r#"
[device_groups.sensors]
selection_rule = "thingName: sensor-* OR thingName: door-*"
policy = "telemetry"

[device_groups.pumps]
selection_rule = "thingName: pump-*"
policy = "pump"

[device_groups.controllers]
selection_rule = "thingName: controller-1"
policy = "controller"

[device_groups.monitors]
selection_rule = "thingName: monitor-*"
policy = "monitor"

[policies.telemetry.connect]
operations = ["mqtt:connect"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}"]

[policies.telemetry.publish]
operations = ["mqtt:publish"]
resources = ["mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#", "mqtt:topic:status/${iot:Connection.Thing.ThingName}"]

[policies.pump.all]
operations = ["mqtt:connect", "mqtt:subscribe", "mqtt:publish"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topicfilter:cmd/${iot:Connection.Thing.ThingName}/#", "mqtt:topic:status/${iot:Connection.Thing.ThingName}"]

[policies.controller.all]
operations = ["mqtt:connect", "mqtt:publish"]
resources = ["mqtt:clientId:controller-1", "mqtt:topic:cmd/+/#"]

[policies.monitor.all]
operations = ["mqtt:connect", "mqtt:subscribe"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topicfilter:dt/#", "mqtt:topicfilter:status/#"]
"#;

/// A file sink writing to `path`, fsync on every batch.
pub(crate) fn file_sink(path: &Path) -> SinkConfig {
    SinkConfig::File(FileConfig {
        path: path.to_path_buf(),
        rotate_bytes: ByteSize(64 << 20),
        keep: 2,
        fsync: true,
    })
}

/// Route every telemetry message to one file sink called `archive`.
pub(crate) fn archive_to(config: &mut Config, path: &Path) {
    config.sinks.insert("archive".into(), file_sink(path));
    config.routes.insert(
        "telemetry".into(),
        RouteConfig {
            from: "dt/#".into(),
            to: "archive".into(),
        },
    );
}

/// Where [`archive_to`] writes, for a site's config.
pub(crate) fn out_path(config: &Config) -> PathBuf {
    config.data_dir.parent().unwrap().join("out/archive.jsonl")
}

pub(crate) struct Site {
    pub dir: TempDir,
    pub ca: CaFiles,
    pub config: Config,
    pub addr: SocketAddr,
    /// Where the gateway serves `/metrics`.
    pub metrics: SocketAddr,
    pub stats: Arc<Stats>,
    gateway: Option<Gateway>,
}

impl Site {
    pub(crate) async fn start() -> Site {
        Site::start_with(|_| {}).await
    }

    /// Starts a gateway after `adjust` has had its say on the config.
    pub(crate) async fn start_with(adjust: impl FnOnce(&mut Config)) -> Site {
        Site::start_with_nucleus(adjust, None).await
    }

    /// Starts a gateway connected to a Greengrass nucleus (a stand-in in tests).
    pub(crate) async fn start_with_nucleus(
        adjust: impl FnOnce(&mut Config),
        nucleus: Option<Arc<sitegate_plugins::nucleus::Nucleus>>,
    ) -> Site {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::init_ca(&dir.path().join("pki"), "test", &[]).unwrap();
        let mut config = Config {
            site: Some("test".into()),
            data_dir: dir.path().join("data"),
            auth: toml::from_str::<AuthConfig>(AUTH).unwrap(),
            ..Config::with_listener(ListenerConfig::with_defaults(
                "127.0.0.1:0",
                ca.ca_cert.clone(),
                ca.gateway_cert.clone(),
                ca.gateway_key.clone(),
            ))
        };
        adjust(&mut config);
        let listeners = Listeners {
            mqtts: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: admin::bind(&config.admin_socket()).unwrap(),
            metrics: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            nucleus,
        };
        let gateway = Gateway::start(config.clone(), listeners).await.unwrap();
        Site {
            addr: gateway.local_addr().unwrap(),
            metrics: gateway.metrics_addr().unwrap(),
            stats: gateway.stats(),
            gateway: Some(gateway),
            dir,
            ca,
            config,
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
    }

    /// Stops the gateway but keeps the site's files (for looking at what is left on disk).
    pub(crate) async fn halt(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
    }

    /// Stops the gateway and starts a new one on the same data (and a new port), after
    /// `adjust` has changed the config.
    pub(crate) async fn restart(&mut self, adjust: impl FnOnce(&mut Config)) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        adjust(&mut self.config);
        let listeners = Listeners {
            mqtts: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: admin::bind(&self.config.admin_socket()).unwrap(),
            metrics: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            nucleus: None,
        };
        let gateway = Gateway::start(self.config.clone(), listeners)
            .await
            .unwrap();
        self.addr = gateway.local_addr().unwrap();
        self.metrics = gateway.metrics_addr().unwrap();
        self.stats = gateway.stats();
        self.gateway = Some(gateway);
    }

    /// The live spool's status, through the admin socket.
    pub(crate) async fn spool_status(&self) -> sitegate::spool::SpoolStatus {
        match self.admin(AdminRequest::SpoolStatus).await {
            AdminResponse::Spool { spool } => spool,
            other => panic!("{other:?}"),
        }
    }

    pub(crate) fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub(crate) fn devices_dir(&self) -> PathBuf {
        self.dir.path().join("devices")
    }

    pub(crate) fn issue(&self, thing: &str) -> IssuedDevice {
        pki::issue_device(thing, &self.pki_dir(), &self.devices_dir(), 30).unwrap()
    }

    /// The gateway's live reconfiguration (what runs now).
    pub(crate) fn live(&self) -> Arc<sitegate::control::live::Live> {
        self.gateway.as_ref().expect("gateway running").live()
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub(crate) async fn admin(&self, request: AdminRequest) -> AdminResponse {
        admin::request(&self.config.admin_socket(), &request)
            .await
            .unwrap()
    }

    pub(crate) async fn approve(&self, thing: &str, groups: &[&str]) {
        let r = self
            .admin(AdminRequest::Approve {
                cert: None,
                thing: thing.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            })
            .await;
        assert!(matches!(r, AdminResponse::Device { .. }), "{r:?}");
    }

    /// Issues and approves a device in one go: its certificate, by id.
    pub(crate) async fn device(&self, thing: &str) -> IssuedDevice {
        let d = self.issue(thing);
        let r = self
            .admin(AdminRequest::Approve {
                cert: Some(d.cert_id.clone()),
                thing: thing.into(),
                groups: Vec::new(),
            })
            .await;
        assert!(matches!(r, AdminResponse::Device { .. }), "{r:?}");
        d
    }

    /// rumqttc-ready credentials of an issued device, trusting this site's CA.
    pub(crate) fn credentials(&self, device: &IssuedDevice) -> DeviceCredentials {
        DeviceCredentials::load(&device.thing, &self.ca.ca_cert, &device.cert, &device.key).unwrap()
    }

    /// The common TLS and identity arguments of the mosquitto clients.
    pub(crate) fn mosquitto_args(
        &self,
        cert: &Path,
        key: &Path,
        client_id: &str,
        v5: bool,
    ) -> Vec<String> {
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.addr.port().to_string(),
            "--cafile".into(),
            self.ca.ca_cert.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "-i".into(),
            client_id.into(),
            "-V".into(),
            if v5 { "mqttv5" } else { "mqttv311" }.into(),
        ]
    }

    /// `mosquitto_pub` of one message as `device` (client id = its thing unless given).
    pub(crate) async fn publish(
        &self,
        device: &IssuedDevice,
        topic: &str,
        message: &str,
        qos: u8,
        v5: bool,
    ) -> Output {
        self.publish_as(device, &device.thing, topic, message, qos, v5, &[])
            .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn publish_as(
        &self,
        device: &IssuedDevice,
        client_id: &str,
        topic: &str,
        message: &str,
        qos: u8,
        v5: bool,
        extra: &[&str],
    ) -> Output {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(self.mosquitto_args(&device.cert, &device.key, client_id, v5))
            .args(["-t", topic, "-m", message, "-q", &qos.to_string()])
            .args(extra)
            .stdin(Stdio::null());
        tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .expect("mosquitto_pub hung")
            .expect("mosquitto_pub runs (apt-get install mosquitto-clients)")
    }

    /// One `mosquitto_pub -l` connection as `device` on `topic` (MQTT 5, QoS 1): each line
    /// written to the returned stdin is a message.
    pub(crate) fn line_publisher(
        &self,
        device: &IssuedDevice,
        topic: &str,
    ) -> (Child, tokio::process::ChildStdin) {
        let mut child = Command::new("mosquitto_pub")
            .args(self.mosquitto_args(&device.cert, &device.key, &device.thing, true))
            .args(["-t", topic, "-q", "1", "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_pub runs (apt-get install mosquitto-clients)");
        let stdin = child.stdin.take().expect("piped stdin");
        (child, stdin)
    }

    /// Starts `mosquitto_sub` as `device` on `filter`, printing `topic payload` lines.
    pub(crate) fn subscribe(
        &self,
        device: &IssuedDevice,
        filter: &str,
        v5: bool,
        extra: &[&str],
    ) -> Child {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(self.mosquitto_args(&device.cert, &device.key, &device.thing, v5))
            .args(["-t", filter, "-q", "1", "-v"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn()
            .expect("mosquitto_sub runs (apt-get install mosquitto-clients)")
    }

    /// Waits until `check` holds on the counters, for at most 10 s.
    pub(crate) async fn wait_for(&self, what: &str, check: impl Fn(&StatsSnapshot) -> bool) {
        for _ in 0..200 {
            if check(&self.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}; counters: {:?}",
            self.snapshot()
        );
    }
}

/// Every byte of every file under `dir`, for at-rest checks.
pub(crate) fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

/// The JSON lines a file sink wrote (a torn last line from a crash is skipped).
pub(crate) fn sink_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (up to 20 s) until the file sink at `path` holds at least `n` lines; returns them all.
pub(crate) async fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..400 {
        let lines = sink_lines(path);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "file sink {} never reached {n} lines: {:?}",
        path.display(),
        sink_lines(path)
    );
}

pub(crate) fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Reads a running `mosquitto_sub`'s output until it exits or `limit` passes, then kills it.
pub(crate) async fn collect(mut child: Child, limit: Duration) -> String {
    let _ = tokio::time::timeout(limit, child.wait()).await;
    let _ = child.start_kill();
    let out = child.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sitegate simulate` with `args` against `site`; returns its summary.
pub(crate) async fn simulate(site: &Site, args: &[&str]) -> Summary {
    let config = site.dir.path().join("sitegate.toml");
    std::fs::write(&config, toml::to_string(&site.config).unwrap()).unwrap();
    let json = site
        .dir
        .path()
        .join(format!("summary-{}.json", rand::random::<u32>()));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sitegate"))
            .arg("simulate")
            .args(["--gateway", &site.addr.to_string()])
            .args(["--ca", site.pki_dir().to_str().unwrap()])
            .args(["--config", config.to_str().unwrap()])
            .args(["--json", json.to_str().unwrap()])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("simulate finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "simulate failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("latency") && stdout.contains("p99"),
        "{stdout}"
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

pub(crate) mod aws;
pub(crate) mod raw;
