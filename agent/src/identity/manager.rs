//! The node's workload certificates: one per identity with local pods, issued on first use,
//! renewed at half life, dropped when the last pod of the service account leaves.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{Ca, Certified, DEFAULT_LIFETIME, Error, Identity, check_trust_domain, rfc3339};

/// The longest the renewal task sleeps between checks, so that a wall-clock jump (or a suspended
/// node) delays renewal by at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How long the renewal task waits before retrying a failed renewal.
const RETRY: Duration = Duration::from_secs(10);

/// The time source of the [`Manager`]; tests move it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Where a certificate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// Valid and not yet at half life.
    Valid,
    /// Past half life: renewal is pending, or failing (see [`CertInfo::renewal_error`]). Still
    /// valid.
    RenewalDue,
    /// Past its expiry: renewal has been failing for half a lifetime.
    Expired,
}

/// One certificate, as the admin API (`/certs`) shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// The identity the certificate is for.
    pub identity: Identity,
    /// The serial number, lowercase hexadecimal.
    pub serial: String,
    /// When the certificate became valid.
    #[serde(serialize_with = "serialize_time")]
    pub not_before: SystemTime,
    /// When it expires.
    #[serde(serialize_with = "serialize_time")]
    pub not_after: SystemTime,
    /// When it is (or was) due for renewal.
    #[serde(serialize_with = "serialize_time")]
    pub renew_at: SystemTime,
    /// Where it is in its life.
    pub state: CertState,
    /// Why the last renewal attempt failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal_error: Option<String>,
}

fn serialize_time<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*time))
}

struct Entry {
    current: Arc<Certified>,
    renewal_error: Option<String>,
}

/// The workload certificates of the identities with pods on this node.
///
/// [`Manager::certified`] hands out the current certificate of an identity, issuing it on first
/// use. [`Manager::run`] (or [`Manager::renew_due`]) replaces certificates at half life: new
/// handshakes get the new one, established connections keep the one they were made with (each
/// holds its own [`Arc`]). [`Manager::forget`] drops an identity whose last local pod left.
pub struct Manager {
    ca: Arc<Ca>,
    trust_domain: String,
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    certs: Mutex<BTreeMap<Identity, Entry>>,
}

impl Manager {
    /// A manager issuing from `ca` for identities of `trust_domain`, with certificates valid
    /// for [`DEFAULT_LIFETIME`].
    pub fn new(ca: Arc<Ca>, trust_domain: &str, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        check_trust_domain(trust_domain).map_err(Error::InvalidTrustDomain)?;
        Ok(Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            clock,
            lifetime: DEFAULT_LIFETIME,
            certs: Mutex::new(BTreeMap::new()),
        })
    }

    /// Sets how long issued certificates are valid.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The CA the certificates come from.
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current certificate of `identity`, issued now if it has none (or only an expired
    /// one).
    pub fn certified(&self, identity: &Identity) -> Result<Arc<Certified>, Error> {
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignIdentity {
                identity: identity.clone(),
                mesh: self.trust_domain.clone(),
            });
        }
        let now = self.clock.now();
        if let Some(entry) = self.lock().get(identity)
            && entry.current.is_valid_at(now)
        {
            return Ok(entry.current.clone());
        }
        // Sign without the lock: an RSA CA takes milliseconds per signature.
        let fresh = Arc::new(self.ca.issue(identity, now, self.lifetime)?);
        let mut certs = self.lock();
        match certs.get_mut(identity) {
            // Another caller got there first.
            Some(entry) if entry.current.is_valid_at(now) => Ok(entry.current.clone()),
            entry => {
                info!(
                    %identity,
                    serial = fresh.serial(),
                    not_after = %rfc3339(fresh.not_after()),
                    "issued a workload certificate"
                );
                let replacement = Entry {
                    current: fresh.clone(),
                    renewal_error: None,
                };
                match entry {
                    Some(entry) => *entry = replacement,
                    None => {
                        certs.insert(identity.clone(), replacement);
                    }
                }
                Ok(fresh)
            }
        }
    }

    /// Renews every certificate past half life; returns the identities renewed. A failed
    /// renewal is logged and recorded (see [`Manager::list`]); the old certificate stays in use
    /// and the next call tries again.
    pub fn renew_due(&self) -> Vec<Identity> {
        let now = self.clock.now();
        let due: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, entry)| entry.current.renew_at() <= now)
            .map(|(identity, _)| identity.clone())
            .collect();
        let mut renewed = Vec::new();
        for identity in due {
            let result = self.ca.issue(&identity, now, self.lifetime);
            let mut certs = self.lock();
            // Forgotten meanwhile, or already replaced by `certified`: nothing to do.
            let Some(entry) = certs.get_mut(&identity) else {
                continue;
            };
            if entry.current.renew_at() > now {
                continue;
            }
            match result {
                Ok(fresh) => {
                    info!(
                        %identity,
                        old_serial = entry.current.serial(),
                        serial = fresh.serial(),
                        not_after = %rfc3339(fresh.not_after()),
                        "renewed a workload certificate"
                    );
                    entry.current = Arc::new(fresh);
                    entry.renewal_error = None;
                    renewed.push(identity);
                }
                Err(err) => {
                    warn!(
                        %identity,
                        serial = entry.current.serial(),
                        not_after = %rfc3339(entry.current.not_after()),
                        "renewing a workload certificate failed, will retry: {err}"
                    );
                    entry.renewal_error = Some(err.to_string());
                }
            }
        }
        renewed
    }

    /// When the next certificate is due for renewal, if there is any certificate.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.lock()
            .values()
            .map(|entry| entry.current.renew_at())
            .min()
    }

    /// Drops the certificate of `identity`, whose last local pod left. Connections that use it
    /// keep it until they close. Returns whether there was one.
    pub fn forget(&self, identity: &Identity) -> bool {
        let forgotten = self.lock().remove(identity).is_some();
        if forgotten {
            info!(%identity, "dropped a workload certificate: no local pod uses it any more");
        }
        forgotten
    }

    /// Every certificate, ordered by identity.
    pub fn list(&self) -> Vec<CertInfo> {
        let now = self.clock.now();
        self.lock()
            .iter()
            .map(|(identity, entry)| {
                let cert = &entry.current;
                let state = if now >= cert.not_after() {
                    CertState::Expired
                } else if now >= cert.renew_at() {
                    CertState::RenewalDue
                } else {
                    CertState::Valid
                };
                CertInfo {
                    identity: identity.clone(),
                    serial: cert.serial().to_owned(),
                    not_before: cert.not_before(),
                    not_after: cert.not_after(),
                    renew_at: cert.renew_at(),
                    state,
                    renewal_error: entry.renewal_error.clone(),
                }
            })
            .collect()
    }

    /// Renews certificates as they come due, forever: spawn it on the control-plane runtime and
    /// abort the task to stop it.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.renew_due();
            let now = self.clock.now();
            let wait = match self.next_renewal() {
                // Still due after renewing: the renewal failed.
                Some(at) if at <= now => RETRY,
                Some(at) => at.duration_since(now).unwrap_or_default(),
                None => MAX_SLEEP,
            };
            tokio::time::sleep(wait.min(MAX_SLEEP)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Identity, Entry>> {
        // A panic while holding the lock leaves the map consistent: every update is one
        // assignment.
        self.certs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("ca", &self.ca)
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .field("certs", &self.lock().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::ca::tests::{TestCa, id, p256},
        *,
    };

    /// A clock tests move by hand.
    #[derive(Debug)]
    struct TestClock(Mutex<SystemTime>);

    impl TestClock {
        fn new() -> Arc<Self> {
            Arc::new(Self(Mutex::new(SystemTime::now())))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    fn manager(clock: Arc<TestClock>) -> Manager {
        let ca = Arc::new(TestCa::root(p256(), "cluster.local").ca());
        Manager::new(ca, "cluster.local", clock).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn issues_once_per_identity() {
        let manager = manager(TestClock::new());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let b = id("spiffe://cluster.local/ns/default/sa/b");
        let first = manager.certified(&a).unwrap();
        let again = manager.certified(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = manager.certified(&b).unwrap();
        assert_ne!(first.serial(), other.serial());
        assert_eq!(other.identity(), &b);
        assert_eq!(manager.list().len(), 2);

        let err = manager
            .certified(&id("spiffe://foo/ns/default/sa/a"))
            .unwrap_err();
        assert!(matches!(err, Error::ForeignIdentity { .. }), "{err}");
        assert_eq!(manager.list().len(), 2);
    }

    #[test]
    fn renews_at_half_life() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let old = manager.certified(&a).unwrap();
        assert_eq!(manager.next_renewal(), Some(old.renew_at()));

        clock.advance(11 * HOUR);
        assert!(manager.renew_due().is_empty());
        assert!(Arc::ptr_eq(&manager.certified(&a).unwrap(), &old));
        assert_eq!(manager.list()[0].state, CertState::Valid);

        // Half of 24 h, plus the minute of backdating already behind us.
        clock.advance(HOUR);
        assert_eq!(manager.list()[0].state, CertState::RenewalDue);
        assert_eq!(manager.renew_due(), vec![a.clone()]);
        let new = manager.certified(&a).unwrap();
        assert_ne!(new.serial(), old.serial());
        assert!(new.not_after() > old.not_after());
        // The old certificate is untouched for whoever still holds it.
        assert!(old.is_valid_at(clock.now()));
        assert_eq!(old.certified_key().cert, old.chain());
        assert!(manager.renew_due().is_empty(), "renewed once");
        assert_eq!(manager.list()[0].state, CertState::Valid);
    }

    #[test]
    fn an_expired_certificate_is_replaced_on_use() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let old = manager.certified(&a).unwrap();
        clock.advance(25 * HOUR);
        assert_eq!(manager.list()[0].state, CertState::Expired);
        let new = manager.certified(&a).unwrap();
        assert_ne!(new.serial(), old.serial());
        assert!(new.is_valid_at(clock.now()));
    }

    #[test]
    fn forget_drops_the_certificate() {
        let manager = manager(TestClock::new());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let first = manager.certified(&a).unwrap();
        assert!(manager.forget(&a));
        assert!(!manager.forget(&a));
        assert!(manager.list().is_empty());
        assert_eq!(manager.next_renewal(), None);
        let second = manager.certified(&a).unwrap();
        assert_ne!(first.serial(), second.serial());
    }

    #[test]
    fn list_shows_serial_and_expiry() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let b = id("spiffe://cluster.local/ns/default/sa/b");
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let cert_b = manager.certified(&b).unwrap();
        let cert_a = manager.certified(&a).unwrap();
        let list = manager.list();
        assert_eq!(
            list,
            vec![
                CertInfo {
                    identity: a,
                    serial: cert_a.serial().to_owned(),
                    not_before: cert_a.not_before(),
                    not_after: cert_a.not_after(),
                    renew_at: cert_a.renew_at(),
                    state: CertState::Valid,
                    renewal_error: None,
                },
                CertInfo {
                    identity: b,
                    serial: cert_b.serial().to_owned(),
                    not_before: cert_b.not_before(),
                    not_after: cert_b.not_after(),
                    renew_at: cert_b.renew_at(),
                    state: CertState::Valid,
                    renewal_error: None,
                },
            ]
        );
        assert_eq!(
            cert_a
                .not_after()
                .duration_since(cert_a.not_before())
                .unwrap(),
            24 * HOUR + Duration::from_secs(60)
        );
        let json = serde_json::to_value(&list[0]).unwrap();
        assert_eq!(json["identity"], "spiffe://cluster.local/ns/default/sa/a");
        assert_eq!(json["serial"], cert_a.serial());
        assert_eq!(json["not_after"], rfc3339(cert_a.not_after()));
        assert_eq!(json["state"], "valid");
        assert!(json.get("renewal_error").is_none());
    }

    #[tokio::test]
    async fn run_renews_in_the_background() {
        let clock = TestClock::new();
        let manager = Arc::new(manager(clock.clone()));
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let old = manager.certified(&a).unwrap();
        clock.advance(13 * HOUR);
        let task = tokio::spawn(manager.clone().run());
        let mut renewed = false;
        for _ in 0..200 {
            if manager.certified(&a).unwrap().serial() != old.serial() {
                renewed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(renewed, "run() did not renew a certificate past half life");
    }
}
