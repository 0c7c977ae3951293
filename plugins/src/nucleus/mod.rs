//! Greengrass IPC: the nucleus's event-stream RPC over its Unix socket.
//!
//! The nucleus serves each component on the socket named in
//! `AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`. A connection opens with a CONNECT
//! message carrying the component's `SVCUID`; after the nucleus accepts it, every operation is a
//! stream: the client opens one with a request naming the operation, and the nucleus answers on
//! the same stream id, once (request/response) or with a response and then events
//! (subscriptions). Frames are AWS event-stream messages (prelude, typed headers, payload,
//! CRC32s), encoded and checked by `aws-smithy-eventstream`; payloads are JSON.
//!
//! [`Nucleus`] holds one connection, opens a new one after it breaks, and is shared by the
//! gateway's configuration follower and every `iotcore` sink with `via = "nucleus"`.

mod frame;
#[cfg(any(test, feature = "test-support"))]
pub mod standin;
#[cfg(test)]
mod tests;

pub use frame::{flags, message_type, read_frame, write_frame, Frame, MAX_FRAME_BYTES};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Names the nucleus's socket for this component.
pub const SOCKET_ENV: &str = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT";
/// The component's IPC auth token.
pub const SVCUID_ENV: &str = "SVCUID";
/// The event-stream RPC version the nucleus speaks.
pub const PROTOCOL_VERSION: &str = "0.1.0";
/// Prefix of every operation and model type name.
pub const SERVICE: &str = "aws.greengrass#";
/// The nucleus must accept a connection within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An operation's response must come back within this time.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to the socket that does not finish in this time breaks the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Events a subscription buffers before further ones are dropped (they are hints to re-read).
const EVENT_QUEUE: usize = 64;

/// Why an IPC call failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error(
        "{0} is not set: Greengrass IPC works only when sitegate runs as a Greengrass component"
    )]
    NotAComponent(&'static str),
    #[error("cannot reach the nucleus at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the nucleus refused the connection: the component's SVCUID was not accepted")]
    Refused,
    #[error("no answer from the nucleus to {what} within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("the connection to the nucleus closed")]
    Closed,
    #[error("IPC socket: {0}")]
    Io(std::io::Error),
    #[error("nucleus IPC protocol error: {0}")]
    Protocol(String),
    /// The nucleus answered with an error model (`UnauthorizedError`, `ResourceNotFoundError`, …).
    #[error("{operation} failed: {kind}: {message}")]
    Service {
        operation: String,
        kind: String,
        message: String,
    },
}

impl IpcError {
    /// Whether the same call may succeed later without a change on our side.
    pub fn retryable(&self) -> bool {
        match self {
            IpcError::Connect { .. }
            | IpcError::Timeout { .. }
            | IpcError::Closed
            | IpcError::Io(_) => true,
            IpcError::Service { kind, .. } => kind == "ServiceError",
            _ => false,
        }
    }
}

/// One QoS 1 publish through the nucleus to AWS IoT Core.
#[derive(Debug, Clone)]
pub struct IotCorePublish<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub content_type: Option<&'a str>,
    /// MQTT 5 user properties; the nucleus forwards them to IoT Core.
    pub user_properties: &'a [(String, String)],
}

/// A handle on the local nucleus; cheap to share.
pub struct Nucleus {
    socket: PathBuf,
    svcuid: String,
    call_timeout: Duration,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Nucleus {
    // The SVCUID is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nucleus")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Nucleus {
    /// Connects to the nucleus named by the component's environment.
    pub async fn from_env() -> Result<Nucleus, IpcError> {
        let socket = std::env::var_os(SOCKET_ENV).ok_or(IpcError::NotAComponent(SOCKET_ENV))?;
        let svcuid = std::env::var(SVCUID_ENV).map_err(|_| IpcError::NotAComponent(SVCUID_ENV))?;
        Nucleus::connect(Path::new(&socket), &svcuid).await
    }

    /// Connects and authenticates now, so a wrong socket or token shows at startup.
    pub async fn connect(socket: &Path, svcuid: &str) -> Result<Nucleus, IpcError> {
        let nucleus = Nucleus {
            socket: socket.to_path_buf(),
            svcuid: svcuid.to_string(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connection: tokio::sync::Mutex::new(None),
        };
        nucleus.connection().await?;
        Ok(nucleus)
    }

    /// The socket this handle talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The live connection, or a new one when the last one broke.
    async fn connection(&self) -> Result<Arc<Connection>, IpcError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.open.load(Ordering::Acquire)) {
            return Ok(Arc::clone(c));
        }
        let connection = Arc::new(Connection::open(&self.socket, &self.svcuid).await?);
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// Sends the request that opens a stream for `operation`; the returned [`Pending`] yields
    /// what the nucleus answers on it.
    pub async fn start(&self, operation: &str, request: &Value) -> Result<Pending, IpcError> {
        self.open_stream(operation, request, 2).await
    }

    async fn open_stream(
        &self,
        operation: &str,
        request: &Value,
        queue: usize,
    ) -> Result<Pending, IpcError> {
        let connection = self.connection().await?;
        let (tx, rx) = mpsc::channel(queue);
        let stream_id = connection.register(tx)?;
        let frame = Frame::new(message_type::APPLICATION_MESSAGE, 0, stream_id)
            .with("operation", &format!("{SERVICE}{operation}"))
            .with(
                "service-model-type",
                &format!("{SERVICE}{operation}Request"),
            )
            .json(request);
        if let Err(e) = connection.send(&frame).await {
            connection.forget(stream_id);
            return Err(e);
        }
        Ok(Pending {
            operation: operation.to_string(),
            rx,
            timeout: self.call_timeout,
        })
    }

    /// A request/response operation: the response's JSON.
    pub async fn call(&self, operation: &str, request: &Value) -> Result<Value, IpcError> {
        self.start(operation, request).await?.response().await
    }

    /// Starts a QoS 1 `PublishToIoTCore`; await [`Pending::response`] for the nucleus's answer.
    /// Several may be in flight at once.
    pub async fn publish_to_iot_core(
        &self,
        publish: &IotCorePublish<'_>,
    ) -> Result<Pending, IpcError> {
        let mut request = json!({
            "topicName": publish.topic,
            "qos": "1",
            "payload": base64::engine::general_purpose::STANDARD.encode(publish.payload),
        });
        if let Some(content_type) = publish.content_type {
            request["contentType"] = json!(content_type);
        }
        if !publish.user_properties.is_empty() {
            request["userProperties"] = publish
                .user_properties
                .iter()
                .map(|(key, value)| json!({ "key": key, "value": value }))
                .collect();
        }
        self.start("PublishToIoTCore", &request).await
    }

    /// This component's configuration below `key_path` (`GetConfiguration`).
    pub async fn get_configuration(&self, key_path: &[&str]) -> Result<Value, IpcError> {
        let mut response = self
            .call("GetConfiguration", &json!({ "keyPath": key_path }))
            .await?;
        Ok(response
            .get_mut("value")
            .map(Value::take)
            .unwrap_or(Value::Null))
    }

    /// Messages from IoT Core on `filter` (`SubscribeToIoTCore`, QoS 1): each event is an
    /// `IoTCoreMessage`, read with [`iot_core_message`].
    pub async fn subscribe_to_iot_core(&self, filter: &str) -> Result<Subscription, IpcError> {
        let mut pending = self
            .open_stream(
                "SubscribeToIoTCore",
                &json!({ "topicName": filter, "qos": "1" }),
                EVENT_QUEUE,
            )
            .await?;
        pending.next_reply().await?;
        Ok(Subscription { pending })
    }

    /// Follows changes of this component's configuration below `key_path`
    /// (`SubscribeToConfigurationUpdate`).
    pub async fn subscribe_to_configuration_update(
        &self,
        key_path: &[&str],
    ) -> Result<Subscription, IpcError> {
        let mut pending = self
            .open_stream(
                "SubscribeToConfigurationUpdate",
                &json!({ "keyPath": key_path }),
                EVENT_QUEUE,
            )
            .await?;
        pending.next_reply().await?;
        Ok(Subscription { pending })
    }
}

/// A message from IoT Core as an `IoTCoreMessage` event carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IotCoreMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// Reads an `IoTCoreMessage` event; `None` when it is not one (no topic, bad base64).
pub fn iot_core_message(event: &Value) -> Option<IotCoreMessage> {
    let m = &event["message"];
    let topic = m["topicName"].as_str()?.to_string();
    let payload = match m["payload"].as_str() {
        Some(p) => base64::engine::general_purpose::STANDARD.decode(p).ok()?,
        None => Vec::new(),
    };
    let user_properties = m["userProperties"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["key"].as_str()?.to_string(),
                        p["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(IotCoreMessage {
        topic,
        payload,
        content_type: m["contentType"].as_str().map(String::from),
        user_properties,
    })
}

/// The answers still to come on one stream.
#[derive(Debug)]
pub struct Pending {
    operation: String,
    rx: mpsc::Receiver<Frame>,
    timeout: Duration,
}

impl Pending {
    /// The operation's response (request/response operations).
    pub async fn response(mut self) -> Result<Value, IpcError> {
        self.next_reply().await
    }

    async fn next_reply(&mut self) -> Result<Value, IpcError> {
        match tokio::time::timeout(self.timeout, self.rx.recv()).await {
            Err(_) => Err(IpcError::Timeout {
                what: format!("{SERVICE}{}", self.operation),
                after: self.timeout,
            }),
            Ok(None) => Err(IpcError::Closed),
            Ok(Some(frame)) => interpret(&self.operation, &frame),
        }
    }
}

/// Events of a subscription.
#[derive(Debug)]
pub struct Subscription {
    pending: Pending,
}

impl Subscription {
    /// The next event's JSON; `None` once the stream or the connection ended.
    pub async fn next(&mut self) -> Option<Result<Value, IpcError>> {
        let frame = self.pending.rx.recv().await?;
        Some(interpret(&self.pending.operation, &frame))
    }
}

/// A response or event frame as JSON, or the error model it carries.
fn interpret(operation: &str, frame: &Frame) -> Result<Value, IpcError> {
    let body = if frame.payload.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&frame.payload).map_err(|e| {
            IpcError::Protocol(format!("{SERVICE}{operation} answered with bad JSON: {e}"))
        })?
    };
    match frame.message_type {
        message_type::APPLICATION_MESSAGE => Ok(body),
        message_type::APPLICATION_ERROR => {
            let model = frame
                .header("service-model-type")
                .unwrap_or("unknown error");
            Err(IpcError::Service {
                operation: format!("{SERVICE}{operation}"),
                kind: model.trim_start_matches(SERVICE).to_string(),
                message: body
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
        }
        other => Err(IpcError::Protocol(format!(
            "unexpected message type {other} on the {operation} stream"
        ))),
    }
}

/// One accepted connection: a writer shared by callers and a reader task that hands each
/// frame to the stream it belongs to.
struct Connection {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    streams: Arc<Mutex<HashMap<i32, mpsc::Sender<Frame>>>>,
    next_stream: AtomicI32,
    open: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    async fn open(socket: &Path, svcuid: &str) -> Result<Connection, IpcError> {
        let connect = async {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|source| IpcError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })?;
            let (mut read, mut write) = stream.into_split();
            let hello = Frame::new(message_type::CONNECT, 0, 0)
                .with(":version", PROTOCOL_VERSION)
                .json(&json!({ "authToken": svcuid }));
            write_frame(&mut write, &hello).await?;
            loop {
                match read_frame(&mut read).await? {
                    None => return Err(IpcError::Closed),
                    Some(f) if f.message_type == message_type::CONNECT_ACK => {
                        if f.flags & flags::CONNECTION_ACCEPTED == 0 {
                            return Err(IpcError::Refused);
                        }
                        return Ok((read, write));
                    }
                    Some(f) if f.message_type == message_type::PING => {
                        let pong = f.pong();
                        write_frame(&mut write, &pong).await?;
                    }
                    Some(f) => {
                        return Err(IpcError::Protocol(format!(
                            "expected CONNECT_ACK, got message type {}",
                            f.message_type
                        )))
                    }
                }
            }
        };
        let (mut read, write) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| IpcError::Timeout {
                what: "CONNECT".into(),
                after: CONNECT_TIMEOUT,
            })??;
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let streams: Arc<Mutex<HashMap<i32, mpsc::Sender<Frame>>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        let reader = tokio::spawn({
            let (writer, streams, open) = (writer.clone(), streams.clone(), open.clone());
            async move {
                let why = loop {
                    let frame = match read_frame(&mut read).await {
                        Ok(Some(f)) => f,
                        Ok(None) => break "closed by the nucleus".to_string(),
                        Err(e) => break e.to_string(),
                    };
                    if frame.stream_id == 0 {
                        match frame.message_type {
                            message_type::PING => {
                                let pong = frame.pong();
                                let mut w = writer.lock().await;
                                if let Err(e) = write_frame(&mut *w, &pong).await {
                                    break e.to_string();
                                }
                            }
                            message_type::PROTOCOL_ERROR | message_type::INTERNAL_ERROR => {
                                break format!(
                                    "the nucleus reported an error: {}",
                                    String::from_utf8_lossy(&frame.payload)
                                );
                            }
                            _ => {}
                        }
                        continue;
                    }
                    deliver(&streams, frame);
                };
                open.store(false, Ordering::Release);
                // Dropping the senders ends every waiting call and subscription.
                if let Ok(mut s) = streams.lock() {
                    s.clear();
                }
                tracing::warn!(reason = %why, "Greengrass IPC connection ended");
            }
        });
        Ok(Connection {
            writer,
            streams,
            next_stream: AtomicI32::new(1),
            open,
            reader,
        })
    }

    fn register(&self, tx: mpsc::Sender<Frame>) -> Result<i32, IpcError> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        if id <= 0 {
            // 2^31 streams on one connection: let the next call open a fresh one.
            self.open.store(false, Ordering::Release);
            return Err(IpcError::Closed);
        }
        let mut streams = self.streams.lock().map_err(|_| IpcError::Closed)?;
        if !self.open.load(Ordering::Acquire) {
            return Err(IpcError::Closed);
        }
        streams.insert(id, tx);
        Ok(id)
    }

    fn forget(&self, stream_id: i32) {
        if let Ok(mut s) = self.streams.lock() {
            s.remove(&stream_id);
        }
    }

    async fn send(&self, frame: &Frame) -> Result<(), IpcError> {
        let mut w = self.writer.lock().await;
        match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut *w, frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.open.store(false, Ordering::Release);
                Err(e)
            }
            Err(_) => {
                self.open.store(false, Ordering::Release);
                Err(IpcError::Timeout {
                    what: "a write to the IPC socket".into(),
                    after: WRITE_TIMEOUT,
                })
            }
        }
    }
}

/// Hands `frame` to its stream; the stream ends with a TERMINATE_STREAM frame.
fn deliver(streams: &Mutex<HashMap<i32, mpsc::Sender<Frame>>>, frame: Frame) {
    let Ok(mut streams) = streams.lock() else {
        return;
    };
    let id = frame.stream_id;
    let terminate = frame.flags & flags::TERMINATE_STREAM != 0;
    let gone = match streams.get(&id) {
        None => false,
        Some(tx) => match tx.try_send(frame) {
            Ok(()) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    stream = id,
                    "IPC subscription is not keeping up; an event was dropped"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        },
    };
    if terminate || gone {
        streams.remove(&id);
    }
}
