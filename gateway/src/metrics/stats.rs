//! Counters of what the device edge, the spool and the sinks did, shared by every connection.
//!
//! Plain atomics, bumped once per event; read by the demo, the admin `status` request, the
//! Prometheus exporter and the tests. Relaxed ordering: each counter stands alone. A sink's
//! counters are kept per sink ([`SinkCounters`]); the snapshot's `sink_*` fields are their sums.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of the device edge.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Each sink's counters, by sink name; kept when a sink is removed, so a series
            /// never goes backwards.
            sinks: Mutex<BTreeMap<String, Arc<SinkCounters>>>,
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
            /// Records sinks accepted (all sinks).
            pub sink_records_sent: u64,
            /// Sends that failed as a whole (all sinks).
            pub sink_send_failures: u64,
            /// Waits before retrying a send or a read (all sinks).
            pub sink_retries: u64,
            /// Records sinks refused for good: sent to the error sink or dropped with a log line
            /// (all sinks).
            pub sink_records_rejected: u64,
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                let mut total = SinkCounts::default();
                for (_, c) in self.sinks() {
                    total.sent += c.sent;
                    total.failures += c.failures;
                    total.retries += c.retries;
                    total.rejected += c.rejected;
                }
                StatsSnapshot {
                    $($name: self.$name.load(Relaxed),)*
                    sink_records_sent: total.sent,
                    sink_send_failures: total.failures,
                    sink_retries: total.retries,
                    sink_records_rejected: total.rejected,
                }
            }
        }
    };
}

counters! {
    /// Device connections open now.
    connections_open,
    /// Connections that completed CONNECT since start.
    connections_accepted,
    /// TLS handshakes that failed or timed out (bad certificate, wrong CA, expired, silence).
    handshakes_failed,
    /// CONNECTs refused (client id ≠ thing name, revoked, not allowed to connect, bad will).
    connects_refused,
    /// Connections turned away at the connection limit.
    connections_over_limit,
    /// PUBLISHes accepted at QoS 0.
    messages_in_qos0,
    /// PUBLISHes accepted at QoS 1.
    messages_in_qos1,
    /// PUBLISHes refused by policy.
    publishes_denied,
    /// SUBSCRIBE filters refused by policy.
    subscriptions_denied,
    /// Topics and filters refused as invalid (wildcards misplaced, empty, bad characters).
    topics_invalid,
    /// Topics and filters over `listener.max_topic_bytes`.
    topics_too_long,
    /// Topics and filters over `listener.max_topic_levels`.
    topics_too_deep,
    /// `$share/…` filters refused (shared subscriptions are not offered).
    shared_subscriptions_refused,
    /// Filters refused over `max_filters_per_subscribe` or `max_subscriptions`.
    subscribe_quota_refused,
    /// Retained publishes (and wills) refused over the site's retained limits.
    retained_quota_refused,
    /// Connections closed at once because their source address had its share of the handshake
    /// budget (`max_pending_per_address`); over the site-wide budget they wait to be accepted.
    pending_over_limit,
    /// Connections in their TLS handshake now (accepted, no certificate shown yet).
    handshakes_pending,
    /// Claim-certificate connections (`[auth.enrollment]`) now open.
    claim_sessions_open,
    /// Claim-certificate connections closed for a packet outside enrollment, or turned away
    /// over `auth.enrollment.max_sessions`.
    claims_refused,
    /// Times the local router was rebuilt (its thread ended, or its caches were freed).
    router_rebuilds,
    /// Messages delivered to subscribed devices.
    messages_out,
    /// Deliveries dropped because they were larger than the device's Maximum Packet Size.
    deliveries_too_large,
    /// Persistent sessions that expired while their device was away.
    sessions_expired,
    /// Persistent sessions written to the store (at connect, on a subscription change, when
    /// the device left).
    sessions_saved,
    /// Persistent sessions brought back from the store at start.
    sessions_restored,
    /// Messages queued in the store for persistent sessions whose device is away.
    session_messages_saved,
    /// Messages not queued for an away session: over `max_session_messages` or
    /// `max_saved_messages`, or the store failed.
    session_messages_dropped,
    /// Queued messages whose Message Expiry Interval passed before their device was back.
    session_messages_expired,
    /// Connections closed for a malformed or oversize packet or a protocol error.
    protocol_errors,
    /// Connections closed because the device went silent past its keepalive.
    keepalive_timeouts,
    /// Live connections closed by revocation.
    revoked_disconnects,
    /// Device messages handed to the SQL rules.
    rule_messages_in,
    /// Records the SQL rules produced (rows, window results and error records).
    rule_rows_out,
    /// Group commits written to the spool (one fsync each).
    spool_commits,
    /// Times the committer waited because a `when_full = "block"` queue was full.
    spool_full_waits,
    /// Commits that failed (I/O, no key); their QoS 1 publishes were not acknowledged.
    spool_errors,
    /// Jobs and shadow requests of devices sent up on the cloud link (`[relay]`).
    relayed_up,
    /// Cloud answers for a local thing's jobs or shadow topics handed to the router.
    relayed_down,
    /// Relayed requests refused because the cloud link was down or its queue full.
    relay_refused,
    /// Shadow `get`s answered from the last document while the cloud link was down.
    shadow_answers_cached,
    /// Topics and filters of another thing's `$aws/things/…` refused.
    other_thing_refused,
    /// Messages that came down from the cloud on a downlink's filter.
    downlink_in,
    /// Downlink messages handed to the local router.
    downlink_delivered,
    /// Downlink messages also queued for persistent sessions whose device is away.
    downlink_queued,
    /// Downlink messages no session, live or away, had a filter for.
    downlink_unheard,
    /// Downlink messages refused at the edge (the mapped topic is not one the site takes) or
    /// matching no downlink.
    downlink_refused,
    /// Configuration updates from the Greengrass nucleus applied live.
    config_updates_applied,
    /// Configuration updates refused (invalid, or a rule would lose its sink); the running
    /// configuration stayed.
    config_updates_refused,
}

/// One sink's counters, bumped by its drain once per batch.
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Records the sink accepted.
    pub sent: AtomicU64,
    /// Sends that failed as a whole.
    pub failures: AtomicU64,
    /// Waits before retrying a send or a read.
    pub retries: AtomicU64,
    /// Records the sink refused for good.
    pub rejected: AtomicU64,
}

/// A point-in-time copy of [`SinkCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkCounts {
    pub sent: u64,
    pub failures: u64,
    pub retries: u64,
    pub rejected: u64,
}

impl SinkCounters {
    fn counts(&self) -> SinkCounts {
        SinkCounts {
            sent: self.sent.load(Relaxed),
            failures: self.failures.load(Relaxed),
            retries: self.retries.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
        }
    }
}

impl Stats {
    /// The counters of the sink named `sink`, made at its first use.
    pub fn sink(&self, sink: &str) -> Arc<SinkCounters> {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(sinks.entry(sink.to_owned()).or_default())
    }

    /// Every sink's counts, by name.
    pub fn sinks(&self) -> Vec<(String, SinkCounts)> {
        let sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        sinks.iter().map(|(n, c)| (n.clone(), c.counts())).collect()
    }

    /// Counts one refusal under its `sitegate_denied_total` reason label.
    pub fn deny(&self, reason: &str) {
        let counter = match reason {
            "publish_not_allowed" => &self.publishes_denied,
            "subscribe_not_allowed" => &self.subscriptions_denied,
            "topic_too_long" => &self.topics_too_long,
            "topic_too_deep" => &self.topics_too_deep,
            "shared_subscription" => &self.shared_subscriptions_refused,
            "subscribe_quota" => &self.subscribe_quota_refused,
            "retained_quota" => &self.retained_quota_refused,
            "over_pending_limit" => &self.pending_over_limit,
            "claim_refused" => &self.claims_refused,
            "other_thing" => &self.other_thing_refused,
            "relay_unavailable" => &self.relay_refused,
            _ => &self.topics_invalid,
        };
        counter.fetch_add(1, Relaxed);
    }
}

impl StatsSnapshot {
    /// Every refusal by its `sitegate_denied_total` reason label.
    pub fn denials(&self) -> [(&'static str, u64); 17] {
        [
            ("handshake_failed", self.handshakes_failed),
            ("connect_refused", self.connects_refused),
            ("over_connection_limit", self.connections_over_limit),
            ("over_pending_limit", self.pending_over_limit),
            ("publish_not_allowed", self.publishes_denied),
            ("subscribe_not_allowed", self.subscriptions_denied),
            ("topic_invalid", self.topics_invalid),
            ("topic_too_long", self.topics_too_long),
            ("topic_too_deep", self.topics_too_deep),
            ("shared_subscription", self.shared_subscriptions_refused),
            ("subscribe_quota", self.subscribe_quota_refused),
            ("retained_quota", self.retained_quota_refused),
            ("protocol_error", self.protocol_errors),
            ("revoked", self.revoked_disconnects),
            ("claim_refused", self.claims_refused),
            ("other_thing", self.other_thing_refused),
            ("relay_unavailable", self.relay_refused),
        ]
    }
}
