//! Running as a Greengrass component: the checked-in recipe is what the binary generates; the
//! gateway reads its configuration as the recipe passes it, takes its site from
//! AWS_IOT_THING_NAME, keeps data under the work folder, signs AWS calls with credentials from
//! the token exchange service's container endpoint, and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::aws::{read_http_request, Moto, Sniffer};
use sitegate::admin::{self, AdminRequest, AdminResponse};
use sitegate::pki;
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
    let mut config = serde_json::to_value(sitegate::greengrass::default_config()).unwrap();
    config["listener"]["mqtts"] = format!("127.0.0.1:{port}").into();
    config["sinks"] = serde_json::json!({"telemetry": {"type": "kinesis", "stream": "site-telemetry", "endpoint": sniffer.endpoint()}});
    config["routes"] = serde_json::json!({"raw": {"from": "dt/#", "to": "telemetry"}});
    config["auth"] = serde_json::json!({
        "device_groups": {"sensors": {"selection_rule": "thingName: sensor-*", "policy": "telemetry"}},
        "policies": {"telemetry": {"all": {"operations": ["mqtt:connect", "mqtt:publish"], "resources": ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#"]}}}
    });
    let mut child = sitegate()
        .args(["run", "--config-env", "--base-dir"])
        .arg(work.path())
        .env(sitegate::greengrass::CONFIG_ENV, config.to_string())
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
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(work.path().join("pki/ca.pem"))
        .arg("--cert")
        .arg(&sensor.cert)
        .arg("--key")
        .arg(&sensor.key)
        .args([
            "-i",
            "sensor-1",
            "-t",
            "dt/sensor-1/temp",
            "-m",
            r#"{"t":4.5}"#,
            "-q",
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));

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
