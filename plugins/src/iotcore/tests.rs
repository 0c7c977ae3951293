#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use super::*;
use crate::record::sample;
use crate::template::Template;

fn config(topic: &str) -> IotCoreConfig {
    let mut c = IotCoreConfig::new(
        "example-ats.iot.eu-west-1.amazonaws.com:8883",
        PathBuf::from("c.pem"),
        PathBuf::from("k.pem"),
        PathBuf::from("ca.pem"),
    );
    c.topic = Template::parse(topic).unwrap();
    c
}

#[test]
fn identity_travels_as_user_properties() {
    let (out, rejected) = outbound(
        &config(DEFAULT_TOPIC),
        "plant-7",
        &[sample(9, "freezer-2", r#"{"t":-18}"#)],
    );
    assert!(rejected.is_empty());
    assert_eq!(out[0].topic, "sitegate/plant-7/freezer-2/raw");
    let props = &out[0].properties.user_properties;
    assert!(props.contains(&("thing-name".into(), "freezer-2".into())));
    assert!(props.contains(&("source-topic".into(), "dt/freezer-2/temp".into())));
    assert!(props.contains(&("record-id".into(), "9".into())));
    assert!(props.iter().any(|(k, v)| k == "cert-id" && v.len() == 64));
}

#[test]
fn records_over_iot_core_limits_are_rejected_with_the_reason() {
    let long = format!("a/{}", "x".repeat(300));
    let records = [
        sample(1, "a", "{}"),
        sample(
            2,
            "b",
            &format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_PAYLOAD_BYTES)),
        ),
    ];
    let (_, rejected) = outbound(&config(&long), "s", &records[..1]);
    assert!(rejected[0].reason.contains("256"), "{}", rejected[0].reason);
    let (_, rejected) = outbound(&config("a/b/c/d/e/f/g/h/${thing_name}"), "s", &records[..1]);
    assert!(
        rejected[0].reason.contains("slashes"),
        "{}",
        rejected[0].reason
    );
    let (out, rejected) = outbound(&config(DEFAULT_TOPIC), "s", &records);
    assert_eq!(out.len(), 1);
    assert_eq!(rejected[0].index, 1);
    assert!(
        rejected[0].reason.contains("131072"),
        "{}",
        rejected[0].reason
    );
}

#[test]
fn validation_names_the_key() {
    let mut c = config(DEFAULT_TOPIC);
    c.endpoint = Some("no-port.example.com".into());
    assert!(c.validate().unwrap_err().contains("endpoint"));
    let mut c = config(DEFAULT_TOPIC);
    c.cert = None;
    assert!(c.validate().unwrap_err().contains("`cert`"));
    let mut c = IotCoreConfig::through_nucleus();
    c.validate().unwrap();
    c.endpoint = Some("x.amazonaws.com:8883".into());
    let err = c.validate().unwrap_err();
    assert!(
        err.contains("`endpoint` is not used with via = \"nucleus\""),
        "{err}"
    );
    let mut c = config(DEFAULT_TOPIC);
    c.keep_alive_secs = 2;
    assert!(c.validate().unwrap_err().contains("keep_alive_secs"));
}

#[tokio::test]
async fn through_the_nucleus_records_arrive_in_order_with_identity_and_a_denied_topic_stops_the_batch(
) {
    use crate::nucleus::{standin::StandIn, Nucleus};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.socket");
    let standin = StandIn::start(
        &socket,
        "token",
        "io.sitegate.Gateway",
        serde_json::json!({}),
    )
    .unwrap();
    let nucleus = std::sync::Arc::new(Nucleus::connect(&socket, "token").await.unwrap());
    let mut config = IotCoreConfig::through_nucleus();
    config.max_inflight = 4;
    let mut sink = NucleusSink::new("cloud", "plant-7", config, nucleus);
    let batch: Vec<_> = (0..10)
        .map(|i| sample(i, &format!("freezer-{i}"), &format!(r#"{{"t":{i}}}"#)))
        .collect();
    let ack = sink.send(&batch).await.unwrap();
    assert_eq!(ack, Ack::all(10));
    let published = standin.published();
    let topics: Vec<_> = published.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics[0], "sitegate/plant-7/freezer-0/raw");
    assert_eq!(topics[9], "sitegate/plant-7/freezer-9/raw");
    assert!(published[3]
        .user_properties
        .contains(&("thing-name".into(), "freezer-3".into())));
    let body: serde_json::Value = serde_json::from_slice(&published[3].payload).unwrap();
    assert_eq!(body["thing_name"], "freezer-3");

    // Record 2 is refused by the nucleus: 0 and 1 are done, the rest is sent again later.
    standin.deny_publish("sitegate/plant-7/freezer-2/");
    let ack = sink.send(&batch[..5]).await.unwrap();
    assert_eq!(ack.done, 2);
    let err = sink.send(&batch[2..5]).await.unwrap_err();
    assert!(matches!(err, SinkError::AccessDenied(_)), "{err}");
    assert!(err.to_string().contains("accessControl"), "{err}");
}

#[test]
fn batched_records_share_a_publish_per_topic_in_order_within_the_payload_limit() {
    let mut c = config(DEFAULT_TOPIC);
    c.batch_records = 3;
    let records: Vec<Record> = (1..=8)
        .map(|i| {
            sample(
                i,
                if i % 2 == 0 { "a" } else { "b" },
                &format!(r#"{{"i":{i}}}"#),
            )
        })
        .collect();
    let (out, rejected) = outbound(&c, "s", &records);
    assert!(rejected.is_empty());
    let groups: Vec<(&str, Vec<usize>)> = out
        .iter()
        .map(|o| (o.topic.as_str(), o.indexes.clone()))
        .collect();
    assert_eq!(
        groups,
        vec![
            ("sitegate/s/b/raw", vec![0, 2, 4]),
            ("sitegate/s/a/raw", vec![1, 3, 5]),
            ("sitegate/s/b/raw", vec![6]),
            ("sitegate/s/a/raw", vec![7]),
        ]
    );
    let body: serde_json::Value = serde_json::from_slice(&out[0].payload).unwrap();
    let ids: Vec<u64> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["record_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3, 5]);
    assert_eq!(body[0]["thing_name"], "b");
    let props = &out[0].properties.user_properties;
    assert!(props.contains(&("record-count".into(), "3".into())));
    assert!(props.contains(&("first-record-id".into(), "1".into())));
    assert!(props.contains(&("last-record-id".into(), "5".into())));

    // Large records: a publish never passes IoT Core's payload limit.
    c.batch_records = 500;
    let pad = "x".repeat(50_000);
    let big: Vec<Record> = (1..=5)
        .map(|i| sample(i, "a", &format!(r#"{{"pad":"{pad}"}}"#)))
        .collect();
    let (out, _) = outbound(&c, "s", &big);
    assert!(out.len() >= 3, "{}", out.len());
    assert!(out.iter().all(|o| o.payload.len() <= MAX_PAYLOAD_BYTES));
    assert_eq!(out.iter().map(|o| o.indexes.len()).sum::<usize>(), 5);
}
