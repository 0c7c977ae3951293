//! Rules on 100-byte JSON telemetry, on one core (a current-thread runtime): the JSON → Arrow
//! decode alone (every field, and the two fields a rule names), a filter + projection rule
//! (decode included), a rule with a mixed-type field, a nested object selected whole and two
//! IoT functions (`iot_functions_object_mixed`, on the same telemetry with those two fields
//! added), and a one-minute tumbling average per device (absorbing the batch, then closing the
//! window).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sitegate_rules::batch::Decoder;
use sitegate_rules::{Engine, ErrorRouting, Message};

const BATCH: usize = 10_000;

fn messages() -> Vec<Arc<Message>> {
    telemetry(|_| String::new())
}

/// The telemetry with `extra(n)` appended inside each payload object.
fn telemetry(extra: impl Fn(i64) -> String) -> Vec<Arc<Message>> {
    (0..BATCH as i64)
        .map(|n| {
            let thing = format!("freezer-{:04}", n % 500);
            // About 100 bytes, like the fleet's telemetry.
            let payload = format!(
                r#"{{"temp":{}.{},"humidity":{},"door":"closed","battery":{},"seq":{n},"fw":"2.4.1","rssi":-{}{}}}"#,
                -30 + n % 40,
                n % 10,
                40 + n % 30,
                90 - n % 20,
                40 + n % 50,
                extra(n)
            );
            Arc::new(Message {
                topic: format!("dt/{thing}/telemetry"),
                thing,
                cert_id: format!("{:064x}", n % 500),
                payload: Bytes::from(payload),
                received_at_ms: 1_700_000_000_000 + n,
                properties: None,
source_ip: None,
trace_id: None,
            })
        })
        .collect()
}

fn engine(rt: &tokio::runtime::Runtime, sql: &str) -> Engine {
    engine_in(rt, sql, &Default::default())
}

fn engine_in(rt: &tokio::runtime::Runtime, sql: &str, ctx: &sitegate_rules::Context) -> Engine {
    let spec = rt
        .block_on(sitegate_rules::check("bench", "bench.sql", sql, ctx))
        .unwrap();
    let mut engine = Engine::new(ErrorRouting::default());
    engine.install(spec);
    engine
}

fn rules(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let msgs = messages();
    let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
    println!("average payload: {} bytes", bytes / msgs.len());

    let mut g = c.benchmark_group("rules_10k_messages_one_core");
    g.throughput(Throughput::Elements(BATCH as u64));
    let refs: Vec<&Message> = msgs.iter().map(|m| m.as_ref()).collect();
    let every_field = Decoder::new(&[], &BTreeSet::new(), true);
    g.bench_function("decode_json_to_arrow", |b| {
        b.iter(|| every_field.decode(&refs))
    });
    let two_fields = Decoder::new(
        &[],
        &BTreeSet::from(["temp".into(), "humidity".into()]),
        false,
    );
    g.bench_function("decode_two_of_eight_fields", |b| {
        b.iter(|| two_fields.decode(&refs))
    });

    let mut filter = engine(&rt, "INSERT INTO out SELECT thing_name() AS thing, temp, humidity FROM 'dt/+/telemetry' WHERE temp > 0");
    let selected = rt.block_on(filter.process(&msgs, 0)).outputs.len();
    println!("filter + projection keeps {selected} of {BATCH} rows");
    g.bench_function("filter_projection_with_decode", |b| {
        b.iter(|| rt.block_on(filter.process(&msgs, 0)))
    });

    // The same rule whose sink's topic template reads two fields the rule does not select
    // and a function of one (iot-substitution-templates): three more columns per statement.
    let ctx = sitegate_rules::Context {
        templates: [(
            "out".to_string(),
            vec![
                "fw".to_string(),
                "upper(fw)".to_string(),
                "humidity * 2".to_string(),
            ],
        )]
        .into(),
        ..Default::default()
    };
    let mut templated = engine_in(&rt, "INSERT INTO out SELECT thing_name() AS thing, temp, humidity FROM 'dt/+/telemetry' WHERE temp > 0", &ctx);
    g.bench_function("filter_projection_with_template", |b| {
        b.iter(|| rt.block_on(templated.process(&msgs, 0)))
    });

    // `mode` is a number in some messages and a string in others (a text column); `state` is
    // an object selected whole.
    let mixed = telemetry(|n| {
        let mode = if n % 3 == 0 {
            "\"eco\"".to_string()
        } else {
            (n % 5).to_string()
        };
        format!(
            r#","mode":{mode},"state":{{"setpoint":-18,"defrost":{}}}"#,
            n % 2 == 0
        )
    });
    let mut functions = engine(&rt, "INSERT INTO out SELECT thing_name() AS thing, state, substring(fw, 0, 3) AS major, lpad(mode, 2) AS m FROM 'dt/+/telemetry' WHERE temp > 0");
    let selected = rt.block_on(functions.process(&mixed, 0)).outputs.len();
    println!("the IoT-functions rule keeps {selected} of {BATCH} rows");
    g.bench_function("iot_functions_object_mixed", |b| {
        b.iter(|| rt.block_on(functions.process(&mixed, 0)))
    });

    let mut window = engine(
        &rt,
        "INSERT INTO out SELECT thing_name() AS thing, avg(temp) AS avg_temp FROM 'dt/+/telemetry' GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)",
    );
    let mut minute = 0i64;
    g.bench_function("tumbling_avg_per_device", |b| {
        b.iter(|| {
            minute += 60_000;
            rt.block_on(window.process(&msgs, minute));
            rt.block_on(window.tick(minute + 60_000)).outputs.len()
        })
    });
    g.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
