//! The gateway's integration tests, one binary: each module drives the real daemon or the
//! real `sitegate` binary with real clients (mosquitto, rumqttc, raw MQTT bytes), a real
//! Mosquitto as the cloud broker, and `moto_server` for the AWS APIs. One binary links
//! DataFusion and the AWS SDK once instead of once per file.
//!
//! - `common`: a site (CA, gateway on 127.0.0.1:0, device certificates), AWS emulator and raw
//!   MQTT helpers.
//! - `layout`: the `gateway` crate's parts depend one way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod cli;
mod configs;
mod container;
mod crash;
mod downlink;
mod edge;
mod greengrass;
mod iotcore;
mod kinesis;
mod layout;
mod mqtt5;
mod registry;
mod rules;
mod simulate;
mod spool;
