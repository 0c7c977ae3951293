//! A Greengrass nucleus stand-in for tests: it serves the IPC protocol on a Unix socket the way
//! the nucleus does for one component. It accepts one SVCUID, answers `GetConfiguration` from
//! the configuration document it holds, sends `ConfigurationUpdateEvents` to subscribers when a
//! test changes that document, records `PublishToIoTCore` requests (refusing topics a test
//! denies, as a missing `accessControl` entry would), and plays IoT Core's side of
//! `SubscribeToIoTCore`: a test's message from the cloud goes to every subscription whose
//! filter matches, as an `IoTCoreMessage` event. Requests with a wrong header get a
//! protocol error and the connection is closed, as the nucleus does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{flags, message_type, read_frame, write_frame, Frame, PROTOCOL_VERSION, SERVICE};

/// A publish the stand-in accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub topic: String,
    pub qos: String,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    /// The component's whole configuration (what `{configuration:/}` shows).
    configuration: Value,
    published: Vec<Published>,
    denied_prefixes: Vec<String>,
    /// Filters of `SubscribeToIoTCore` requests, in order.
    iot_core_filters: Vec<String>,
    connections: usize,
    refused_connections: usize,
}

/// The running stand-in; stops when dropped.
pub struct StandIn {
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    updates: broadcast::Sender<Vec<String>>,
    from_cloud: broadcast::Sender<CloudMessage>,
    task: JoinHandle<()>,
    connection_tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for StandIn {
    // Like a nucleus that stops: the socket goes, and so does every connection on it.
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(tasks) = self.connection_tasks.lock() {
            tasks.iter().for_each(JoinHandle::abort);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl StandIn {
    /// Serves `component` on `socket`, accepting only `svcuid`.
    pub fn start(
        socket: &Path,
        svcuid: &str,
        component: &str,
        configuration: Value,
    ) -> std::io::Result<StandIn> {
        // A socket file left by a stopped stand-in would make bind fail.
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let state = Arc::new(Mutex::new(State {
            configuration,
            ..State::default()
        }));
        let (updates, _) = broadcast::channel(64);
        let (from_cloud, _) = broadcast::channel(1024);
        let connection_tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let (state, updates, tasks) =
                (state.clone(), updates.clone(), connection_tasks.clone());
            let cloud = from_cloud.clone();
            let (svcuid, component) = (svcuid.to_string(), component.to_string());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let task = tokio::spawn(serve(
                        stream,
                        svcuid.clone(),
                        component.clone(),
                        state.clone(),
                        (updates.subscribe(), cloud.subscribe()),
                    ));
                    if let Ok(mut t) = tasks.lock() {
                        t.push(task);
                    }
                }
            }
        });
        Ok(StandIn {
            socket: socket.to_path_buf(),
            state,
            updates,
            from_cloud,
            task,
            connection_tasks,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Replaces the value at `key_path` (as a deployment's merge would) and tells subscribers.
    pub fn set_configuration(&self, key_path: &[&str], value: Value) {
        if let Ok(mut s) = self.state.lock() {
            let mut node = &mut s.configuration;
            for key in key_path {
                if !node.is_object() {
                    *node = json!({});
                }
                node = &mut node[*key];
            }
            *node = value;
        }
        let _ = self
            .updates
            .send(key_path.iter().map(|k| k.to_string()).collect());
    }

    /// Publishes to topics starting with `prefix` are refused with `UnauthorizedError`.
    pub fn deny_publish(&self, prefix: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.denied_prefixes.push(prefix.to_string());
        }
    }

    /// A message from IoT Core, for every `SubscribeToIoTCore` whose filter matches `topic`.
    pub fn from_iot_core(&self, topic: &str, payload: &[u8]) {
        let _ = self.from_cloud.send(CloudMessage {
            topic: topic.to_string(),
            payload: payload.to_vec(),
        });
    }

    /// The filters components subscribed with `SubscribeToIoTCore`, in order.
    pub fn iot_core_filters(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.iot_core_filters.clone())
            .unwrap_or_default()
    }

    pub fn published(&self) -> Vec<Published> {
        self.state
            .lock()
            .map(|s| s.published.clone())
            .unwrap_or_default()
    }

    /// Connections accepted and refused so far.
    pub fn connections(&self) -> (usize, usize) {
        self.state
            .lock()
            .map(|s| (s.connections, s.refused_connections))
            .unwrap_or_default()
    }
}

/// A subscription of one connection: its stream id and key path.
type Subscribed = (i32, Vec<String>);

/// A message a test sends as IoT Core.
#[derive(Debug, Clone)]
struct CloudMessage {
    topic: String,
    payload: Vec<u8>,
}

/// A request's `keyPath`, as strings.
fn key_path(request: &Value) -> Vec<String> {
    request["keyPath"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn error_frame(stream_id: i32, model: &str, message: &str) -> Frame {
    Frame::new(
        message_type::APPLICATION_ERROR,
        flags::TERMINATE_STREAM,
        stream_id,
    )
    .with("service-model-type", &format!("{SERVICE}{model}"))
    .json(&json!({ "_message": message, "message": message }))
}

fn response(stream_id: i32, operation: &str, flags: i32, body: &Value) -> Frame {
    Frame::new(message_type::APPLICATION_MESSAGE, flags, stream_id)
        .with(
            "service-model-type",
            &format!("{SERVICE}{operation}Response"),
        )
        .json(body)
}

async fn serve(
    stream: UnixStream,
    svcuid: String,
    component: String,
    state: Arc<Mutex<State>>,
    (updates, from_cloud): (
        broadcast::Receiver<Vec<String>>,
        broadcast::Receiver<CloudMessage>,
    ),
) {
    let (mut read, write) = stream.into_split();
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let send = |frame: Frame| {
        let write = write.clone();
        async move {
            let mut w = write.lock().await;
            write_frame(&mut *w, &frame).await.is_ok()
        }
    };
    let Some(ack) = connect(&mut read, &svcuid, &state).await else {
        return;
    };
    let accepted = ack.flags & flags::CONNECTION_ACCEPTED != 0;
    if !send(ack).await || !accepted {
        return;
    }
    let subscriptions: Arc<Mutex<Vec<Subscribed>>> = Arc::default();
    let events = tokio::spawn(forward_updates(
        updates,
        subscriptions.clone(),
        component.clone(),
        write.clone(),
    ));
    let cloud_subscriptions: Arc<Mutex<Vec<(i32, String)>>> = Arc::default();
    let cloud = tokio::spawn(forward_cloud(
        from_cloud,
        cloud_subscriptions.clone(),
        write.clone(),
    ));
    while let Ok(Some(frame)) = read_frame(&mut read).await {
        if frame.message_type == message_type::PING {
            let pong = frame.pong();
            if !send(pong).await {
                break;
            }
            continue;
        }
        let operation = frame
            .header("operation")
            .and_then(|o| o.strip_prefix(SERVICE))
            .unwrap_or("")
            .to_string();
        let well_formed = frame.message_type == message_type::APPLICATION_MESSAGE
            && frame.stream_id > 0
            && !operation.is_empty()
            && frame.header("service-model-type")
                == Some(format!("{SERVICE}{operation}Request").as_str())
            && frame.header(":content-type") == Some("application/json");
        let request: Option<Value> = serde_json::from_slice(&frame.payload).ok();
        let (true, Some(request)) = (well_formed, request) else {
            let refusal = Frame::new(message_type::PROTOCOL_ERROR, 0, 0)
                .payload(Bytes::from_static(b"{\"message\":\"malformed request\"}"));
            let _ = send(refusal).await;
            break;
        };
        let id = frame.stream_id;
        let reply = match operation.as_str() {
            "GetConfiguration" => get_configuration(id, &operation, &request, &component, &state),
            "SubscribeToConfigurationUpdate" => {
                let path = key_path(&request);
                if let Ok(mut subs) = subscriptions.lock() {
                    subs.push((id, path));
                }
                response(id, &operation, 0, &json!({}))
            }
            "PublishToIoTCore" => publish_to_iot_core(id, &operation, &request, &component, &state),
            "SubscribeToIoTCore" => {
                let filter = request["topicName"].as_str().unwrap_or("").to_string();
                if crate::topic::valid_filter(&filter) {
                    if let Ok(mut s) = state.lock() {
                        s.iot_core_filters.push(filter.clone());
                    }
                    if let Ok(mut subs) = cloud_subscriptions.lock() {
                        subs.push((id, filter));
                    }
                    response(id, &operation, 0, &json!({}))
                } else {
                    error_frame(
                        id,
                        "InvalidArgumentsError",
                        "topicName is not a topic filter",
                    )
                }
            }
            _ => error_frame(
                id,
                "ServiceError",
                &format!("the stand-in does not serve {operation}"),
            ),
        };
        if !send(reply).await {
            break;
        }
    }
    events.abort();
    cloud.abort();
}

/// Sends each message from the cloud to the subscriptions whose filter matches its topic.
async fn forward_cloud(
    mut messages: broadcast::Receiver<CloudMessage>,
    subscriptions: Arc<Mutex<Vec<(i32, String)>>>,
    write: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
) {
    while let Ok(m) = messages.recv().await {
        let targets: Vec<i32> = subscriptions
            .lock()
            .map(|subs| {
                subs.iter()
                    .filter(|(_, f)| crate::topic::filter_matches(f, &m.topic))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in targets {
            let event = Frame::new(message_type::APPLICATION_MESSAGE, 0, id)
                .with("service-model-type", &format!("{SERVICE}IoTCoreMessage"))
                .json(&json!({ "message": {
                    "topicName": m.topic,
                    "payload": base64::engine::general_purpose::STANDARD.encode(&m.payload),
                } }));
            let mut w = write.lock().await;
            if write_frame(&mut *w, &event).await.is_err() {
                return;
            }
        }
    }
}

/// The CONNECT frame: version and token checked; the CONNECT_ACK to send (accepted or not),
/// or `None` when the stream ended first.
async fn connect(
    read: &mut tokio::net::unix::OwnedReadHalf,
    svcuid: &str,
    state: &Mutex<State>,
) -> Option<Frame> {
    let Ok(Some(hello)) = read_frame(read).await else {
        return None;
    };
    let token_ok = serde_json::from_slice::<Value>(&hello.payload)
        .ok()
        .and_then(|v| v["authToken"].as_str().map(|t| t == svcuid))
        .unwrap_or(false);
    let accepted = hello.message_type == message_type::CONNECT
        && hello.header(":version") == Some(PROTOCOL_VERSION)
        && token_ok;
    if let Ok(mut s) = state.lock() {
        if accepted {
            s.connections += 1;
        } else {
            s.refused_connections += 1;
        }
    }
    Some(Frame::new(
        message_type::CONNECT_ACK,
        if accepted {
            flags::CONNECTION_ACCEPTED
        } else {
            0
        },
        0,
    ))
}

/// Sends each configuration update to the subscriptions whose key path it touches.
async fn forward_updates(
    mut updates: broadcast::Receiver<Vec<String>>,
    subscriptions: Arc<Mutex<Vec<Subscribed>>>,
    component: String,
    write: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
) {
    while let Ok(path) = updates.recv().await {
        let targets: Vec<i32> = subscriptions
            .lock()
            .map(|subs| {
                subs.iter()
                    .filter(|(_, sub)| {
                        let n = sub.len().min(path.len());
                        sub[..n] == path[..n]
                    })
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in targets {
            let event = Frame::new(message_type::APPLICATION_MESSAGE, 0, id)
                .with(
                    "service-model-type",
                    &format!("{SERVICE}ConfigurationUpdateEvents"),
                )
                .json(&json!({ "configurationUpdateEvent": {
                    "componentName": component, "keyPath": path } }));
            let mut w: tokio::sync::MutexGuard<'_, OwnedWriteHalf> = write.lock().await;
            if write_frame(&mut *w, &event).await.is_err() {
                return;
            }
        }
    }
}

/// GetConfiguration: the value at the request's key path.
fn get_configuration(
    id: i32,
    operation: &str,
    request: &Value,
    component: &str,
    state: &Mutex<State>,
) -> Frame {
    let path = key_path(request);
    let found = state.lock().ok().and_then(|s| {
        let mut node = &s.configuration;
        for key in &path {
            node = node.get(key)?;
        }
        Some(node.clone())
    });
    match found {
        // The nucleus answers a leaf as a one-key object.
        Some(v) if !v.is_object() => response(
            id,
            operation,
            flags::TERMINATE_STREAM,
            &json!({ "componentName": component,
                     "value": { path.last().cloned().unwrap_or_default(): v } }),
        ),
        Some(v) => response(
            id,
            operation,
            flags::TERMINATE_STREAM,
            &json!({ "componentName": component, "value": v }),
        ),
        None => error_frame(id, "ResourceNotFoundError", "Key not found"),
    }
}

/// PublishToIoTCore: refused on a denied topic prefix, else recorded as published.
fn publish_to_iot_core(
    id: i32,
    operation: &str,
    request: &Value,
    component: &str,
    state: &Mutex<State>,
) -> Frame {
    let topic = request["topicName"].as_str().unwrap_or("").to_string();
    let payload = request["payload"]
        .as_str()
        .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok());
    let denied = state
        .lock()
        .map(|s| s.denied_prefixes.iter().any(|p| topic.starts_with(p)))
        .unwrap_or(true);
    match payload {
        None => error_frame(id, "InvalidArgumentsError", "payload is not base64"),
        Some(_) if topic.is_empty() => {
            error_frame(id, "InvalidArgumentsError", "topicName is required")
        }
        Some(_) if denied => error_frame(
            id,
            "UnauthorizedError",
            &format!("Principal {component} is not authorized to perform aws.greengrass.ipc.mqttproxy:aws.greengrass#PublishToIoTCore on resource {topic}"),
        ),
        Some(payload) => {
            let user_properties = request["userProperties"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            (
                                p["key"].as_str().unwrap_or("").to_string(),
                                p["value"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Ok(mut s) = state.lock() {
                s.published.push(Published {
                    topic,
                    qos: request["qos"].as_str().unwrap_or("0").to_string(),
                    payload,
                    content_type: request["contentType"].as_str().map(String::from),
                    user_properties,
                });
            }
            response(id, operation, flags::TERMINATE_STREAM, &json!({}))
        }
    }
}
