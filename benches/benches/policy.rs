//! The per-packet policy check: authorize a PUBLISH for a device whose grant is the union of
//! every group of a 50-group policy set, and what building that grant costs at CONNECT.
//! Throughput is reported per check, so criterion prints checks per second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sitegate::auth::{Facts, Operation, PolicySet};
use sitegate_benches::fixtures::auth_with_groups;

const GROUPS: usize = 50;

fn policy(c: &mut Criterion) {
    let set = PolicySet::compile(&auth_with_groups(GROUPS)).expect("fixture compiles");
    let thing = Facts::named("kind7-0042");
    // Worst case for the check: the device is in all 50 groups, so every pattern is a candidate.
    let all_groups: Vec<String> = (0..GROUPS).map(|i| format!("group-{i}")).collect();
    let grant = set.permissions(&thing, &all_groups);

    let mut g = c.benchmark_group("authorize_publish_50_groups");
    g.throughput(Throughput::Elements(1));
    g.bench_function("allowed_own_telemetry", |b| {
        b.iter(|| grant.allows(Operation::Publish, black_box("dt/kind7-0042/temperature")))
    });
    g.bench_function("allowed_wildcard_level", |b| {
        b.iter(|| {
            grant.allows(
                Operation::Publish,
                black_box("fleet/kind49/kind49-1/status"),
            )
        })
    });
    g.bench_function("denied_other_device", |b| {
        b.iter(|| grant.allows(Operation::Publish, black_box("dt/kind8-0001/temperature")))
    });
    // The peer: evaluating the policy documents on every packet, as an authorizer without a
    // per-connection grant would (select groups, substitute the thing name, match).
    g.bench_function("denied_other_device_evaluated_per_packet", |b| {
        b.iter(|| {
            set.permissions(&thing, &all_groups)
                .allows(Operation::Publish, black_box("dt/kind8-0001/temperature"))
        })
    });
    g.bench_function("subscribe_filter", |b| {
        b.iter(|| grant.allows(Operation::Subscribe, black_box("cmd/kind7-0042/#")))
    });
    g.finish();

    let mut g = c.benchmark_group("grant_at_connect_50_groups");
    g.throughput(Throughput::Elements(1));
    g.bench_function("select_groups_and_build_permissions", |b| {
        b.iter(|| {
            let groups = set.groups_matching(black_box(&thing));
            set.permissions(&thing, &groups)
        })
    });
    g.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
