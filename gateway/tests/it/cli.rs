//! The `sitegate` binary as an operator uses it: certificates, config checks, device commands
//! offline and against a running gateway, SIGTERM, and the demo.

use crate::common;
mod rounds;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sitegate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all(o: &Output) -> String {
    format!("{}{}", stdout(o), String::from_utf8_lossy(&o.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn certificates_config_and_device_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = sitegate(&[
        "ca",
        "init",
        "--dir",
        s(&pki),
        "--site",
        "plant-7",
        "--san",
        "hub.local",
    ]);
    assert!(out.status.success(), "{}", all(&out));
    let mode = std::fs::metadata(pki.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let devices = dir.path().join("devices");
    let out = sitegate(&[
        "device",
        "issue",
        "sensor-1",
        "--ca",
        s(&pki),
        "--out",
        s(&devices),
        "--days",
        "30",
    ]);
    assert!(out.status.success(), "{}", all(&out));
    let printed_id = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("certificate id: "))
        .unwrap()
        .trim()
        .to_owned();
    // The id is what openssl calls the SHA-256 fingerprint, without colons, in lowercase.
    let fp = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            s(&devices.join("sensor-1.pem")),
        ])
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(printed_id, fp);
    let mode = std::fs::metadata(devices.join("sensor-1.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // The certificate chains to the site CA, as openssl sees it.
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            s(&pki.join("ca.pem")),
            s(&devices.join("sensor-1.pem")),
        ])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", all(&verify));

    let config = dir.path().join("sitegate.toml");
    std::fs::write(
        &config,
        r#"
site = "plant-7"
data_dir = "data"
[listener]
mqtts = "127.0.0.1:0"
ca = "pki/ca.pem"
cert = "pki/gateway.pem"
key = "pki/gateway.key"
[auth.device_groups.sensors]
selection_rule = "thingName: sensor-*"
policy = "telemetry"
[auth.policies.telemetry.publish]
operations = ["mqtt:connect", "mqtt:publish"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#"]
"#,
    )
    .unwrap();
    let out = sitegate(&["config", "check", "--config", s(&config)]);
    assert!(out.status.success(), "{}", all(&out));

    // No gateway running: the command works on the registry directly.
    let out = sitegate(&["device", "approve", "sensor-1", "--config", s(&config)]);
    assert!(out.status.success(), "{}", all(&out));
    assert!(stdout(&out).contains("approved"), "{}", all(&out));

    let mut gateway = Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args(["run", "--config", s(&config)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = dir.path().join("data/admin.sock");
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gateway never opened its admin socket"
        );
        assert!(
            gateway.try_wait().unwrap().is_none(),
            "gateway exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sitegate(&["device", "list", "--config", s(&config)]);
    assert!(out.status.success(), "{}", all(&out));
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("sensor-1"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("approved") && line.contains("sensors"),
        "{line}"
    );

    let out = sitegate(&[
        "device",
        "approve",
        "sensor-2",
        "--group",
        "nope",
        "--config",
        s(&config),
    ]);
    assert!(!out.status.success());
    assert!(
        all(&out).contains("unknown group \"nope\""),
        "{}",
        all(&out)
    );

    let out = sitegate(&["device", "revoke", "sensor-1", "--config", s(&config)]);
    assert!(out.status.success(), "{}", all(&out));
    assert!(stdout(&out).contains("revoked"), "{}", all(&out));
    let out = sitegate(&["device", "list", "--json", "--config", s(&config)]);
    assert!(
        stdout(&out).contains("\"state\": \"revoked\""),
        "{}",
        all(&out)
    );

    // SIGTERM, as Greengrass stops a component: a clean exit.
    let kill = Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = gateway.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gateway ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn config_check_names_the_wrong_key() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/unknown-policy.toml");
    let out = sitegate(&["config", "check", "--config", s(&fixture)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        all(&out).contains("auth.device_groups.sensors.policy"),
        "{}",
        all(&out)
    );
}

#[test]
fn demo_runs_a_fleet_and_stops_cleanly() {
    // Long enough for a 5-second window of the demo's average rule to close.
    let out = sitegate(&["demo", "--seconds", "7"]);
    let text = all(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stopped cleanly"), "{text}");
    let summary = |label: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in {text}"))
    };
    assert_eq!(summary("connections accepted"), 6);
    assert!(summary("messages accepted") > 0);
    assert!(
        summary("publishes denied") > 0,
        "thermostat-9 and door-1 must be denied something"
    );
    assert!(
        summary("delivered to devices") > 0,
        "pump-1 must receive commands"
    );
    assert!(
        text.contains("door-1         approved"),
        "door-1 is approved live: {text}"
    );
    assert!(summary("spool commits (fsyncs)") > 0, "{text}");
    assert!(
        summary("rule warm_thermostats → alerts") > 0,
        "the filter rule shows rows: {text}"
    );
    assert!(
        summary("rule average_temp → averages") > 0,
        "the window rule shows rows: {text}"
    );
    assert!(text.contains("spool depth"), "{text}");
}

/// Findings 5, 10 and 11 of the hardening issue, as an operator meets them.
#[test]
fn operator_mistakes_are_refused_before_anything_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    assert!(sitegate(&["ca", "init", "--dir", s(&pki), "--site", "t"])
        .status
        .success());
    let devices = dir.path().join("devices");
    let issue = || {
        sitegate(&[
            "device",
            "issue",
            "sensor-1",
            "--ca",
            s(&pki),
            "--out",
            s(&devices),
        ])
    };
    assert!(issue().status.success());
    let cert = std::fs::read(devices.join("sensor-1.pem")).unwrap();
    let key = std::fs::read(devices.join("sensor-1.key")).unwrap();
    // Finding 5: issuing over an existing device is refused and leaves the pair as it was.
    let again = issue();
    assert!(!again.status.success());
    assert!(all(&again).contains("already exists"), "{}", all(&again));
    assert_eq!(std::fs::read(devices.join("sensor-1.pem")).unwrap(), cert);
    assert_eq!(std::fs::read(devices.join("sensor-1.key")).unwrap(), key);

    let config = dir.path().join("sitegate.toml");
    let write = |ca: &str, cert: &str, resource: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\n[listener]\nmqtts = \"127.0.0.1:0\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"pki/gateway.key\"\n[auth.device_groups.s]\nselection_rule = \"thingName: sensor-*\"\npolicy = \"p\"\n[auth.policies.p.pub]\noperations = [\"mqtt:publish\"]\nresources = [\"mqtt:topic:{resource}\"]\n"
            ),
        )
        .unwrap()
    };
    let check = || sitegate(&["config", "check", "--config", s(&config)]);
    write("pki/ca.pem", "pki/gateway.pem", "dt/#");
    assert!(check().status.success(), "{}", all(&check()));
    // Finding 10: a leaf certificate is not a trust anchor; missing TLS files fail the check.
    write("devices/sensor-1.pem", "pki/gateway.pem", "dt/#");
    let out = check();
    assert!(!out.status.success());
    assert!(
        all(&out).contains("listener.ca") && all(&out).contains("not a CA"),
        "{}",
        all(&out)
    );
    write("pki/ca.pem", "pki/missing.pem", "dt/#");
    let out = check();
    assert!(!out.status.success());
    assert!(all(&out).contains("listener.cert"), "{}", all(&out));
    // Topic resources that can never match are refused by name.
    for never in ["dt/#/x", "dt/+x/#"] {
        write("pki/ca.pem", "pki/gateway.pem", never);
        let out = check();
        assert!(!out.status.success(), "{never} accepted");
        assert!(
            all(&out).contains(never) && all(&out).contains("can never match"),
            "{}",
            all(&out)
        );
    }

    // Finding 11: an error says its cause once.
    let out = sitegate(&[
        "device",
        "list",
        "--config",
        s(&dir.path().join("nope.toml")),
    ]);
    assert!(!out.status.success());
    assert_eq!(all(&out).matches("os error 2").count(), 1, "{}", all(&out));

    // Finding 11: `device list | head` (a reader that goes away) is not a panic.
    write("pki/ca.pem", "pki/gateway.pem", "dt/#");
    assert!(
        sitegate(&["device", "approve", "sensor-1", "--config", s(&config)])
            .status
            .success()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args(["device", "list", "--config", s(&config)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}
