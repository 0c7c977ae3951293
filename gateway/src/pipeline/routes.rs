//! Direct routes, the filters a session matches before it hands a message over, and the
//! per-sink batches one commit writes.
//!
//! A message's topic is matched against the routes' and the rules' filters once, in the
//! session ([`Filters::wants`]); the committer reads the routes it matched from [`Wanted`]
//! instead of matching again, and gives the rule engine only messages some statement takes
//! (the engine then picks per statement).

use std::collections::BTreeMap;

use bytes::Bytes;
use sitegate_plugins::topic::filter_matches;

use super::{Message, RouteConfig};
use sitegate_plugins::Entry;

/// Routes a [`Wanted`] can name by bit; a config with more routes has them matched again in
/// the committer.
const INDEXED_ROUTES: usize = 64;

/// A compiled direct route.
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) name: String,
    pub(super) from: String,
    pub(super) to: String,
}

pub(super) fn routes_of(routes: &BTreeMap<String, RouteConfig>) -> Vec<Route> {
    routes
        .iter()
        .map(|(name, RouteConfig { from, to })| Route {
            name: name.clone(),
            from: from.clone(),
            to: to.clone(),
        })
        .collect()
}

/// What takes one message, as decided when the session matched its topic. The default is
/// "nothing", for messages built outside a session (tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The [`Filters`] generation it was matched against; a reconfiguration since means the
    /// committer matches again.
    generation: u64,
    /// Bit `i`: route `i` takes the message; `None` when there are too many routes to index.
    routes: Option<u64>,
    /// Some rule statement's filter matches the topic.
    rules: bool,
}

/// The topic filters of the routes and of every rule statement, as sessions match them.
#[derive(Debug, Default)]
pub(super) struct Filters {
    generation: u64,
    routes: Vec<String>,
    rules: Vec<String>,
}

impl Filters {
    pub(super) fn new(generation: u64, routes: &[Route], mut rules: Vec<String>) -> Filters {
        rules.sort();
        rules.dedup();
        Filters {
            generation,
            routes: routes.iter().map(|r| r.from.clone()).collect(),
            rules,
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// What takes a message on `topic`; `None` when nothing does (it needs no spooling).
    pub(super) fn wants(&self, topic: &str) -> Option<Wanted> {
        let rules = self.rules.iter().any(|f| filter_matches(f, topic));
        let routes = if self.routes.len() <= INDEXED_ROUTES {
            let bits = self
                .routes
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, topic))
                .fold(0u64, |bits, (i, _)| bits | 1 << i);
            if bits == 0 && !rules {
                return None;
            }
            Some(bits)
        } else {
            if !rules && !self.routes.iter().any(|f| filter_matches(f, topic)) {
                return None;
            }
            None
        };
        Some(Wanted {
            generation: self.generation,
            routes,
            rules,
        })
    }

    /// Whether the rule engine should see `m`: as decided in the session, or matched again
    /// when the filters changed since.
    pub(super) fn for_rules(&self, m: &Message) -> bool {
        if m.wanted.generation == self.generation {
            m.wanted.rules
        } else {
            self.rules.iter().any(|f| filter_matches(f, &m.topic))
        }
    }
}

/// The records one commit writes, per sink in the order sinks first appear.
#[derive(Debug, Default)]
pub(super) struct Batches(Vec<(String, Vec<Entry>)>);

impl Batches {
    pub(super) fn push(&mut self, sink: &str, entry: Entry) {
        match self.0.iter_mut().find(|(s, _)| s == sink) {
            Some((_, entries)) => entries.push(entry),
            None => self.0.push((sink.to_owned(), vec![entry])),
        }
    }

    /// Adds a record for every route that takes `m`.
    pub(super) fn route(&mut self, routes: &[Route], generation: u64, m: &Message) {
        let indexed = m
            .wanted
            .routes
            .filter(|_| m.wanted.generation == generation);
        for (i, r) in routes.iter().enumerate() {
            let takes = match indexed {
                Some(bits) => i < INDEXED_ROUTES && bits & (1 << i) != 0,
                None => filter_matches(&r.from, &m.topic),
            };
            if takes {
                self.push(&r.to, entry_of(m, &r.name));
            }
        }
    }

    /// Adds rule output rows, each to its sink.
    pub(super) fn add_outputs(&mut self, outputs: Vec<sitegate_rules::Output>) {
        for o in outputs {
            let entry = Entry {
                received_at_ms: u64::try_from(o.received_at_ms).unwrap_or(0),
                thing_name: o.thing,
                cert_id: o.cert_id,
                topic: o.topic,
                rule: o.rule,
                payload: Bytes::from(o.payload),
                template_values: o.template_values,
            };
            self.push(&o.sink, entry);
        }
    }

    pub(super) fn as_slice(&self) -> &[(String, Vec<Entry>)] {
        &self.0
    }
}

/// The record a direct route makes of a device message: its payload unchanged.
fn entry_of(m: &Message, route: &str) -> Entry {
    Entry {
        received_at_ms: m.received_at_ms,
        thing_name: m.thing.to_string(),
        cert_id: m.cert_id.to_string(),
        topic: m.topic.clone(),
        rule: route.to_owned(),
        payload: m.payload.clone(),
        template_values: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn message(topic: &str, wanted: Wanted) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            thing: Arc::from("t"),
            cert_id: Arc::from("c"),
            qos: 1,
            received_at_ms: 0,
            received: std::time::Instant::now(),
            wanted,
            properties: None,
            source_ip: Arc::from("127.0.0.1"),
        }
    }

    fn routes(filters: &[&str]) -> Vec<Route> {
        filters
            .iter()
            .enumerate()
            .map(|(i, f)| Route {
                name: format!("r{i}"),
                from: (*f).into(),
                to: format!("s{}", i % 2),
            })
            .collect()
    }

    #[test]
    fn the_session_match_decides_the_routes() {
        let r = routes(&["dt/#", "dt/+/temp", "cmd/#"]);
        let f = Filters::new(1, &r, vec!["dt/a/temp".into()]);
        assert_eq!(f.wants("other/x"), None);
        let wanted = f.wants("dt/a/temp").unwrap();
        assert!(wanted.rules);
        let m = message("dt/a/temp", wanted);
        assert!(f.for_rules(&m));
        let mut b = Batches::default();
        b.route(&r, f.generation(), &m);
        let sinks: Vec<(&str, usize)> = b
            .as_slice()
            .iter()
            .map(|(s, d)| (s.as_str(), d.len()))
            .collect();
        assert_eq!(sinks, [("s0", 1), ("s1", 1)]);
        assert_eq!(b.as_slice()[1].1[0].rule, "r1");
    }

    #[test]
    fn a_newer_generation_matches_again() {
        let old = routes(&["a/#"]);
        let m = message("b/x", Filters::new(1, &old, vec![]).wants("a/x").unwrap());
        let new = routes(&["b/#"]);
        let f = Filters::new(2, &new, vec!["b/#".into()]);
        assert!(f.for_rules(&m), "matched against the new rules");
        let mut b = Batches::default();
        b.route(&new, f.generation(), &m);
        assert_eq!(b.as_slice().len(), 1);
    }

    #[test]
    fn beyond_the_indexed_routes_the_committer_matches() {
        let many: Vec<String> = (0..70).map(|i| format!("t/{i}")).collect();
        let r = routes(&many.iter().map(String::as_str).collect::<Vec<_>>());
        let f = Filters::new(1, &r, vec![]);
        let wanted = f.wants("t/69").unwrap();
        let mut b = Batches::default();
        b.route(&r, f.generation(), &message("t/69", wanted));
        assert_eq!(b.as_slice()[0].1[0].rule, "r69");
        assert_eq!(f.wants("t/70"), None);
    }
}
