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
    c.endpoint = "no-port.example.com".into();
    assert!(c.validate().unwrap_err().contains("endpoint"));
    let mut c = config(DEFAULT_TOPIC);
    c.keep_alive_secs = 2;
    assert!(c.validate().unwrap_err().contains("keep_alive_secs"));
}
