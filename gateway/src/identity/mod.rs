//! Who a device is: the site's certificates and the thing name they carry.
//!
//! A device's identity is its certificate: the subject CN names the thing, the SHA-256 of the
//! DER is the certificate id (as AWS IoT's certificateId). Nothing else a device sends, client
//! id included, can change it.
//!
//! Layout:
//! - `pki`: the site CA, gateway and device certificates, [`Identity`] from a certificate,
//!   key files.
//! - `tls`: the listener's mutual-TLS acceptor.
//! - here: the thing-name rule every identity passes.

pub mod pki;
pub mod tls;

pub use pki::Identity;

/// A thing name as AWS IoT allows it: 1 to 128 of `[A-Za-z0-9:_-]`. Anything else (notably
/// `*`, `+`, `#`, `/`) could widen a policy once substituted, so such names are refused.
pub fn valid_thing_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names_that_could_widen_a_policy_are_invalid() {
        assert!(valid_thing_name("pump-1:a_b"));
        for bad in ["", "a/b", "a+", "#", "a*", "a b", &"x".repeat(129)] {
            assert!(!valid_thing_name(bad), "{bad:?}");
        }
    }
}
