//! In-band enrollment by claim (`[auth.enrollment]`), as AWS IoT fleet provisioning by claim
//! does it, at the edge: a device holding the shared claim certificate sends a CSR for the thing
//! it asks to be; the gateway signs it with the site CA at once, records the certificate as
//! pending in the registry, and hands it over only once it is approved (an operator's
//! `device approve`, an approval given ahead of the thing's first certificate, or the AWS IoT
//! registry when the thing's `sitegate_enrollment_key` attribute names the requesting key, see
//! `auth::verifier`). The device's key never leaves it, and the certificate does nothing until
//! approved.
//!
//! What a claim connection may do is not a policy: `edge::session::claim` speaks only the
//! enrollment topics, so the claim certificate has no other permission to lose.
//!
//! On disk: sled tree `enrollments`, one JSON record per thing ([`Stored`]): the certificate
//! signed for it, its id, the digest of the requesting key (the same key asking again gets the
//! same certificate; another key is refused while the first is pending or approved), the claim
//! certificate and address it came from, and when. A record whose certificate was revoked is
//! replaced by the thing's next request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Authority, DeviceState, EnrollmentConfig, RegistryError};
use crate::identity::pki::{PkiError, SiteCa};
use crate::identity::tls::{ClaimCheck, TlsSetupError};

const TREE: &str = "enrollments";
/// The topic level every enrollment topic starts with.
pub const ENROLL_PREFIX: &str = "$sitegate/enroll/";
/// Enrollment counts by `result`: accepted, pending, rejected.
pub const ENROLLMENTS: &str = "sitegate_enrollments_total";

/// Why enrollment could not be set up. Fix the files or config; retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum EnrollSetupError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("auth.enrollment.ca_dir {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: PkiError,
    },
    #[error("auth.enrollment.ca_dir {0}: its CA is not in listener.ca, so the certificates it signs could not connect")]
    CaNotTrusted(std::path::PathBuf),
    #[error("enrollment store: {0}")]
    Store(#[from] sled::Error),
}

/// Why a request was refused: sent to the device on `…/rejected`, with an HTTP-like status
/// as AWS IoT's provisioning topics give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many certificate requests (auth.enrollment.max_requests_per_minute); try again in a minute")]
    RateLimited,
    #[error("too many enrollments wait for a decision (auth.enrollment.max_pending)")]
    TooManyPending,
    #[error("{0}")]
    BadRequest(String),
    #[error("the CSR names thing {csr:?}, not {topic:?} of the topic")]
    NameMismatch { topic: String, csr: String },
    #[error("{0} already has an approved certificate; a new key for it is signed with `sitegate device sign`")]
    AlreadyEnrolled(String),
    #[error("an enrollment for {0} with another key waits for a decision")]
    OtherKeyPending(String),
    #[error("{0} is revoked")]
    Revoked(String),
    #[error("the gateway cannot record the enrollment now: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The status code and error code of the `…/rejected` answer.
    pub fn codes(&self) -> (u16, &'static str) {
        match self {
            Refusal::RateLimited => (429, "Throttling"),
            Refusal::TooManyPending => (429, "LimitExceeded"),
            Refusal::BadRequest(_) | Refusal::NameMismatch { .. } => (400, "InvalidPayload"),
            Refusal::AlreadyEnrolled(_) | Refusal::OtherKeyPending(_) => (409, "Conflict"),
            Refusal::Revoked(_) => (403, "Forbidden"),
            Refusal::Unavailable(_) => (503, "ServiceUnavailable"),
        }
    }

    /// Whether asking again later can help.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Refusal::RateLimited
                | Refusal::TooManyPending
                | Refusal::OtherKeyPending(_)
                | Refusal::Unavailable(_)
        )
    }
}

/// A certificate signed for an enrolling device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub thing: String,
    pub cert_id: String,
    pub cert_pem: String,
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Approved: the certificate goes to the device.
    Accepted(Issued),
    /// Signed and recorded; waiting for an approval of this certificate id.
    Pending(String),
    Rejected(Refusal),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Accepted(_) => "accepted",
            Outcome::Pending(_) => "pending",
            Outcome::Rejected(_) => "rejected",
        }
    }
}

/// One thing's enrollment as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    format: u32,
    cert_id: String,
    cert_pem: String,
    key_digest: String,
    claim_cert_id: String,
    source_ip: String,
    requested_ms: u64,
}

/// A token bucket of requests per minute.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The enrollment service: the claim check, the signing CA and the pending enrollments.
pub struct Enrollment {
    claims: ClaimCheck,
    ca: SiteCa,
    tree: sled::Tree,
    config: EnrollmentConfig,
    /// Serializes requests (they are rate-limited and rare) so two for one thing cannot race.
    bucket: Mutex<Bucket>,
    sessions: Arc<Semaphore>,
}

impl Enrollment {
    /// Loads the claim CAs and the signing CA and opens the store; `listener_ca` is the
    /// listener's device CA file, which must hold the signing CA.
    pub fn open(
        config: &EnrollmentConfig,
        listener_ca: &std::path::Path,
        db: &sled::Db,
    ) -> Result<Enrollment, EnrollSetupError> {
        let (claims, ca) = load_cas(config, listener_ca)?;
        Ok(Enrollment {
            claims,
            ca,
            tree: db.open_tree(TREE)?,
            config: config.clone(),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(config.max_requests_per_minute),
                at: Instant::now(),
            }),
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
        })
    }

    /// Checks the files `open` reads, without the store (`sitegate config check`).
    pub fn check(
        config: &EnrollmentConfig,
        listener_ca: &std::path::Path,
    ) -> Result<(), EnrollSetupError> {
        load_cas(config, listener_ca).map(|_| ())
    }

    /// Whether a connection's certificate `chain` is a claim certificate.
    pub fn is_claim(&self, chain: &[rustls::pki_types::CertificateDer<'_>]) -> bool {
        self.claims.holds(chain)
    }

    /// A place for one claim connection, or `None` when `max_sessions` are open.
    pub fn session_place(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.sessions).try_acquire_owned().ok()
    }

    /// How long one claim connection may stay open.
    pub fn session_limit(&self) -> Duration {
        self.config.session_limit.0
    }

    /// Takes the CSR in `payload` (PEM, or JSON with `certificateSigningRequest` as AWS IoT's
    /// `CreateCertificateFromCsr` topic takes it) for `thing`, from the claim certificate
    /// `claim_cert_id` at `source_ip`.
    pub fn request(
        &self,
        authority: &Authority,
        thing: &str,
        payload: &[u8],
        claim_cert_id: &str,
        source_ip: &str,
    ) -> Outcome {
        let outcome = self.decide(authority, thing, payload, (claim_cert_id, source_ip));
        count(&outcome);
        outcome
    }

    /// `request` before counting; the pair is the claim certificate id and the source address.
    fn decide(
        &self,
        authority: &Authority,
        thing: &str,
        payload: &[u8],
        (claim_cert_id, source_ip): (&str, &str),
    ) -> Outcome {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let per_minute = f64::from(self.config.max_requests_per_minute);
        let now = Instant::now();
        let refill = now.duration_since(bucket.at).as_secs_f64() * per_minute / 60.0;
        bucket.tokens = (bucket.tokens + refill).min(per_minute);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Outcome::Rejected(Refusal::RateLimited);
        }
        bucket.tokens -= 1.0;
        let csr = match csr_of(payload) {
            Ok(c) => c,
            Err(r) => return Outcome::Rejected(r),
        };
        let days = i64::from(self.config.cert_days);
        let signed = match self.ca.sign_csr(&csr, days) {
            Ok(s) => s,
            Err(e) => return Outcome::Rejected(Refusal::BadRequest(e.to_string())),
        };
        if signed.thing != thing {
            return Outcome::Rejected(Refusal::NameMismatch {
                topic: thing.to_owned(),
                csr: signed.thing,
            });
        }
        match self.record(authority, signed, claim_cert_id, source_ip) {
            Ok(o) => o,
            Err(e) => Outcome::Rejected(Refusal::Unavailable(e.to_string())),
        }
    }

    fn record(
        &self,
        authority: &Authority,
        signed: crate::identity::pki::SignedCsr,
        claim_cert_id: &str,
        source_ip: &str,
    ) -> Result<Outcome, RegistryError> {
        let thing = signed.thing.as_str();
        let record = authority.registry().get(thing)?;
        if record.as_ref().is_some_and(|r| r.revoked) {
            return Ok(Outcome::Rejected(Refusal::Revoked(thing.to_owned())));
        }
        let earlier = self.stored(thing)?;
        if let Some(e) = &earlier {
            let state = record
                .as_ref()
                .map_or(DeviceState::Pending, |r| r.cert_state(&e.cert_id));
            match (e.key_digest == signed.key_digest, state) {
                // The same key asking again (its answer was lost): the same certificate.
                (true, _) => return Ok(self.outcome_of(authority, thing, e)),
                (false, DeviceState::Pending) => {
                    return Ok(Outcome::Rejected(Refusal::OtherKeyPending(
                        thing.to_owned(),
                    )))
                }
                (false, DeviceState::Approved) => {
                    return Ok(Outcome::Rejected(Refusal::AlreadyEnrolled(
                        thing.to_owned(),
                    )))
                }
                (false, DeviceState::Revoked) => {}
            }
        }
        if record
            .as_ref()
            .is_some_and(|r| r.certs.iter().any(|c| c.state == DeviceState::Approved))
        {
            return Ok(Outcome::Rejected(Refusal::AlreadyEnrolled(
                thing.to_owned(),
            )));
        }
        if self.pending_count(authority)? >= self.config.max_pending {
            return Ok(Outcome::Rejected(Refusal::TooManyPending));
        }
        let stored = Stored {
            format: 1,
            cert_id: signed.cert_id.clone(),
            cert_pem: signed.cert_pem,
            key_digest: signed.key_digest,
            claim_cert_id: claim_cert_id.to_owned(),
            source_ip: source_ip.to_owned(),
            requested_ms: crate::clock::now_ms(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| RegistryError::Corrupt {
            thing: thing.to_owned(),
            reason: e.to_string(),
        })?;
        self.tree.insert(thing.as_bytes(), bytes)?;
        self.tree.flush()?;
        let reason = format!(
            "enrollment asked with claim certificate {} from {source_ip}",
            &claim_cert_id[..claim_cert_id.len().min(12)]
        );
        authority.enrolled(thing, &stored.cert_id, &stored.key_digest, &reason)?;
        Ok(self.outcome_of(authority, thing, &stored))
    }

    /// The answer for `thing`'s enrollment of `cert_id` once it is decided; `None` while it
    /// is pending (or if another enrollment replaced it).
    pub fn answer(&self, authority: &Authority, thing: &str, cert_id: &str) -> Option<Outcome> {
        let stored = self.stored(thing).ok()??;
        if stored.cert_id != cert_id {
            return None;
        }
        let outcome = self.outcome_of(authority, thing, &stored);
        if matches!(outcome, Outcome::Pending(_)) {
            return None;
        }
        count(&outcome);
        Some(outcome)
    }

    fn outcome_of(&self, authority: &Authority, thing: &str, stored: &Stored) -> Outcome {
        let state = authority
            .current_grant(thing, &stored.cert_id)
            .map(|g| g.state);
        match state {
            Ok(DeviceState::Approved) => Outcome::Accepted(Issued {
                thing: thing.to_owned(),
                cert_id: stored.cert_id.clone(),
                cert_pem: stored.cert_pem.clone(),
            }),
            Ok(DeviceState::Pending) => Outcome::Pending(stored.cert_id.clone()),
            Ok(DeviceState::Revoked) => Outcome::Rejected(Refusal::Revoked(thing.to_owned())),
            Err(e) => Outcome::Rejected(Refusal::Unavailable(e.to_string())),
        }
    }

    fn stored(&self, thing: &str) -> Result<Option<Stored>, RegistryError> {
        let Some(bytes) = self.tree.get(thing.as_bytes())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                thing: thing.to_owned(),
                reason: format!("enrollment record: {e}"),
            })
    }

    /// Enrollments whose certificate waits for a decision.
    fn pending_count(&self, authority: &Authority) -> Result<usize, RegistryError> {
        let mut n = 0;
        for entry in self.tree.iter() {
            let (key, bytes) = entry?;
            let thing = String::from_utf8_lossy(&key);
            let Ok(stored) = serde_json::from_slice::<Stored>(&bytes) else {
                continue;
            };
            let state = authority
                .registry()
                .get(&thing)?
                .map_or(DeviceState::Pending, |r| r.cert_state(&stored.cert_id));
            n += usize::from(state == DeviceState::Pending);
        }
        Ok(n)
    }
}

/// The claim CAs and the signing CA, which must be one the listener trusts.
fn load_cas(
    config: &EnrollmentConfig,
    listener_ca: &std::path::Path,
) -> Result<(ClaimCheck, SiteCa), EnrollSetupError> {
    let claims = ClaimCheck::load(&config.claim_ca, listener_ca)?;
    let ca = SiteCa::load(&config.ca_dir).map_err(|source| EnrollSetupError::Ca {
        path: config.ca_dir.clone(),
        source,
    })?;
    if !crate::identity::tls::holds_ca(listener_ca, &ca.ca_pem)? {
        return Err(EnrollSetupError::CaNotTrusted(config.ca_dir.clone()));
    }
    Ok((claims, ca))
}

/// The PEM text of a request's payload.
fn csr_of(payload: &[u8]) -> Result<String, Refusal> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Refusal::BadRequest("the payload is not UTF-8 text (a PEM CSR)".into()))?;
    if !text.trim_start().starts_with('{') {
        return Ok(text.to_owned());
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Request {
        certificate_signing_request: String,
    }
    serde_json::from_str::<Request>(text)
        .map(|r| r.certificate_signing_request)
        .map_err(|e| {
            Refusal::BadRequest(format!(
                "a JSON request needs \"certificateSigningRequest\": {e}"
            ))
        })
}

fn count(outcome: &Outcome) {
    crate::metrics::handle();
    metrics::counter!(ENROLLMENTS, "result" => outcome.label()).increment(1);
}

/// The thing named by an enrollment topic: `$sitegate/enroll/<thing>` with `suffix` after it
/// (`""` for the request, `"/accepted"` or `"/rejected"` for answers); `None` for any other
/// topic or a thing name that is not valid.
pub fn thing_of_topic<'t>(topic: &'t str, suffix: &str) -> Option<&'t str> {
    let rest = topic.strip_prefix(ENROLL_PREFIX)?;
    let thing = rest.strip_suffix(suffix)?;
    crate::identity::valid_thing_name(thing).then_some(thing)
}

/// The JSON answer sent on `$sitegate/enroll/<thing>/accepted` or `/rejected`, in the shape of
/// AWS IoT's `CreateCertificateFromCsr` replies.
pub fn answer_payload(outcome: &Outcome) -> Option<(&'static str, Vec<u8>)> {
    let (suffix, body) = match outcome {
        Outcome::Accepted(i) => (
            "/accepted",
            serde_json::json!({
                "thingName": i.thing,
                "certificateId": i.cert_id,
                "certificatePem": i.cert_pem,
            }),
        ),
        Outcome::Rejected(r) => {
            let (status, code) = r.codes();
            (
                "/rejected",
                serde_json::json!({
                    "statusCode": status,
                    "errorCode": code,
                    "errorMessage": r.to_string(),
                }),
            )
        }
        Outcome::Pending(_) => return None,
    };
    Some((suffix, body.to_string().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn topics_name_one_valid_thing() {
        assert_eq!(
            thing_of_topic("$sitegate/enroll/pump-9", ""),
            Some("pump-9")
        );
        assert_eq!(
            thing_of_topic("$sitegate/enroll/pump-9/accepted", "/accepted"),
            Some("pump-9")
        );
        for bad in [
            "$sitegate/enroll/",
            "$sitegate/enroll/a/b",
            "$sitegate/enroll/+",
            "$sitegate/enroll/#",
            "sitegate/enroll/pump-9",
            "$sitegate/enroll/pump 9",
        ] {
            assert_eq!(thing_of_topic(bad, ""), None, "{bad}");
        }
        assert_eq!(thing_of_topic("$sitegate/enroll/pump-9/accepted", ""), None);
    }

    #[test]
    fn requests_are_pem_or_aws_json() {
        assert_eq!(csr_of(b"-----BEGIN").unwrap(), "-----BEGIN");
        assert_eq!(
            csr_of(br#"{"certificateSigningRequest": "-----BEGIN"}"#).unwrap(),
            "-----BEGIN"
        );
        assert!(matches!(
            csr_of(b"{\"csr\": 1}"),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(csr_of(&[0xff, 0xfe]), Err(Refusal::BadRequest(_))));
    }

    /// A site CA, a claim CA, an authority on a fresh store, and the enrollment service.
    struct Setup {
        dir: tempfile::TempDir,
        authority: Authority,
        enrollment: Enrollment,
    }

    fn setup(max_pending: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let site = crate::identity::pki::init_ca(&dir.path().join("pki"), "site", &[]).unwrap();
        let claims =
            crate::identity::pki::init_ca(&dir.path().join("claims"), "claims", &[]).unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let registry = super::super::Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
        let policies = super::super::PolicySet::compile(&Default::default()).unwrap();
        let config = EnrollmentConfig {
            claim_ca: claims.ca_cert,
            ca_dir: dir.path().join("pki"),
            cert_days: 30,
            max_requests_per_minute: 100,
            max_pending,
            max_sessions: 1,
            session_limit: sitegate_plugins::units::Period(Duration::from_secs(60)),
        };
        let enrollment = Enrollment::open(&config, &site.ca_cert, &db).unwrap();
        Setup {
            dir,
            authority: Authority::new(policies, registry),
            enrollment,
        }
    }

    /// A CSR for `cn` with a new P-256 key (rcgen stands in for the device here; the daemon
    /// test uses openssl).
    fn csr(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn ask(s: &Setup, thing: &str, csr: &str) -> Outcome {
        s.enrollment
            .request(&s.authority, thing, csr.as_bytes(), "c1aim", "127.0.0.1")
    }

    #[test]
    fn a_request_waits_for_approval_and_the_same_key_gets_the_same_certificate() {
        let s = setup(10);
        let first = csr("pump-1");
        let Outcome::Pending(id) = ask(&s, "pump-1", &first) else {
            panic!("pending first")
        };
        // Asked again (the answer was lost): the same certificate, still pending.
        assert_eq!(ask(&s, "pump-1", &first), Outcome::Pending(id.clone()));
        assert_eq!(s.enrollment.answer(&s.authority, "pump-1", &id), None);
        // Another key while the first waits: refused, and retrying later can help.
        let other = csr("pump-1");
        let refused = ask(&s, "pump-1", &other);
        assert_eq!(
            refused,
            Outcome::Rejected(Refusal::OtherKeyPending("pump-1".into()))
        );
        s.authority.approve("pump-1", None, &[]).unwrap();
        let Some(Outcome::Accepted(issued)) = s.enrollment.answer(&s.authority, "pump-1", &id)
        else {
            panic!("accepted once approved")
        };
        assert_eq!(issued.cert_id, id);
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(crate::identity::pki::cert_id(&der), id);
        let identity = crate::identity::pki::Identity::from_der(&der).unwrap();
        assert_eq!(identity.thing, "pump-1");
        // After approval: the same key gets it again; another key is refused for good.
        assert_eq!(ask(&s, "pump-1", &first), Outcome::Accepted(issued));
        assert_eq!(
            ask(&s, "pump-1", &other),
            Outcome::Rejected(Refusal::AlreadyEnrolled("pump-1".into()))
        );
        // Once the enrolled certificate is revoked, the thing may enroll a new key.
        s.authority.revoke(None, Some(&id)).unwrap();
        assert!(matches!(ask(&s, "pump-1", &other), Outcome::Pending(_)));
    }

    #[test]
    fn an_approval_given_ahead_answers_at_once_and_a_revoked_thing_never() {
        let s = setup(10);
        s.authority.approve("valve-1", None, &[]).unwrap();
        assert!(matches!(
            ask(&s, "valve-1", &csr("valve-1")),
            Outcome::Accepted(_)
        ));
        s.authority.revoke(Some("door-1"), None).unwrap();
        assert_eq!(
            ask(&s, "door-1", &csr("door-1")),
            Outcome::Rejected(Refusal::Revoked("door-1".into()))
        );
    }

    #[test]
    fn bad_requests_are_refused_with_what_is_wrong() {
        let s = setup(1);
        let refused = |thing: &str, csr: &str| match ask(&s, thing, csr) {
            Outcome::Rejected(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused("pump-2", &csr("pump-3")),
            Refusal::NameMismatch {
                topic: "pump-2".into(),
                csr: "pump-3".into()
            }
        );
        assert!(matches!(refused("pump-2", "junk"), Refusal::BadRequest(_)));
        assert!(matches!(
            refused("bad", &csr("a/b")),
            Refusal::BadRequest(m) if m.contains("not a valid thing name")
        ));
        // One pending at most here.
        assert!(matches!(
            ask(&s, "pump-2", &csr("pump-2")),
            Outcome::Pending(_)
        ));
        assert_eq!(refused("pump-4", &csr("pump-4")), Refusal::TooManyPending);
        assert!(Refusal::TooManyPending.retryable());
        assert!(!Refusal::AlreadyEnrolled("x".into()).retryable());
        drop(s.dir);
    }

    #[test]
    fn the_claim_ca_must_be_its_own_and_the_signing_ca_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let site = crate::identity::pki::init_ca(&dir.path().join("pki"), "site", &[]).unwrap();
        let other = crate::identity::pki::init_ca(&dir.path().join("other"), "other", &[]).unwrap();
        let config = |claim_ca: &std::path::Path, ca_dir: &str| EnrollmentConfig {
            claim_ca: claim_ca.to_owned(),
            ca_dir: dir.path().join(ca_dir),
            cert_days: 30,
            max_requests_per_minute: 1,
            max_pending: 1,
            max_sessions: 1,
            session_limit: sitegate_plugins::units::Period(Duration::from_secs(60)),
        };
        let err = Enrollment::check(&config(&site.ca_cert, "pki"), &site.ca_cert).unwrap_err();
        assert!(
            err.to_string().contains("auth.enrollment.claim_ca"),
            "{err}"
        );
        let err = Enrollment::check(&config(&other.ca_cert, "other"), &site.ca_cert).unwrap_err();
        assert!(matches!(err, EnrollSetupError::CaNotTrusted(_)), "{err}");
        Enrollment::check(&config(&other.ca_cert, "pki"), &site.ca_cert).unwrap();
    }

    #[test]
    fn answers_have_aws_iot_shape() {
        let (suffix, body) = answer_payload(&Outcome::Rejected(Refusal::RateLimited)).unwrap();
        assert_eq!(suffix, "/rejected");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["statusCode"], 429);
        assert_eq!(v["errorCode"], "Throttling");
        assert!(answer_payload(&Outcome::Pending("x".into())).is_none());
    }
}
