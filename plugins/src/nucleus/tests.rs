#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;

use super::standin::StandIn;
use super::*;

const SVCUID: &str = "svcuid-for-tests";
const COMPONENT: &str = "io.sitegate.Gateway";

fn configuration() -> Value {
    json!({ "sitegate": { "site": "plant-7", "rules": { "sql": { "a": "SELECT 1" } } },
            "accessControl": {} })
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ipc.socket")
}

#[tokio::test]
async fn a_wrong_svcuid_is_refused_and_the_right_one_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let nucleus = StandIn::start(&socket_in(&dir), SVCUID, COMPONENT, configuration()).unwrap();
    let err = Nucleus::connect(nucleus.socket(), "stolen")
        .await
        .unwrap_err();
    assert!(matches!(err, IpcError::Refused), "{err}");
    assert!(!err.retryable());
    Nucleus::connect(nucleus.socket(), SVCUID).await.unwrap();
    assert_eq!(nucleus.connections(), (1, 1));
    // Nobody listening: a clear error naming the socket.
    let missing = dir.path().join("none.socket");
    let err = Nucleus::connect(&missing, SVCUID).await.unwrap_err();
    assert!(err.to_string().contains("none.socket"), "{err}");
}

#[tokio::test]
async fn get_configuration_returns_the_subtree_and_names_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&socket_in(&dir), SVCUID, COMPONENT, configuration()).unwrap();
    let nucleus = Nucleus::connect(standin.socket(), SVCUID).await.unwrap();
    let tree = nucleus.get_configuration(&["sitegate"]).await.unwrap();
    assert_eq!(tree["site"], "plant-7");
    let leaf = nucleus
        .get_configuration(&["sitegate", "site"])
        .await
        .unwrap();
    assert_eq!(leaf, json!({ "site": "plant-7" }));
    let err = nucleus
        .get_configuration(&["sitegate", "nope"])
        .await
        .unwrap_err();
    match &err {
        IpcError::Service { kind, .. } => assert_eq!(kind, "ResourceNotFoundError"),
        other => panic!("{other}"),
    }
    assert!(!err.retryable());
}

/// The key path of the next configuration event.
async fn next_key_path(updates: &mut Subscription) -> Value {
    let event = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("an event within 5 s")
        .expect("the subscription is open")
        .expect("an event, not an error");
    event["configurationUpdateEvent"]["keyPath"].clone()
}

#[tokio::test]
async fn configuration_updates_reach_subscribers_of_that_path_only() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&socket_in(&dir), SVCUID, COMPONENT, configuration()).unwrap();
    let nucleus = Nucleus::connect(standin.socket(), SVCUID).await.unwrap();
    let mut updates = nucleus
        .subscribe_to_configuration_update(&["sitegate"])
        .await
        .unwrap();
    standin.set_configuration(&["other"], json!(1));
    standin.set_configuration(&["sitegate", "rules", "sql", "b"], json!("SELECT 2"));
    assert_eq!(
        next_key_path(&mut updates).await,
        json!(["sitegate", "rules", "sql", "b"])
    );
    let tree = nucleus.get_configuration(&["sitegate"]).await.unwrap();
    assert_eq!(tree["rules"]["sql"]["b"], "SELECT 2");
    // Calls on the same connection while subscribed do not disturb the subscription.
    standin.set_configuration(&["sitegate", "site"], json!("plant-8"));
    assert_eq!(
        next_key_path(&mut updates).await,
        json!(["sitegate", "site"])
    );
}

#[tokio::test]
async fn publishes_are_pipelined_and_carry_payload_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&socket_in(&dir), SVCUID, COMPONENT, configuration()).unwrap();
    let nucleus = Nucleus::connect(standin.socket(), SVCUID).await.unwrap();
    let props = vec![("thing-name".to_string(), "freezer-1".to_string())];
    let mut pending = Vec::new();
    for i in 0..50u8 {
        let payload = [i, 0, 255];
        pending.push(
            nucleus
                .publish_to_iot_core(&IotCorePublish {
                    topic: &format!("sitegate/t/{i}"),
                    payload: &payload,
                    content_type: Some("application/json"),
                    user_properties: &props,
                })
                .await
                .unwrap(),
        );
    }
    for p in pending {
        p.response().await.unwrap();
    }
    let published = standin.published();
    assert_eq!(published.len(), 50);
    assert_eq!(published[7].topic, "sitegate/t/7");
    assert_eq!(published[7].payload, vec![7, 0, 255]);
    assert_eq!(published[7].qos, "1");
    assert_eq!(published[7].user_properties, props);
    assert_eq!(
        published[7].content_type.as_deref(),
        Some("application/json")
    );

    standin.deny_publish("secret/");
    let err = nucleus
        .publish_to_iot_core(&IotCorePublish {
            topic: "secret/x",
            payload: b"{}",
            content_type: None,
            user_properties: &[],
        })
        .await
        .unwrap()
        .response()
        .await
        .unwrap_err();
    match &err {
        IpcError::Service { kind, message, .. } => {
            assert_eq!(kind, "UnauthorizedError");
            assert!(message.contains("secret/x"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_restarted_nucleus_is_reconnected_and_subscriptions_end() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let standin = StandIn::start(&socket, SVCUID, COMPONENT, configuration()).unwrap();
    let nucleus = Nucleus::connect(&socket, SVCUID).await.unwrap();
    let mut updates = nucleus
        .subscribe_to_configuration_update(&["sitegate"])
        .await
        .unwrap();
    drop(standin);
    // The subscription learns that its stream is gone.
    let end = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .unwrap();
    assert!(end.is_none(), "{end:?}");
    let err = nucleus.get_configuration(&["sitegate"]).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    let standin = StandIn::start(&socket, SVCUID, COMPONENT, configuration()).unwrap();
    let tree = nucleus.get_configuration(&["sitegate"]).await.unwrap();
    assert_eq!(tree["site"], "plant-7");
    assert_eq!(standin.connections(), (1, 0));
}

#[tokio::test]
async fn a_malformed_request_gets_a_protocol_error_and_the_connection_ends() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&socket_in(&dir), SVCUID, COMPONENT, configuration()).unwrap();
    let stream = UnixStream::connect(standin.socket()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let hello = Frame::new(message_type::CONNECT, 0, 0)
        .with(":version", PROTOCOL_VERSION)
        .json(&json!({ "authToken": SVCUID }));
    write_frame(&mut write, &hello).await.unwrap();
    let ack = read_frame(&mut read).await.unwrap().unwrap();
    assert_eq!(ack.flags & flags::CONNECTION_ACCEPTED, 1);
    // The model type does not match the operation.
    let bad = Frame::new(message_type::APPLICATION_MESSAGE, 0, 1)
        .with("operation", "aws.greengrass#GetConfiguration")
        .with("service-model-type", "aws.greengrass#Nonsense")
        .json(&json!({ "keyPath": [] }));
    write_frame(&mut write, &bad).await.unwrap();
    let reply = read_frame(&mut read).await.unwrap().unwrap();
    assert_eq!(reply.message_type, message_type::PROTOCOL_ERROR);
    assert!(read_frame(&mut read).await.unwrap().is_none());
}

#[tokio::test]
async fn a_frame_announcing_more_than_the_limit_is_refused_before_it_is_read() {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&((MAX_FRAME_BYTES as u32) + 1).to_be_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    let err = read_frame(&mut &bytes[..]).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        0i32..8,
        0i32..4,
        any::<i32>(),
        proptest::collection::vec(("[a-z:-]{1,20}", "\\PC{0,40}"), 0..4),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(t, f, id, headers, payload)| {
            let mut frame = Frame::new(t, f, id).payload(payload.into());
            frame.headers = headers
                .into_iter()
                // The three typed headers are always written from the fields.
                .filter(|(n, _)| {
                    ![":message-type", ":message-flags", ":stream-id"].contains(&n.as_str())
                })
                .collect();
            frame
        })
}

proptest! {
    #[test]
    fn frames_round_trip_and_damage_is_caught(frame in arb_frame(), cut in 0usize..400, flip in 0usize..400) {
        let bytes = frame.encode().unwrap();
        prop_assert_eq!(Frame::decode(&bytes).unwrap(), frame);
        // Any truncation is an error, never a panic or a wrong frame.
        let cut = cut % bytes.len();
        prop_assert!(Frame::decode(&bytes[..cut]).is_err());
        // Any flipped bit is caught by a CRC (or makes the lengths inconsistent).
        let mut damaged = bytes.clone();
        let at = flip % damaged.len();
        damaged[at] ^= 0x10;
        prop_assert!(Frame::decode(&damaged).is_err());
    }
}
