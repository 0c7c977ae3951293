//! A stand-in for Kinesis's PutRecords (and a one-shard ListShards) over HTTP (the JSON 1.1
//! protocol), for tests and
//! benches: it records what it was sent and fails the entries a test picks, so retries can be
//! checked entry by entry without a cloud account. Not used by the gateway itself.
#![allow(clippy::expect_used)]

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One PutRecords request as the fake endpoint saw it: the `n` of each record's payload.
pub type Seen = Arc<Mutex<Vec<Vec<u64>>>>;

/// Start the stand-in on a loopback port. It fails the entries `fail(request_number, n)` picks
/// (n is the `payload.n` of the record's envelope, or its position when absent) with
/// ProvisionedThroughputExceededException. Returns the endpoint URL and the log of requests.
pub async fn fake_kinesis(fail: fn(usize, u64) -> bool) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("fake Kinesis");
    let endpoint = format!("http://{}", listener.local_addr().expect("fake Kinesis"));
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Read one request: headers, then Content-Length bytes of body.
                    let header_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..header_end]).to_lowercase();
                    let list_shards = head.contains("kinesis_20131202.listshards");
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse().expect("fake Kinesis"))
                        })
                        .unwrap_or(0);
                    while buf.len() < header_end + len {
                        let mut chunk = [0u8; 8192];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[header_end..header_end + len])
                            .expect("fake Kinesis");
                    buf.drain(..header_end + len);
                    if list_shards {
                        // One shard over the whole key space: what every record is told.
                        let reply = serde_json::json!({"Shards": [{
                            "ShardId": "shardId-000000000000",
                            "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": u128::MAX.to_string()},
                            "SequenceNumberRange": {"StartingSequenceNumber": "0"},
                        }]})
                        .to_string();
                        if socket.write_all(&answer(&reply)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let ns: Vec<u64> = body["Records"]
                        .as_array()
                        .expect("fake Kinesis")
                        .iter()
                        .map(|r| {
                            let data = base64::engine::general_purpose::STANDARD
                                .decode(r["Data"].as_str().expect("fake Kinesis"))
                                .expect("fake Kinesis");
                            // Aggregated records are not JSON; they count as "no n".
                            let envelope: serde_json::Value =
                                serde_json::from_slice(&data).unwrap_or_default();
                            envelope["payload"]["n"].as_u64().unwrap_or(u64::MAX)
                        })
                        .collect();
                    let request_number = {
                        let mut log = log.lock().expect("fake Kinesis");
                        log.push(ns.clone());
                        log.len()
                    };
                    let results: Vec<serde_json::Value> = ns
                        .iter()
                        .map(|n| {
                            if fail(request_number, *n) {
                                serde_json::json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded for shard"})
                            } else {
                                serde_json::json!({"SequenceNumber": format!("{n}"), "ShardId": "shardId-000000000000"})
                            }
                        })
                        .collect();
                    let failed = results
                        .iter()
                        .filter(|r| r.get("ErrorCode").is_some())
                        .count();
                    let reply =
                        serde_json::json!({"FailedRecordCount": failed, "Records": results})
                            .to_string();
                    if socket.write_all(&answer(&reply)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (endpoint, seen)
}

/// An HTTP 200 carrying the JSON 1.1 body `reply`.
fn answer(reply: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n{}",
        reply.len(),
        reply
    )
    .into_bytes()
}
