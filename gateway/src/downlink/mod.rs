//! Cloud to device: downlinks (`[downlinks.NAME]`) and the jobs and shadow relay (`[relay]`).
//!
//! Each `iotcore` sink that a downlink or the relay names gets one cloud link
//! (`sitegate_plugins::iotcore::CloudLink`: a persistent MQTT 5 session of its own, subscribed
//! to the downlinks' filters and to the relayed filters devices subscribe). One task per link
//! takes what comes down, in batches of what arrived meanwhile:
//! - a message on a local thing's relayed `$aws/things/<thing>/jobs|shadow/…` topic enters the
//!   router on that topic, where only that thing can have subscribed (`edge::relay`);
//! - otherwise the first downlink whose filter matches maps the topic (`to`) and the message
//!   enters the router (`Fabric::inject`, one hand-over per batch) as any local publish does: its topic held to the
//!   site's rules, reaching only subscriptions that the subscribers' policies granted, queued
//!   durably for away persistent sessions.
//!
//! Only then is it acknowledged to IoT Core, so a message is never acknowledged before the
//! gateway holds it (in the store for away sessions, in the router for connected ones).
//! Through the nucleus (`via = "nucleus"`) the nucleus acknowledges it when it takes it; the
//! gateway cannot hold that back. A
//! message that can never be taken (its mapped topic refused, or no downlink matches) is
//! acknowledged and counted as refused; while the router is being rebuilt it waits.
//!
//! Layout:
//! - `config`: the `[downlinks]` and `[relay]` sections, topic mapping.
//! - here: [`start`], the per-link task, [`Status`] for `sitegate downlink status`.

mod config;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttd::protocol::{PublishProperties, QoS};
use serde::{Deserialize, Serialize};
use sitegate_plugins::iotcore::{CloudLink, Downlinked, LinkSettings};
use sitegate_plugins::SinkConfig;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::edge::{Fabric, Injected, Relay, SessionTable};
use crate::escape::Escaped;
use crate::metrics::Stats;
use crate::topic::TopicLimits;
use config::{map_topic, resolve_from, To};

pub use config::{validate, DownlinkConfig, RelayConfig, MAX_SESSION_EXPIRY_SECS, SITE_VAR};

/// Downlink messages by `downlink` and `result`: delivered, queued, no_subscriber, refused.
pub const DOWNLINK_MESSAGES: &str = "sitegate_downlink_messages_total";
/// While the router is being rebuilt, how long a message waits before it is tried again.
const ROUTER_RETRY: Duration = Duration::from_millis(200);
/// The result label of a relayed answer handed to the router.
const RELAYED: &str = "relayed";
/// The result label of a cloud message no downlink takes (acknowledged, dropped).
const UNMATCHED: &str = "unmatched";
/// Messages handed to the router at once at most (what came down while the last went).
const MAX_BATCH: usize = 256;

/// Why the downlinks could not start. The configuration or its files must change.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("cloud link of sink {sink}: {source}")]
    Link {
        sink: String,
        source: sitegate_plugins::SinkError,
    },
}

impl DownlinkError {
    pub fn retryable(&self) -> bool {
        false
    }
}

/// One downlink's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownlinkCounts {
    /// Handed to the local router.
    pub delivered: u64,
    /// Of those, also queued for away persistent sessions.
    pub queued: u64,
    /// Of those, ones no session (live or away) had a filter for: nobody got them.
    pub no_subscriber: u64,
    /// Refused at the edge: the mapped topic is not one the site takes.
    pub refused: u64,
}

/// What `sitegate downlink status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Each cloud link, by sink.
    pub links: BTreeMap<String, LinkReport>,
    /// Each downlink, by name.
    pub downlinks: BTreeMap<String, DownlinkReport>,
}

/// One cloud link as the status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    #[serde(flatten)]
    pub link: sitegate_plugins::iotcore::LinkStatus,
    /// Cloud messages for local things' jobs and shadow topics handed to the router.
    pub relayed_down: u64,
    /// Cloud messages that matched no downlink (acknowledged, dropped).
    pub unmatched: u64,
}

/// One downlink as the status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownlinkReport {
    pub sink: String,
    /// Its cloud filter, with the site's name in it.
    pub from: String,
    pub to: Option<String>,
    #[serde(flatten)]
    pub counts: DownlinkCounts,
}

/// The running downlinks: the relay's handle for the sessions, and the status.
pub struct Downlinks {
    pub relay: Option<Relay>,
    links: BTreeMap<String, CloudLink>,
    status: Arc<Mutex<Status>>,
    /// The link tasks' receivers, until [`Downlinks::run`] takes them.
    pending: Vec<Pending>,
}

struct Pending {
    sink: String,
    link: CloudLink,
    events: mpsc::Receiver<Downlinked>,
    routes: Vec<Route>,
    relays: Option<Relay>,
}

/// One downlink, compiled.
#[derive(Debug, Clone)]
struct Route {
    name: String,
    filter: String,
    prefix: String,
    to: To,
}

/// Starts a cloud link for each sink that a downlink or the relay names. Nothing comes down
/// until [`Downlinks::run`], which the daemon calls once the away sessions are restored.
pub fn start(
    downlinks: &BTreeMap<String, DownlinkConfig>,
    relay: Option<&RelayConfig>,
    sinks: &BTreeMap<String, SinkConfig>,
    site: &str,
    nucleus: Option<&Arc<sitegate_plugins::nucleus::Nucleus>>,
    stop: watch::Receiver<bool>,
) -> Result<Downlinks, DownlinkError> {
    let mut by_sink: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    let mut status = Status::default();
    for (name, d) in downlinks {
        let (filter, prefix) = resolve_from(&d.from, site);
        status.downlinks.insert(
            name.clone(),
            DownlinkReport {
                sink: d.sink.clone(),
                from: filter.clone(),
                to: d.to.clone(),
                counts: DownlinkCounts::default(),
            },
        );
        by_sink.entry(d.sink.clone()).or_default().push(Route {
            name: name.clone(),
            filter,
            prefix,
            to: d.to(),
        });
    }
    if let Some(r) = relay {
        by_sink.entry(r.sink.clone()).or_default();
    }
    let mut out = Downlinks {
        relay: None,
        links: BTreeMap::new(),
        status: Arc::new(Mutex::new(status)),
        pending: Vec::new(),
    };
    for (sink, routes) in by_sink {
        let Some(SinkConfig::Iotcore(config)) = sinks.get(&sink) else {
            continue;
        };
        let settings = LinkSettings {
            sink: sink.clone(),
            config: config.clone(),
            site: site.to_owned(),
            session_expiry_secs: relay.map_or(
                sitegate_plugins::iotcore::DEFAULT_SESSION_EXPIRY_SECS,
                |r| r.session_expiry_secs,
            ),
            filters: routes.iter().map(|r| r.filter.clone()).collect(),
            nucleus: nucleus.cloned(),
        };
        let (link, events) =
            CloudLink::start(settings, stop.clone()).map_err(|source| DownlinkError::Link {
                sink: sink.clone(),
                source,
            })?;
        let relays = relay.filter(|r| r.sink == sink).map(|r| Relay {
            link: link.clone(),
            jobs: r.jobs,
            shadow: r.shadow,
            shadows: Arc::default(),
        });
        if relays.is_some() {
            out.relay = relays.clone();
        }
        out.links.insert(sink.clone(), link.clone());
        out.pending.push(Pending {
            sink,
            link,
            events,
            routes,
            relays,
        });
    }
    Ok(out)
}

impl Downlinks {
    /// Starts taking what comes down: one task per cloud link, until its link stops.
    pub fn run(
        &mut self,
        fabric: &Arc<Fabric>,
        sessions: &Arc<SessionTable>,
        topics: TopicLimits,
        stats: &Arc<Stats>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.pending
            .drain(..)
            .map(|p| {
                let taker = Taker {
                    sink: p.sink,
                    routes: p.routes,
                    relays: p.relays,
                    fabric: Arc::clone(fabric),
                    sessions: Arc::clone(sessions),
                    topics,
                    stats: Arc::clone(stats),
                    status: Arc::clone(&self.status),
                    stop: stop.clone(),
                };
                tokio::spawn(taker.run(p.link, p.events))
            })
            .collect()
    }

    /// The status now: each link's state with each downlink's counts.
    pub fn status(&self) -> Status {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (sink, link) in &self.links {
            status.links.entry(sink.clone()).or_default().link = link.status();
        }
        status
    }
}

/// What a cloud message came to.
enum Taken {
    /// In the router; `queued` also for an away session, `unheard` when no session had a
    /// filter for it.
    Delivered {
        queued: bool,
        unheard: bool,
    },
    Refused(String),
}

struct Taker {
    sink: String,
    routes: Vec<Route>,
    relays: Option<Relay>,
    fabric: Arc<Fabric>,
    sessions: Arc<SessionTable>,
    topics: TopicLimits,
    stats: Arc<Stats>,
    status: Arc<Mutex<Status>>,
    stop: watch::Receiver<bool>,
}

impl Taker {
    async fn run(self, link: CloudLink, mut events: mpsc::Receiver<Downlinked>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // What has come down meanwhile goes to the router in one hand-over.
        while events.recv_many(&mut batch, MAX_BATCH).await > 0 {
            if self.take(&batch).await.is_none() {
                // Stopping: not acknowledged, so IoT Core sends them again.
                return;
            }
            for token in batch.drain(..).filter_map(|m| m.ack) {
                link.ack(token).await;
            }
        }
    }

    /// Where a message goes: the downlink that takes it (none for a relayed answer) and the
    /// local topic; `None` when no downlink does.
    fn target<'r>(&'r self, m: &Downlinked) -> Option<(Option<&'r str>, String)> {
        if let Some(r) = self.relays.as_ref().filter(|r| r.carries(&m.topic)) {
            r.shadows.remember(&m.topic, &m.payload);
            return Some((None, m.topic.clone()));
        }
        self.routes
            .iter()
            .find(|r| crate::topic::matches(&m.topic, &r.filter))
            .map(|r| {
                let local = map_topic(&m.topic, &r.prefix, &r.to).unwrap_or_default();
                (Some(r.name.as_str()), local)
            })
    }

    /// Hands a batch on; `None` only when the gateway stops first.
    async fn take(&self, batch: &[Downlinked]) -> Option<()> {
        let mut targets = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let mut tally = BTreeMap::new();
        for m in batch {
            let Some(target) = self.target(m) else {
                self.stats.downlink_refused.fetch_add(1, Relaxed);
                *tally.entry((None, UNMATCHED)).or_insert(0) += 1;
                debug!(sink = %self.sink, topic = %Escaped(&m.topic), "cloud message matches no downlink");
                continue;
            };
            if target.0.is_some() {
                self.stats.downlink_in.fetch_add(1, Relaxed);
            }
            messages.push(Injected {
                topic: target.1.clone(),
                payload: m.payload.clone(),
                qos: if m.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                retain: m.retain,
                props: m.properties.as_ref().map(local_properties),
            });
            targets.push(target);
        }
        if messages.is_empty() {
            self.count(tally);
            return Some(());
        }
        let outcomes = loop {
            match self.fabric.inject(&messages, self.topics).await {
                Ok(outcomes) => break outcomes,
                Err(e) => {
                    warn!(sink = %self.sink, error = %e, "the router cannot take cloud messages yet");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(ROUTER_RETRY) => {}
                        _ = stop.changed() => return None,
                    }
                }
            }
        };
        let topics: Vec<&str> = targets.iter().map(|(_, local)| local.as_str()).collect();
        let heard = self.sessions.have_subscribers(&topics);
        for (((downlink, local), outcome), heard) in targets.iter().zip(outcomes).zip(heard) {
            let taken = match outcome {
                Ok(queued) => Taken::Delivered {
                    queued,
                    unheard: !queued && !heard,
                },
                Err(why) => Taken::Refused(why),
            };
            *tally
                .entry((*downlink, self.result(*downlink, &taken, local)))
                .or_insert(0) += 1;
        }
        self.count(tally);
        Some(())
    }

    /// The message's result label, counted in the edge's counters (refusals logged).
    fn result(&self, downlink: Option<&str>, taken: &Taken, local: &str) -> &'static str {
        match taken {
            Taken::Delivered { .. } if downlink.is_none() => {
                self.stats.relayed_down.fetch_add(1, Relaxed);
                RELAYED
            }
            Taken::Delivered { queued: true, .. } => {
                self.stats.downlink_delivered.fetch_add(1, Relaxed);
                self.stats.downlink_queued.fetch_add(1, Relaxed);
                "queued"
            }
            Taken::Delivered { unheard: true, .. } => {
                self.stats.downlink_delivered.fetch_add(1, Relaxed);
                self.stats.downlink_unheard.fetch_add(1, Relaxed);
                "no_subscriber"
            }
            Taken::Delivered { .. } => {
                self.stats.downlink_delivered.fetch_add(1, Relaxed);
                "delivered"
            }
            Taken::Refused(why) => {
                self.stats.downlink_refused.fetch_add(1, Relaxed);
                warn!(downlink = downlink.unwrap_or("(relay)"), topic = %Escaped(local), reason = %why, "cloud message refused at the edge");
                "refused"
            }
        }
    }

    /// A batch's results, by downlink and label, into the status and the metrics at once.
    fn count(&self, tally: BTreeMap<(Option<&str>, &'static str), u64>) {
        crate::metrics::handle();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        for ((downlink, result), n) in tally {
            let Some(name) = downlink else {
                let link = status.links.entry(self.sink.clone()).or_default();
                match result {
                    RELAYED => link.relayed_down += n,
                    UNMATCHED => link.unmatched += n,
                    _ => {}
                }
                continue;
            };
            metrics::counter!(DOWNLINK_MESSAGES, "downlink" => name.to_owned(), "result" => result)
                .increment(n);
            if let Some(d) = status.downlinks.get_mut(name) {
                let c = &mut d.counts;
                match result {
                    "refused" => c.refused += n,
                    "queued" => {
                        c.delivered += n;
                        c.queued += n;
                    }
                    "no_subscriber" => {
                        c.delivered += n;
                        c.no_subscriber += n;
                    }
                    _ => c.delivered += n,
                }
            }
        }
    }
}

/// A cloud message's properties as a local publish carries them: not its topic alias or
/// subscription identifiers, which belonged to the cloud link.
fn local_properties(p: &sitegate_plugins::iotcore::CloudProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}
