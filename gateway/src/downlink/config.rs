//! `[downlinks.NAME]` and `[relay]`: what comes down from IoT Core, and which sink's cloud link
//! carries a device's jobs and shadow topics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sitegate_plugins::iotcore::DEFAULT_SESSION_EXPIRY_SECS;
use sitegate_plugins::SinkConfig;

use crate::invalid::Invalid;

/// Replaced by the site's name in `from`.
pub const SITE_VAR: &str = "${site}";
/// IoT Core keeps a persistent session at most 7 days.
pub const MAX_SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;

/// `[downlinks.NAME]`: cloud messages on a filter, handed to local subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    /// The `iotcore` sink whose endpoint and certificate the cloud link uses.
    pub sink: String,
    /// The cloud topic filter subscribed, e.g. "cmd/${site}/#" (`${site}` is the site's name).
    pub from: String,
    /// The local topic: ending in `#`, its levels before the `#` replace the levels of `from`
    /// before its first wildcard (`from = "cmd/${site}/#"`, `to = "cmd/#"`: the cloud's
    /// `cmd/plant-7/pump-3/stop` is `cmd/pump-3/stop` here); otherwise one fixed topic. Absent:
    /// the cloud's topic unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// `[relay]`: devices' own AWS IoT Jobs and shadow topics carried to and from IoT Core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The `iotcore` sink whose cloud link carries them.
    pub sink: String,
    /// Relay `$aws/things/<thing>/jobs/…`.
    #[serde(default = "yes")]
    pub jobs: bool,
    /// Relay `$aws/things/<thing>/shadow/…` (named shadows too).
    #[serde(default = "yes")]
    pub shadow: bool,
    /// How long IoT Core keeps the cloud link's session, and the QoS 1 messages for it, while
    /// the gateway is away; also used by downlinks on the same sink.
    #[serde(default = "default_session_expiry_secs")]
    pub session_expiry_secs: u32,
}

fn yes() -> bool {
    true
}

fn default_session_expiry_secs() -> u32 {
    DEFAULT_SESSION_EXPIRY_SECS
}

/// The local topic a cloud topic maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum To {
    /// The cloud's topic unchanged.
    Same,
    /// `prefix` + what follows the literal levels of `from`.
    Prefix(String),
    /// Always this topic.
    Fixed(String),
}

/// `from` with the site substituted, and the literal levels before its first wildcard (each
/// with its `/`).
pub(super) fn resolve_from(from: &str, site: &str) -> (String, String) {
    let filter = from.replace(SITE_VAR, site);
    let mut prefix = String::new();
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            return (filter.clone(), prefix);
        }
        prefix.push_str(level);
        prefix.push('/');
    }
    // No wildcard: the whole filter is literal.
    let literal = filter.clone();
    (filter, literal)
}

impl DownlinkConfig {
    pub(super) fn to(&self) -> To {
        match self.to.as_deref() {
            None => To::Same,
            Some(t) => match t.strip_suffix('#') {
                Some(prefix) => To::Prefix(prefix.to_owned()),
                None => To::Fixed(t.to_owned()),
            },
        }
    }
}

/// The local topic for `cloud`, which matched a filter whose literal prefix is `prefix`.
pub(super) fn map_topic(cloud: &str, prefix: &str, to: &To) -> Option<String> {
    match to {
        To::Same => Some(cloud.to_owned()),
        To::Fixed(t) => Some(t.clone()),
        To::Prefix(p) => {
            let rest = cloud.strip_prefix(prefix).unwrap_or("");
            let local = format!("{p}{rest}");
            // `cmd/a/#` matches `cmd/a` itself: then the mapped prefix without its `/`.
            let local = local.strip_suffix('/').map(str::to_owned).unwrap_or(local);
            (!local.is_empty()).then_some(local)
        }
    }
}

fn iotcore_sink(
    sinks: &BTreeMap<String, SinkConfig>,
    name: &str,
    key: &str,
) -> Result<(), Invalid> {
    match sinks.get(name) {
        None => Err(Invalid::new(
            key,
            format!("no sink named {name:?} in [sinks]"),
        )),
        Some(SinkConfig::Iotcore(_)) => Ok(()),
        Some(_) => Err(Invalid::new(
            key,
            format!("sink {name:?} is not an iotcore sink"),
        )),
    }
}

/// Pure checks of both sections against the sinks; errors name the key.
pub fn validate(
    downlinks: &BTreeMap<String, DownlinkConfig>,
    relay: Option<&RelayConfig>,
    sinks: &BTreeMap<String, SinkConfig>,
) -> Result<(), Invalid> {
    for (name, d) in downlinks {
        let key = |k: &str| format!("downlinks.{name}.{k}");
        iotcore_sink(sinks, &d.sink, &key("sink"))?;
        // A placeholder site: any valid site name gives a filter of the same shape.
        let (filter, _) = resolve_from(&d.from, "site");
        if filter.contains("${") {
            return Err(Invalid::new(
                key("from"),
                format!("{:?}: only {SITE_VAR} is replaced", d.from),
            ));
        }
        if !sitegate_plugins::topic::valid_filter(&filter) {
            return Err(Invalid::new(
                key("from"),
                format!("{:?} is not an MQTT topic filter", d.from),
            ));
        }
        if filter.starts_with('$') {
            return Err(Invalid::new(
                key("from"),
                format!("{:?}: `$` topics come down through [relay] only", d.from),
            ));
        }
        if let Some(to) = &d.to {
            let literal = to.strip_suffix('#').unwrap_or(to);
            let shape_ok = !to.is_empty()
                && !literal.contains(['+', '#'])
                && (literal.is_empty() || !to.ends_with('#') || literal.ends_with('/'));
            if !shape_ok {
                return Err(Invalid::new(
                    key("to"),
                    format!("{to:?}: give a topic, or a prefix ending in `/#` (or `#` alone)"),
                ));
            }
            if to.starts_with('$') {
                return Err(Invalid::new(
                    key("to"),
                    format!("{to:?}: a downlink cannot publish on `$` topics"),
                ));
            }
        }
    }
    if let Some(r) = relay {
        iotcore_sink(sinks, &r.sink, "relay.sink")?;
        if !r.jobs && !r.shadow {
            return Err(Invalid::new(
                "relay",
                "relays neither jobs nor shadow; remove [relay] instead",
            ));
        }
        if r.session_expiry_secs == 0 || r.session_expiry_secs > MAX_SESSION_EXPIRY_SECS {
            return Err(Invalid::new(
                "relay.session_expiry_secs",
                format!("must be 1 to {MAX_SESSION_EXPIRY_SECS} (7 days, IoT Core's longest)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_by_prefix() {
        let (filter, prefix) = resolve_from("cmd/${site}/#", "plant-7");
        assert_eq!(
            (filter.as_str(), prefix.as_str()),
            ("cmd/plant-7/#", "cmd/plant-7/")
        );
        let to = To::Prefix("cmd/".into());
        assert_eq!(
            map_topic("cmd/plant-7/pump-3/stop", &prefix, &to).as_deref(),
            Some("cmd/pump-3/stop")
        );
        assert_eq!(
            map_topic("cmd/plant-7", &prefix, &to).as_deref(),
            Some("cmd")
        );
        let strip = To::Prefix(String::new());
        assert_eq!(
            map_topic("cmd/plant-7/pump-3", &prefix, &strip).as_deref(),
            Some("pump-3")
        );
        assert_eq!(map_topic("cmd/plant-7", &prefix, &strip), None);
        let (_, prefix) = resolve_from("fleet/+/ota", "s");
        assert_eq!(prefix, "fleet/");
        assert_eq!(
            map_topic("fleet/v2/ota", &prefix, &To::Prefix("local/".into())).as_deref(),
            Some("local/v2/ota")
        );
        assert_eq!(
            map_topic("x", "x", &To::Fixed("bcast".into())).as_deref(),
            Some("bcast")
        );
    }

    #[test]
    fn bad_sections_name_their_key() {
        use sitegate_plugins::iotcore::IotCoreConfig;
        let mut sinks = BTreeMap::new();
        sinks.insert(
            "cloud".to_string(),
            SinkConfig::Iotcore(IotCoreConfig::new(
                "h:8883",
                "c.pem".into(),
                "k.pem".into(),
                "ca.pem".into(),
            )),
        );
        sinks.insert(
            "gg".to_string(),
            SinkConfig::Iotcore(IotCoreConfig::through_nucleus()),
        );
        let one = |sink: &str, from: &str, to: Option<&str>| {
            let mut d = BTreeMap::new();
            d.insert(
                "cmd".to_string(),
                DownlinkConfig {
                    sink: sink.into(),
                    from: from.into(),
                    to: to.map(Into::into),
                },
            );
            validate(&d, None, &sinks).err().map(|e| e.to_string())
        };
        assert_eq!(one("cloud", "cmd/${site}/#", Some("cmd/#")), None);
        assert_eq!(one("cloud", "cmd/${site}/#", Some("#")), None);
        assert_eq!(one("cloud", "cmd/all", Some("bcast")), None);
        assert_eq!(one("gg", "cmd/#", None), None);
        for (sink, from, to, key) in [
            ("nope", "cmd/#", None, "downlinks.cmd.sink"),
            ("cloud", "cmd/#/x", None, "downlinks.cmd.from"),
            ("cloud", "cmd/${thing}/#", None, "downlinks.cmd.from"),
            ("cloud", "$aws/things/+/jobs/#", None, "downlinks.cmd.from"),
            ("cloud", "cmd/#", Some("cmd/+/x"), "downlinks.cmd.to"),
            ("cloud", "cmd/#", Some("cmd#"), "downlinks.cmd.to"),
            (
                "cloud",
                "cmd/#",
                Some("$aws/things/x/#"),
                "downlinks.cmd.to",
            ),
        ] {
            let e = one(sink, from, to).unwrap_or_default();
            assert!(e.contains(key), "{from} {to:?}: {e}");
        }
        let relay = RelayConfig {
            sink: "cloud".into(),
            jobs: false,
            shadow: false,
            session_expiry_secs: 60,
        };
        assert!(validate(&BTreeMap::new(), Some(&relay), &sinks).is_err());
    }
}
