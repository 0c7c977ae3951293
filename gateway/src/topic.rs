//! What a topic name or topic filter may be before anything else looks at it.
//!
//! MQTT's own rules (UTF-8 per §1.5.4, wildcards per §4.7) plus the site's size limits
//! (`[listener] max_topic_bytes`, `max_topic_levels`). Every topic and filter a device sends is
//! checked here before the policy, the router (rumqttd) or the spool sees it; the router's own
//! matcher is not safe on arbitrary UTF-8 (see `broker`), and its caches grow with every
//! distinct string, so nothing unchecked may reach it.

/// IoT Core's topic size limit (bytes of UTF-8).
pub const DEFAULT_MAX_TOPIC_BYTES: usize = 256;
/// IoT Core allows seven forward slashes, that is eight levels.
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 8;

/// The size limits a topic or filter is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_bytes: usize,
    pub max_levels: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits {
            max_bytes: DEFAULT_MAX_TOPIC_BYTES,
            max_levels: DEFAULT_MAX_TOPIC_LEVELS,
        }
    }
}

/// Why a topic or filter is refused. `is_malformed` tells the ones MQTT calls a malformed
/// packet (the connection is closed with 0x81) from the ones this site merely does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic contains U+0000")]
    Nul,
    #[error("topic contains the control character U+{0:04X}")]
    Control(u32),
    #[error("topic contains the non-character U+{0:04X}")]
    NonCharacter(u32),
    #[error("wildcard in a topic name")]
    Wildcard,
    #[error("`{0}` must occupy a whole level (and `#` only the last)")]
    MisplacedWildcard(char),
    #[error("topic of {len} bytes exceeds listener.max_topic_bytes ({max})")]
    TooLong { len: usize, max: usize },
    #[error("topic of {levels} levels exceeds listener.max_topic_levels ({max})")]
    TooManyLevels { levels: usize, max: usize },
    #[error("shared subscriptions ($share/…) are not available")]
    Shared,
}

impl TopicError {
    /// MQTT §1.5.4: U+0000 is a malformed packet, and a receiver may treat control and
    /// non-characters the same way (Mosquitto closes with 0x81 for all three).
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            TopicError::Nul | TopicError::Control(_) | TopicError::NonCharacter(_)
        )
    }

    /// The label under which `sitegate_denied_total` counts this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            TopicError::TooLong { .. } => "topic_too_long",
            TopicError::TooManyLevels { .. } => "topic_too_deep",
            TopicError::Shared => "shared_subscription",
            _ => "topic_invalid",
        }
    }
}

/// The UTF-8 string rules of MQTT §1.5.4 (the bytes are already valid UTF-8, so surrogates and
/// overlong forms cannot occur).
pub fn check_text(s: &str) -> Result<(), TopicError> {
    for c in s.chars() {
        let u = u32::from(c);
        if u == 0 {
            return Err(TopicError::Nul);
        }
        if u < 0x20 || (0x7f..=0x9f).contains(&u) {
            return Err(TopicError::Control(u));
        }
        if (0xfdd0..=0xfdef).contains(&u) || (u & 0xfffe) == 0xfffe {
            return Err(TopicError::NonCharacter(u));
        }
    }
    Ok(())
}

fn check_size(s: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_bytes {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_bytes,
        });
    }
    let levels = s.bytes().filter(|&b| b == b'/').count() + 1;
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: limits.max_levels,
        });
    }
    Ok(())
}

/// A topic name a device may publish to (§4.7: no wildcards).
pub fn check_topic(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_text(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    check_size(topic, limits)
}

/// A topic filter a device may subscribe with (§4.7.1: `+` a whole level, `#` a whole last
/// level). `$share/…` is refused: the router would read it as its inner filter while the
/// policy saw the whole text.
pub fn check_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_text(filter)?;
    if filter.starts_with("$share/") || filter == "$share" {
        return Err(TopicError::Shared);
    }
    check_size(filter, limits)?;
    check_wildcards(filter)
}

/// `+` occupies a whole level, `#` the whole last level.
pub fn check_wildcards(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedWildcard('#'));
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard('+'));
        }
    }
    Ok(())
}

/// MQTT's matching of a topic name against a filter (§4.7), including the rule that a filter
/// starting with a wildcard does not match a topic starting with `$` (§4.7.2).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topics = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topics.next() {
            Some(t) if f == "+" || f == t => continue,
            _ => return false,
        }
    }
    topics.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: TopicLimits = TopicLimits {
        max_bytes: 256,
        max_levels: 8,
    };

    #[test]
    fn mqtt_string_rules_of_section_1_5_4() {
        assert_eq!(check_topic("a\0b", L), Err(TopicError::Nul));
        assert_eq!(check_topic("a\nb", L), Err(TopicError::Control(0x0a)));
        assert_eq!(check_topic("a\u{7f}", L), Err(TopicError::Control(0x7f)));
        assert_eq!(check_topic("a\u{9b}", L), Err(TopicError::Control(0x9b)));
        assert_eq!(
            check_topic("a\u{fffe}", L),
            Err(TopicError::NonCharacter(0xfffe))
        );
        assert_eq!(
            check_topic("a\u{fdd0}", L),
            Err(TopicError::NonCharacter(0xfdd0))
        );
        assert!(check_topic("é/dev-a/x", L).is_ok());
        assert!(check_topic("温度/x", L).is_ok());
        assert!(TopicError::Nul.is_malformed());
        assert!(!TopicError::Wildcard.is_malformed());
    }

    #[test]
    fn iot_core_size_limits() {
        assert!(check_topic(&"a".repeat(256), L).is_ok());
        assert_eq!(
            check_topic(&"a".repeat(257), L),
            Err(TopicError::TooLong { len: 257, max: 256 })
        );
        assert!(check_topic("1/2/3/4/5/6/7/8", L).is_ok());
        assert_eq!(
            check_topic("1/2/3/4/5/6/7/8/9", L),
            Err(TopicError::TooManyLevels { levels: 9, max: 8 })
        );
    }

    #[test]
    fn wildcards_of_section_4_7_1() {
        // The examples of §4.7.1.2 and §4.7.1.3.
        for ok in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
        ] {
            assert!(check_filter(ok, L).is_ok(), "{ok}");
        }
        for bad in [
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "dt/+x/#",
            "dt/#/x",
        ] {
            assert!(check_filter(bad, L).is_err(), "{bad}");
        }
        assert_eq!(check_topic("a/+", L), Err(TopicError::Wildcard));
        assert_eq!(check_filter("$share/g/#", L), Err(TopicError::Shared));
        assert_eq!(check_filter("$share", L), Err(TopicError::Shared));
        assert!(check_filter("$shared/x", L).is_ok());
    }

    #[test]
    fn matching_of_section_4_7() {
        assert!(matches("sport/tennis/player1", "sport/tennis/player1/#"));
        assert!(matches(
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/#"
        ));
        assert!(matches("sport", "sport/#"));
        assert!(matches("/finance", "+/+"));
        assert!(matches("/finance", "/+"));
        assert!(!matches("/finance", "+"));
        assert!(!matches("sport/tennis", "sport/+/x"));
        // §4.7.2: wildcards at the first level do not match $ topics.
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
    }

    proptest! {
        // Whatever text arrives, the checks answer without panicking, and anything accepted
        // as a topic has no wildcard and keeps to the limits.
        #[test]
        fn checks_never_panic(s in "\\PC{0,40}", raw in any::<String>()) {
            for t in [&s, &raw] {
                if check_topic(t, L).is_ok() {
                    prop_assert!(!t.contains(['+', '#', '\0']));
                    prop_assert!(t.len() <= 256);
                }
                let _ = check_filter(t, L);
                let _ = matches(t, "a/#");
            }
        }
    }
}
