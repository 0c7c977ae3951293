//! The AWS emulator for tests: `moto_server` on a free loopback port, and a switchable TCP
//! relay in front of it to play an unreachable endpoint.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Moto accepts any credentials; the SDK's standard chain reads them from the environment.
pub(crate) fn fake_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::remove_var("AWS_PROFILE");
    });
}

/// A running `moto_server`, killed on drop.
pub(crate) struct Moto {
    pub endpoint: String,
    child: Child,
}

/// A loopback port nothing listens on now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    pub(crate) async fn start() -> Moto {
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        Moto::run(cmd, port).await
    }

    /// `moto_server` naming IoT certificates as AWS IoT does, by the SHA-256 of their DER (its
    /// `iot.use_valid_cert` setting; by default it hashes the PEM text). This moto has no HTTP
    /// call for that setting, so its server is started from Python with it set.
    pub(crate) async fn start_with_der_certificate_ids() -> Moto {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import sys\n\
             from moto.core.config import default_user_config\n\
             default_user_config['iot']['use_valid_cert'] = True\n\
             from moto.server import main\n\
             main(sys.argv[1:])",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]);
        Moto::run(cmd, port).await
    }

    async fn run(mut cmd: Command, port: u16) -> Moto {
        fake_credentials();
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]'; scripts/test installs it)");
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Moto { endpoint, child };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not listen on {endpoint}");
    }

    /// A KMS client for the emulator.
    pub(crate) async fn kms(&self) -> aws_sdk_kms::Client {
        let target = sitegate_plugins::aws::AwsTarget {
            endpoint: Some(&self.endpoint),
            region: Some("us-east-1"),
            max_attempts: 1,
        };
        aws_sdk_kms::Client::new(&sitegate_plugins::aws::sdk_config(&target).await)
    }

    /// An IoT client for the emulator, at `endpoint` (the emulator's, or a relay's).
    pub(crate) async fn iot(&self, endpoint: &str) -> aws_sdk_iot::Client {
        let target = sitegate_plugins::aws::AwsTarget {
            endpoint: Some(endpoint),
            region: Some("us-east-1"),
            max_attempts: 1,
        };
        aws_sdk_iot::Client::new(&sitegate_plugins::aws::sdk_config(&target).await)
    }

    /// Creates a symmetric KMS key and returns its id.
    pub(crate) async fn create_kms_key(&self) -> String {
        let out = self
            .kms()
            .await
            .create_key()
            .description("sitegate test")
            .send()
            .await
            .unwrap();
        out.key_metadata().unwrap().key_id().to_string()
    }
}

/// A TCP relay to `target` that can be switched off: new connections are closed at once and
/// open ones are cut.
pub(crate) struct Relay {
    pub addr: SocketAddr,
    on: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub(crate) async fn start(target: &str) -> Relay {
        let target: SocketAddr = target.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cuts.changed() => {}
                        }
                    }
                });
            }
        });
        Relay { addr, on, cut }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        if !on {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// One record read back from a stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamRecord {
    pub shard_id: String,
    pub partition_key: String,
    pub sequence_number: String,
    pub data: Vec<u8>,
}

impl Moto {
    pub(crate) async fn kinesis(&self, endpoint: &str) -> aws_sdk_kinesis::Client {
        let target = sitegate_plugins::aws::AwsTarget {
            endpoint: Some(endpoint),
            region: Some("us-east-1"),
            max_attempts: 1,
        };
        aws_sdk_kinesis::Client::new(&sitegate_plugins::aws::sdk_config(&target).await)
    }

    /// Creates a stream with `shards` shards and waits until it is active.
    pub(crate) async fn create_stream(&self, name: &str, shards: i32) {
        let k = self.kinesis(&self.endpoint).await;
        k.create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .unwrap();
        for _ in 0..100 {
            let d = k
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .unwrap();
            if d.stream_description_summary()
                .map(|s| s.stream_status().as_str() == "ACTIVE")
                .unwrap_or(false)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("stream {name} never became active");
    }

    /// Every record in every shard of `name`, shard by shard, each shard in order.
    pub(crate) async fn read_stream(&self, name: &str) -> Vec<StreamRecord> {
        let k = self.kinesis(&self.endpoint).await;
        let shards = k.list_shards().stream_name(name).send().await.unwrap();
        let mut out = Vec::new();
        for shard in shards.shards() {
            let it = k
                .get_shard_iterator()
                .stream_name(name)
                .shard_id(shard.shard_id())
                .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .send()
                .await
                .unwrap();
            let mut iterator = it.shard_iterator().map(str::to_string);
            while let Some(i) = iterator.take() {
                let page = k
                    .get_records()
                    .shard_iterator(i)
                    .limit(10_000)
                    .send()
                    .await
                    .unwrap();
                for r in page.records() {
                    out.push(StreamRecord {
                        shard_id: shard.shard_id().to_string(),
                        partition_key: r.partition_key().unwrap_or_default().to_string(),
                        sequence_number: r.sequence_number().to_string(),
                        data: r.data().as_ref().to_vec(),
                    });
                }
                if page.records().is_empty() {
                    break;
                }
                iterator = page.next_shard_iterator().map(str::to_string);
            }
        }
        out
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body) from `socket` into `buf`;
/// returns (head, body) or None at end of stream.
pub(crate) async fn read_http_request(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((head, body))
}

/// A relay to `target` that keeps the head of the first request on each connection, to see
/// how requests were signed.
pub(crate) struct Sniffer {
    pub addr: SocketAddr,
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Sniffer {
    pub(crate) async fn start(target: &str) -> Sniffer {
        let target: SocketAddr = target.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let log = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut buf = Vec::new();
                    let Some((head, body)) = read_http_request(&mut inbound, &mut buf).await else {
                        return;
                    };
                    log.lock().unwrap().push(head.clone());
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = outbound.write_all(head.as_bytes()).await;
                    let _ = outbound.write_all(&body).await;
                    let _ = outbound.write_all(&buf).await;
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Sniffer { addr, heads }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}
