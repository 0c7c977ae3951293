//! The AWS IoT registry as the verifier of devices (`[auth.registry] type = "iot"`).
//!
//! When a certificate no one decided on connects, the gateway asks AWS IoT about it, in the
//! background (the device holds a pending grant meanwhile, and gets the approved one on its live
//! connection): `DescribeCertificate` by the certificate id (AWS IoT names a certificate by the
//! SHA-256 of its DER, as the gateway does), `ListPrincipalThings` for the certificate's ARN,
//! then `DescribeThing` and `ListThingGroupsForThing` for the thing the CN names. ACTIVE and
//! attached to that thing: approved, with the thing's type, attributes and groups kept for the
//! selection rules and policy variables. Every `sync_interval` each certificate not revoked is
//! looked up again, so a change in the cloud (another thing group, a certificate set INACTIVE
//! or REVOKED) reaches live connections within one interval; `sitegate device sync` runs a
//! round at once.
//!
//! What an answer does to a certificate:
//! - ACTIVE, attached to the thing: approved (a certificate an operator revoked stays revoked).
//! - REVOKED: revoked.
//! - INACTIVE (or another status), or attached to other things only: pending, with the reason.
//! - Not registered: a certificate only the registry had approved is pending again; one an
//!   operator approved stays approved (a device the cloud does not know of).
//!
//! Unreachable: its last answer stands for `trust_for` after it was given; then a certificate
//! only it approved is pending until it answers again. Failures are logged and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_iot::types::CertificateStatus;
use tokio::sync::watch;
use tracing::{info, warn};

use super::registry::{Cloud, Finding, RegistryError};
use super::{Authority, RegistryConfig};
use crate::escape::Escaped;

/// A certificate that stays pending is looked up at most this often on its reconnects.
pub const RECHECK_AFTER: Duration = Duration::from_secs(10);
/// The thing attribute through which AWS IoT vouches for a certificate enrolled here: the
/// SHA-256 of the device's public key (its DER SubjectPublicKeyInfo), lowercase hex.
pub const ENROLLMENT_KEY_ATTRIBUTE: &str = "sitegate_enrollment_key";
/// Pages of a list call read at most (100 items a page).
const MAX_PAGES: usize = 20;

/// Why a look-up gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("AWS IoT registry unreachable: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl VerifyError {
    /// Whether asking again later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            VerifyError::Unreachable(_) => true,
            VerifyError::Registry(e) => e.retryable(),
        }
    }
}

/// What one round of `sync` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    pub checked: usize,
    pub changed: usize,
}

/// The AWS IoT registry client and what the gateway remembers of its answers.
pub struct Verifier {
    client: aws_sdk_iot::Client,
    sync_interval: Duration,
    trust_for: Duration,
    /// When each pending certificate was last looked up on a connect.
    recent: Mutex<HashMap<String, Instant>>,
    /// The last sync failed: answers may have outlived their trust since.
    unreachable: AtomicBool,
}

impl Verifier {
    /// A client for `config` from the standard credential chain (on Greengrass, its token
    /// exchange service).
    pub async fn new(config: &RegistryConfig) -> Verifier {
        let target = sitegate_plugins::aws::AwsTarget {
            endpoint: config.endpoint.as_deref(),
            region: config.region.as_deref(),
            max_attempts: 2,
        };
        let sdk = sitegate_plugins::aws::sdk_config(&target).await;
        Verifier {
            client: aws_sdk_iot::Client::new(&sdk),
            sync_interval: config.sync_interval.0,
            trust_for: config.trust_for.0,
            recent: Mutex::new(HashMap::new()),
            unreachable: AtomicBool::new(false),
        }
    }

    /// How long an answer stands while the registry cannot be reached.
    pub fn trust_for(&self) -> Duration {
        self.trust_for
    }

    /// What AWS IoT says of `cert_id` presented by `thing`; counted in
    /// [`crate::metrics::REGISTRY_LOOKUPS`]. A certificate enrolled here (`enrolled_key`: the
    /// digest of its key) that AWS IoT does not know is vouched for through its thing instead:
    /// the thing's [`ENROLLMENT_KEY_ATTRIBUTE`] must name that key.
    pub async fn look_up(
        &self,
        thing: &str,
        cert_id: &str,
        enrolled_key: Option<&str>,
    ) -> Result<Finding, VerifyError> {
        crate::metrics::handle();
        let found = match (self.ask(thing, cert_id).await, enrolled_key) {
            (Ok(Finding::Unknown(_)), Some(key)) => self.ask_enrolled(thing, key).await,
            (other, _) => other,
        };
        let result = if found.is_ok() { "answered" } else { "failed" };
        metrics::counter!(crate::metrics::REGISTRY_LOOKUPS, "result" => result).increment(1);
        found
    }

    async fn ask(&self, thing: &str, cert_id: &str) -> Result<Finding, VerifyError> {
        let unreachable = |e: String| VerifyError::Unreachable(e);
        let described = self
            .client
            .describe_certificate()
            .certificate_id(cert_id)
            .send()
            .await;
        let description = match described {
            Ok(d) => d.certificate_description,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                return Ok(Finding::Unknown("not registered in AWS IoT".into()))
            }
            Err(e) => return Err(unreachable(error_text(e))),
        };
        let Some(description) = description else {
            return Ok(Finding::Unknown("not registered in AWS IoT".into()));
        };
        match description.status() {
            Some(CertificateStatus::Active) => {}
            Some(CertificateStatus::Revoked) => {
                return Ok(Finding::Revoked("REVOKED in AWS IoT".into()))
            }
            Some(other) => return Ok(Finding::Refused(format!("{} in AWS IoT", other.as_str()))),
            None => return Ok(Finding::Refused("no status in AWS IoT".into())),
        }
        let Some(arn) = description.certificate_arn() else {
            return Ok(Finding::Refused("no certificate ARN in AWS IoT".into()));
        };
        let mut attached = false;
        let mut token = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .client
                .list_principal_things()
                .principal(arn)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| unreachable(error_text(e)))?;
            attached |= page.things().iter().any(|t| t == thing);
            token = page.next_token().map(str::to_owned);
            if attached || token.is_none() {
                break;
            }
        }
        if !attached {
            return Ok(Finding::Refused(format!(
                "not attached to thing {thing} in AWS IoT"
            )));
        }
        match self.thing_facts(thing).await? {
            Some(cloud) => Ok(Finding::Approved(cloud)),
            None => Ok(Finding::Refused(format!("thing {thing} is not in AWS IoT"))),
        }
    }

    /// A certificate signed here by enrollment for the key whose SHA-256 is `key`: the thing
    /// must exist in AWS IoT with that digest as its [`ENROLLMENT_KEY_ATTRIBUTE`], which the
    /// factory records when it makes the key, so a claim certificate alone vouches for nothing.
    async fn ask_enrolled(&self, thing: &str, key: &str) -> Result<Finding, VerifyError> {
        let Some(cloud) = self.thing_facts(thing).await? else {
            return Ok(Finding::Unknown(format!(
                "enrolled here; thing {thing} is not in AWS IoT"
            )));
        };
        if cloud
            .attributes
            .get(ENROLLMENT_KEY_ATTRIBUTE)
            .map(String::as_str)
            == Some(key)
        {
            return Ok(Finding::Approved(cloud));
        }
        Ok(Finding::Refused(format!(
            "enrolled here; thing {thing} in AWS IoT has no {ENROLLMENT_KEY_ATTRIBUTE} attribute naming this key"
        )))
    }

    /// The thing's type, attributes and thing groups; `None` when AWS IoT has no such thing.
    async fn thing_facts(&self, thing: &str) -> Result<Option<Cloud>, VerifyError> {
        let unreachable = |e: String| VerifyError::Unreachable(e);
        let described = match self.client.describe_thing().thing_name(thing).send().await {
            Ok(d) => d,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(unreachable(error_text(e))),
        };
        let mut cloud = Cloud {
            thing_type: described.thing_type_name().map(str::to_owned),
            attributes: described
                .attributes()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            thing_groups: Vec::new(),
        };
        let mut token = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .client
                .list_thing_groups_for_thing()
                .thing_name(thing)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| unreachable(error_text(e)))?;
            cloud.thing_groups.extend(
                page.thing_groups()
                    .iter()
                    .filter_map(|g| g.group_name().map(str::to_owned)),
            );
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        cloud.thing_groups.sort();
        Ok(Some(cloud))
    }

    /// Looks up a pending certificate that just connected (at most every [`RECHECK_AFTER`]
    /// per certificate) and applies the answer; the live session follows the epoch.
    pub async fn check_new(&self, authority: &Authority, thing: &str, cert_id: &str) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            recent.retain(|_, at| now.duration_since(*at) < RECHECK_AFTER);
            if recent.contains_key(cert_id) {
                return;
            }
            recent.insert(cert_id.to_owned(), now);
        }
        let enrolled_key = match authority.registry().get(thing) {
            Ok(r) => r.and_then(|r| r.cert(cert_id).and_then(|c| c.enrolled_key.clone())),
            Err(e) => {
                warn!(thing = %Escaped(thing), error = %e, "registry unreadable; the device stays pending");
                return;
            }
        };
        match self.look_up(thing, cert_id, enrolled_key.as_deref()).await {
            Ok(finding) => {
                if let Err(e) = apply(authority, thing, cert_id, &finding) {
                    warn!(thing = %Escaped(thing), error = %e, "registry answer not recorded");
                }
            }
            Err(e) => {
                warn!(thing = %Escaped(thing), error = %e, "AWS IoT registry look-up failed; the device stays pending")
            }
        }
    }

    /// Looks up every certificate the gateway has seen and not revoked, and applies the
    /// answers. Stops at the first look-up that gets no answer.
    pub async fn sync(&self, authority: &Authority) -> Result<SyncReport, VerifyError> {
        let report = self.sync_round(authority).await;
        match &report {
            Err(_) => self.unreachable.store(true, Relaxed),
            // Approvals that lapsed while it was away hold again: live sessions re-read.
            Ok(_) if self.unreachable.swap(false, Relaxed) => authority.bump(),
            Ok(_) => {}
        }
        report
    }

    async fn sync_round(&self, authority: &Authority) -> Result<SyncReport, VerifyError> {
        let mut report = SyncReport::default();
        let records = authority.registry().list()?;
        for record in records {
            if record.revoked {
                continue;
            }
            for cert in &record.certs {
                if cert.state == super::DeviceState::Revoked {
                    continue;
                }
                let finding = self
                    .look_up(&record.thing, &cert.id, cert.enrolled_key.as_deref())
                    .await?;
                report.checked += 1;
                if apply(authority, &record.thing, &cert.id, &finding)? {
                    report.changed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Syncs every `sync_interval` until `stop`.
    pub async fn run(self: Arc<Self>, authority: Arc<Authority>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(self.sync_interval) => {}
            }
            match self.sync(&authority).await {
                Ok(r) if r.changed > 0 => info!(
                    checked = r.checked,
                    changed = r.changed,
                    "AWS IoT registry sync applied changes"
                ),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, trust_for_secs = self.trust_for.as_secs(), "AWS IoT registry sync failed; its last answers stand until their trust runs out");
                    // Answers may have outlived their trust: live sessions re-read their grants.
                    authority.bump();
                }
            }
        }
    }
}

/// Records `finding` for the certificate; true when it changed what the registry holds.
fn apply(
    authority: &Authority,
    thing: &str,
    cert_id: &str,
    finding: &Finding,
) -> Result<bool, RegistryError> {
    let changed =
        authority
            .registry()
            .record_finding(thing, cert_id, finding, crate::clock::now_ms())?;
    if changed {
        info!(thing = %Escaped(thing), cert_id = %cert_id, finding = ?finding, "AWS IoT registry answer applied");
        authority.bump();
    }
    Ok(changed)
}

/// What the SDK says went wrong, with its causes (its `Display` alone is "service error").
fn error_text(e: impl std::error::Error) -> String {
    aws_sdk_iot::error::DisplayErrorContext(e).to_string()
}
