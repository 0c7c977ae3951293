//! sitegate-benches: criterion benches (`cargo bench -p sitegate-benches`) and the fixtures
//! they share. Figures are ratios against a peer measured in the same run, never absolutes
//! compared across machines.
//!
//! Layout:
//! - `fixtures`: synthetic policy sets shaped like a real site's; a spool in a temp folder.
//! - `benches/policy.rs`: the per-packet authorization check.
//! - `benches/spool.rs`: group commit and drain against plain `std::fs` appends.
//! - `benches/kinesis.rs`: PutRecords building (plain, aggregated) and draining to a local endpoint.
//! - `benches/rules.rs`: JSON → Arrow decode, a filter rule and a window rule on one core.
//! - `benches/sessions.rs`: heap per away persistent session and per queued message, the
//!   gateway's offline queue against rumqttd's parked session.

pub mod fixtures {
    use sitegate::config::{AuthConfig, DeviceGroupConfig, StatementConfig};
    use std::collections::BTreeMap;

    /// `groups` device groups, each `thingName: kind<i>-*` bound to its own policy of three
    /// statements (connect as itself, publish its telemetry, subscribe to its commands), like a
    /// site with that many device types.
    pub fn auth_with_groups(groups: usize) -> AuthConfig {
        let mut auth = AuthConfig::default();
        for i in 0..groups {
            let policy = format!("policy-{i}");
            auth.device_groups.insert(
                format!("group-{i}"),
                DeviceGroupConfig {
                    selection_rule: format!("thingName: kind{i}-* OR thingName: special-{i}"),
                    policy: policy.clone(),
                },
            );
            let mut statements = BTreeMap::new();
            let st = |ops: &[&str], res: &[String]| StatementConfig {
                description: None,
                operations: ops.iter().map(|s| s.to_string()).collect(),
                resources: res.to_vec(),
            };
            statements.insert(
                "connect".to_owned(),
                st(
                    &["mqtt:connect"],
                    &["mqtt:clientId:${iot:Connection.Thing.ThingName}".into()],
                ),
            );
            statements.insert(
                "publish".to_owned(),
                st(
                    &["mqtt:publish"],
                    &[
                        "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#".into(),
                        format!("mqtt:topic:fleet/kind{i}/+/status"),
                        format!("mqtt:topic:site/zone-{i}/*"),
                    ],
                ),
            );
            statements.insert(
                "subscribe".to_owned(),
                st(
                    &["mqtt:subscribe"],
                    &["mqtt:topicfilter:cmd/${iot:Connection.Thing.ThingName}/#".into()],
                ),
            );
            auth.policies.insert(policy, statements);
        }
        auth
    }

    /// A spool with one queue, `bench`, sealed by a fresh key file in `dir`.
    pub fn open_spool(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
    ) -> sitegate::spool::Spool {
        rt.block_on(open_spool_async(dir))
    }

    /// [`open_spool`] from inside a runtime, its store opened as the gateway opens it.
    pub async fn open_spool_async(dir: &std::path::Path) -> sitegate::spool::Spool {
        use sitegate::config::{EncryptionConfig, SpoolConfig};
        #[allow(clippy::expect_used)]
        sitegate::spool::keys::generate_kek(&dir.join("kek")).expect("key file");
        let config = SpoolConfig {
            encryption: EncryptionConfig {
                key_file: Some(dir.join("kek")),
                ..EncryptionConfig::default()
            },
            ..SpoolConfig::default()
        };
        #[allow(clippy::expect_used)]
        let (db, _) =
            sitegate::spool::store::open(&dir.join("data"), sitegate::spool::store::OnDamage::Fail)
                .expect("sled");
        #[allow(clippy::expect_used)]
        sitegate::spool::Spool::open(db, &config, dir, ["bench".to_string()])
            .await
            .expect("spool")
    }
}
