//! MQTT topic filters (`+` one level, `#` the rest), as used by routes and rule sources.

/// Whether `filter` is a valid MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter`. Topics starting with `$` match only filters that name
/// their first level (MQTT 4.7.2).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(_)) if first && topic.starts_with('$') => return false,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_mqtt_says() {
        assert!(filter_matches("dt/+/temp", "dt/pump-1/temp"));
        assert!(!filter_matches("dt/+/temp", "dt/pump-1/temp/x"));
        assert!(filter_matches("dt/#", "dt"));
        assert!(filter_matches("dt/#", "dt/a/b"));
        assert!(filter_matches("#", "a"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(!filter_matches("dt/a", "dt/b"));
    }

    #[test]
    fn filters_are_checked() {
        assert!(valid_filter("dt/+/temp"));
        assert!(valid_filter("#"));
        assert!(!valid_filter("dt/#/x"));
        assert!(!valid_filter("dt/a+"));
        assert!(!valid_filter(""));
    }
}
