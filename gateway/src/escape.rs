//! Device-controlled text made safe for a log line.
//!
//! A client id, certificate CN or topic is chosen by whoever holds a certificate. Written raw,
//! a newline in one forges a log line of its own (`device approved thing=evil-1`), and an ESC
//! sequence repaints the operator's terminal. [`Escaped`] writes such text with every control,
//! line-separator and bidirectional-override character as a `\u{…}` escape (and `\` as `\\`),
//! so one field stays one field on one line.

use std::fmt;

/// Displays `self.0` with the characters that could break a log line escaped.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Characters that change how a line is read without being control characters: line and
/// paragraph separators, and the bidirectional embeddings, overrides and isolates.
fn is_layout(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s
            .chars()
            .any(|c| c == '\\' || c.is_control() || is_layout(c))
        {
            return f.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() || is_layout(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_cannot_forge_a_line() {
        let forged = "x\n2026-12-01T00:00:00Z INFO device approved thing=evil-1";
        let shown = Escaped(forged).to_string();
        assert!(!shown.contains('\n'));
        assert!(shown.starts_with("x\\u{a}2026"));
        assert_eq!(Escaped("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(Escaped("a\u{202e}b").to_string(), "a\\u{202e}b");
        assert_eq!(Escaped("a\\u{a}").to_string(), "a\\\\u{a}");
        assert_eq!(Escaped("pump-1/é").to_string(), "pump-1/é");
    }
}
