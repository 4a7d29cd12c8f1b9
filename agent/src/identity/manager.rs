//! The node's workload certificates: one per identity with local pods, obtained on first use,
//! renewed at half life (retrying with jittered exponential backoff), dropped when the last pod
//! of the service account leaves.
//!
//! Certificates come from an [`Issuer`]: the cluster CA over Istio's certificate API
//! ([`RemoteCa`]: `meshlet ca` or istiod; the key is made here and never leaves memory), or a CA
//! the node holds itself (`--ca-cert`/`--ca-key` or a generated root: development and the file
//! source only). A certificate that is still valid keeps serving while its issuer is
//! unreachable; [`Manager::issuer_status`] says so for readiness and metrics.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Ca, Certified, DEFAULT_LIFETIME, Error, Identity, check_trust_domain, remote::RemoteCa,
    rfc3339, tls::Roots,
};

/// The longest the renewal task sleeps between checks, so that a wall-clock jump (or a suspended
/// node) delays renewal by at most this much; a remote trust bundle is re-read as often.
const MAX_SLEEP: Duration = Duration::from_secs(10);
/// The first retry after a failed issuance or renewal; each further failure doubles it.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Renewals or first issuances in flight at once.
const CONCURRENCY: usize = 16;

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

/// Where certificates come from.
#[derive(Debug, Clone)]
pub enum Issuer {
    /// A CA this node holds (development, the file source).
    Local(Arc<Ca>),
    /// The cluster CA, over Istio's certificate API.
    Remote(Arc<RemoteCa>),
}

impl Issuer {
    async fn issue(
        &self,
        identity: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Certified, Error> {
        match self {
            Self::Local(ca) => ca.issue(identity, now, lifetime),
            Self::Remote(ca) => ca.issue(identity, now, lifetime).await,
        }
    }

    /// A name for logs and the admin API: `local` or the CA's address.
    pub fn name(&self) -> String {
        match self {
            Self::Local(_) => "local".to_owned(),
            Self::Remote(ca) => ca.address().to_owned(),
        }
    }
}

/// Where a certificate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// Asked for, not obtained yet (see [`CertInfo::renewal_error`] for why, if it failed).
    Pending,
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
    /// Where it is in its life.
    pub state: CertState,
    /// The serial number, lowercase hexadecimal (none while pending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When the certificate became valid.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_time"
    )]
    pub not_before: Option<SystemTime>,
    /// When it expires.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_time"
    )]
    pub not_after: Option<SystemTime>,
    /// When it is (or was) due for renewal.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_time"
    )]
    pub renew_at: Option<SystemTime>,
    /// Why the last attempt to obtain or renew it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewal_error: Option<String>,
}

fn serialize_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => s.serialize_str(&rfc3339(*time)),
        None => s.serialize_none(),
    }
}

/// Whether the issuer answered the last time it was asked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IssuerStatus {
    /// `local`, or the CA's address.
    pub issuer: String,
    /// Whether the last request succeeded (true before the first).
    pub reachable: bool,
    /// Since when it has been failing.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_time"
    )]
    pub failing_since: Option<SystemTime>,
    /// The last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

struct Entry {
    /// `None` until the first certificate arrives.
    current: Option<Arc<Certified>>,
    /// Why the last attempt failed.
    error: Option<String>,
    /// Consecutive failures.
    failures: u32,
    /// Not before this time is another attempt made.
    next_attempt: SystemTime,
}

impl Entry {
    fn due(&self, now: SystemTime) -> bool {
        let wanted = self
            .current
            .as_ref()
            .is_none_or(|cert| cert.renew_at() <= now);
        wanted && self.next_attempt <= now
    }

    fn wake_at(&self) -> SystemTime {
        match &self.current {
            Some(cert) => cert.renew_at().max(self.next_attempt),
            None => self.next_attempt,
        }
    }
}

/// The workload certificates of the identities with pods on this node.
///
/// [`Manager::certified`] hands out the current certificate of an identity, obtaining it on
/// first use; [`Manager::ensure`] starts that without waiting, and [`Manager::current`] reads
/// it without ever waiting (TLS certificate resolvers). [`Manager::run`] renews certificates
/// at half life and retries failures with jittered exponential backoff: new handshakes get the
/// new certificate, established connections keep the one they were made with (each holds its
/// own [`Arc`]). [`Manager::forget`] drops an identity whose last local pod left.
pub struct Manager {
    issuer: Issuer,
    roots: Roots,
    trust_domain: String,
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    certs: Mutex<BTreeMap<Identity, Entry>>,
    in_flight: Mutex<HashSet<Identity>>,
    status: Mutex<IssuerStatus>,
    /// Bumped after every attempt, successful or not.
    attempts: watch::Sender<u64>,
}

impl Manager {
    /// A manager obtaining certificates from `issuer` for identities of `trust_domain`, valid
    /// for [`DEFAULT_LIFETIME`].
    pub fn new(issuer: Issuer, trust_domain: &str, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        check_trust_domain(trust_domain).map_err(Error::InvalidTrustDomain)?;
        let roots = match &issuer {
            Issuer::Local(ca) => Roots::new(ca.roots()),
            Issuer::Remote(ca) => ca.roots(),
        };
        Ok(Self {
            status: Mutex::new(IssuerStatus {
                issuer: issuer.name(),
                reachable: true,
                failing_since: None,
                last_error: None,
            }),
            issuer,
            roots,
            trust_domain: trust_domain.to_owned(),
            clock,
            lifetime: DEFAULT_LIFETIME,
            certs: Mutex::new(BTreeMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            attempts: watch::Sender::new(0),
        })
    }

    /// Sets how long certificates are asked for.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Where certificates come from.
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The roots peers' certificates must chain to (a live handle: a reloaded trust bundle
    /// shows through it).
    pub fn roots(&self) -> Roots {
        self.roots.clone()
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether the issuer answered the last time it was asked.
    pub fn issuer_status(&self) -> IssuerStatus {
        lock(&self.status).clone()
    }

    /// What readiness says of certificates. `Ok(None)` while the issuer answers. While it does
    /// not, valid certificates keep serving: `Ok(Some(note))` says so, and `Err` once a
    /// certificate in use has expired.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        let issuer = self.issuer_status();
        if issuer.reachable {
            return Ok(None);
        }
        let certs = self.list();
        let count = |state| certs.iter().filter(|c| c.state == state).count();
        let valid = count(CertState::Valid) + count(CertState::RenewalDue);
        let note = format!(
            "ca: {} unreachable since {} ({}); {valid} certificate(s) still valid",
            issuer.issuer,
            issuer.failing_since.map(rfc3339).unwrap_or_default(),
            issuer.last_error.unwrap_or_default()
        );
        let expired: Vec<String> = certs
            .iter()
            .filter(|c| c.state == CertState::Expired)
            .map(|c| c.identity.to_string())
            .collect();
        if expired.is_empty() {
            Ok(Some(note))
        } else {
            Err(format!(
                "expired certificates ({})\n{note}",
                expired.join(", ")
            ))
        }
    }

    /// A receiver that changes after every attempt to obtain a certificate.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    fn check_domain(&self, identity: &Identity) -> Result<(), Error> {
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignIdentity {
                identity: identity.clone(),
                mesh: self.trust_domain.clone(),
            });
        }
        Ok(())
    }

    /// The current certificate of `identity`, if it has one that is valid now. Never waits.
    pub fn current(&self, identity: &Identity) -> Option<Arc<Certified>> {
        let now = self.clock.now();
        self.lock()
            .get(identity)
            .and_then(|entry| entry.current.clone())
            .filter(|cert| cert.is_valid_at(now))
    }

    /// The current certificate of `identity`, obtained now if it has none valid (waiting for
    /// an attempt already in flight rather than starting another).
    pub async fn certified(&self, identity: &Identity) -> Result<Arc<Certified>, Error> {
        self.check_domain(identity)?;
        let mut attempts = self.attempts.subscribe();
        loop {
            if let Some(cert) = self.current(identity) {
                return Ok(cert);
            }
            if self.start(identity) {
                self.attempt(identity).await;
                return self
                    .current(identity)
                    .ok_or_else(|| self.unavailable(identity));
            }
            if !lock(&self.in_flight).contains(identity) {
                // Backing off after a failure: the renewal task retries.
                return Err(self.unavailable(identity));
            }
            // Someone else is asking: wait for their answer.
            attempts.borrow_and_update();
            if attempts.changed().await.is_err() {
                return Err(self.unavailable(identity));
            }
            if self.current(identity).is_none() && !lock(&self.in_flight).contains(identity) {
                return Err(self.unavailable(identity));
            }
        }
    }

    /// Whether `identity` has a valid certificate; if not, starts obtaining one in the
    /// background (a local CA signs at once) and returns `false`.
    pub fn ensure(self: &Arc<Self>, identity: &Identity) -> Result<bool, Error> {
        self.check_domain(identity)?;
        if self.current(identity).is_some() {
            return Ok(true);
        }
        // Not before a failed attempt's backoff has passed: reconcile passes must not turn
        // into a retry storm against a CA that is down.
        if !self.start(identity) {
            return Ok(false);
        }
        match &self.issuer {
            Issuer::Local(ca) => {
                // Signing locally takes microseconds (milliseconds for RSA): no need to wait.
                let now = self.clock.now();
                let result = ca.issue(identity, now, self.lifetime);
                self.settle(identity, now, result);
                self.finish(identity);
                self.current(identity)
                    .map(|_| true)
                    .ok_or_else(|| self.unavailable(identity))
            }
            Issuer::Remote(_) => {
                let manager = self.clone();
                let identity = identity.clone();
                tokio::spawn(async move { manager.attempt(&identity).await });
                Ok(false)
            }
        }
    }

    /// Registers `identity` and claims an attempt for it, if one is due (none in flight, no
    /// backoff pending).
    fn start(&self, identity: &Identity) -> bool {
        self.register(identity);
        let now = self.clock.now();
        let due = self
            .lock()
            .get(identity)
            .is_some_and(|entry| entry.next_attempt <= now);
        due && self.claim(identity)
    }

    fn unavailable(&self, identity: &Identity) -> Error {
        let reason = self
            .lock()
            .get(identity)
            .and_then(|entry| entry.error.clone())
            .unwrap_or_else(|| "no certificate yet".to_owned());
        Error::Unavailable {
            identity: identity.clone(),
            reason,
        }
    }

    /// Makes sure `identity` has an entry, so that [`Manager::run`] keeps trying for it.
    fn register(&self, identity: &Identity) {
        let now = self.clock.now();
        self.lock().entry(identity.clone()).or_insert(Entry {
            current: None,
            error: None,
            failures: 0,
            next_attempt: now,
        });
    }

    /// Marks an attempt for `identity` in flight; `false` if one already is.
    fn claim(&self, identity: &Identity) -> bool {
        lock(&self.in_flight).insert(identity.clone())
    }

    /// Asks the issuer for a certificate for `identity` (claimed by the caller) and records the
    /// outcome; `true` if a new certificate is in place.
    async fn attempt(&self, identity: &Identity) -> bool {
        let now = self.clock.now();
        let result = self.issuer.issue(identity, now, self.lifetime).await;
        let obtained = self.settle(identity, now, result);
        self.finish(identity);
        obtained
    }

    /// Ends the attempt in flight for `identity` and wakes whoever waits on one.
    fn finish(&self, identity: &Identity) {
        lock(&self.in_flight).remove(identity);
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Records an attempt's outcome; `true` if a new certificate is in place.
    fn settle(
        &self,
        identity: &Identity,
        now: SystemTime,
        result: Result<Certified, Error>,
    ) -> bool {
        {
            let mut status = lock(&self.status);
            match &result {
                Ok(_) => {
                    if !status.reachable {
                        info!(issuer = %status.issuer, "the certificate issuer answers again");
                    }
                    status.reachable = true;
                    status.failing_since = None;
                    status.last_error = None;
                }
                Err(err) => {
                    if status.reachable {
                        status.failing_since = Some(now);
                    }
                    status.reachable = false;
                    status.last_error = Some(err.to_string());
                }
            }
        }
        let mut certs = self.lock();
        // Forgotten meanwhile: its last pod left.
        let Some(entry) = certs.get_mut(identity) else {
            return false;
        };
        match result {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                match &entry.current {
                    Some(old) => info!(
                        %identity,
                        old_serial = old.serial(),
                        serial = fresh.serial(),
                        not_after = %rfc3339(fresh.not_after()),
                        "renewed a workload certificate"
                    ),
                    None => info!(
                        %identity,
                        serial = fresh.serial(),
                        not_after = %rfc3339(fresh.not_after()),
                        issuer = %self.issuer.name(),
                        "obtained a workload certificate"
                    ),
                }
                entry.current = Some(fresh);
                entry.error = None;
                entry.failures = 0;
                entry.next_attempt = now;
                true
            }
            Err(err) => {
                entry.failures = entry.failures.saturating_add(1);
                let wait = backoff(entry.failures, now);
                entry.next_attempt = now + wait;
                match &entry.current {
                    Some(cert) if cert.is_valid_at(now) => warn!(
                        %identity,
                        serial = cert.serial(),
                        valid_until = %rfc3339(cert.not_after()),
                        retry_in = ?wait,
                        "renewing a workload certificate failed; the current one keeps serving: {err}"
                    ),
                    _ => warn!(
                        %identity,
                        retry_in = ?wait,
                        "obtaining a workload certificate failed: {err}"
                    ),
                }
                entry.error = Some(err.to_string());
                false
            }
        }
    }

    /// Attempts every certificate that is due (past half life, missing, or retrying) and not
    /// already in flight, a few at a time; returns the identities that got a new certificate.
    pub async fn renew_due(&self) -> Vec<Identity> {
        use futures::StreamExt as _;
        let now = self.clock.now();
        let due: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, entry)| entry.due(now))
            .map(|(identity, _)| identity.clone())
            .filter(|identity| self.claim(identity))
            .collect();
        futures::stream::iter(due)
            .map(|identity| async move { self.attempt(&identity).await.then_some(identity) })
            .buffer_unordered(CONCURRENCY)
            .filter_map(|renewed| async move { renewed })
            .collect()
            .await
    }

    /// When the next attempt is due, if any certificate is tracked.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.lock().values().map(Entry::wake_at).min()
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
                let Some(cert) = &entry.current else {
                    return CertInfo {
                        identity: identity.clone(),
                        state: CertState::Pending,
                        serial: None,
                        not_before: None,
                        not_after: None,
                        renew_at: None,
                        renewal_error: entry.error.clone(),
                    };
                };
                let state = if now >= cert.not_after() {
                    CertState::Expired
                } else if now >= cert.renew_at() {
                    CertState::RenewalDue
                } else {
                    CertState::Valid
                };
                CertInfo {
                    identity: identity.clone(),
                    state,
                    serial: Some(cert.serial().to_owned()),
                    not_before: Some(cert.not_before()),
                    not_after: Some(cert.not_after()),
                    renew_at: Some(cert.renew_at()),
                    renewal_error: entry.error.clone(),
                }
            })
            .collect()
    }

    /// Renews certificates as they come due, and re-reads a remote CA's trust bundle, forever:
    /// spawn it on the control-plane runtime and abort the task to stop it.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Issuer::Remote(ca) = &self.issuer {
                match ca.reload_roots() {
                    Ok(true) => {
                        info!(path = %ca.root_path().display(), "reloaded the CA trust bundle")
                    }
                    Ok(false) => {}
                    Err(err) => warn!("{err}"),
                }
            }
            let renewed = self.renew_due().await;
            if !renewed.is_empty() {
                debug!(renewed = renewed.len(), "renewal pass done");
            }
            let now = self.clock.now();
            let wait = self
                .next_renewal()
                .map(|at| at.duration_since(now).unwrap_or_default())
                .unwrap_or(MAX_SLEEP);
            tokio::time::sleep(wait.clamp(Duration::from_millis(50), MAX_SLEEP)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Identity, Entry>> {
        lock(&self.certs)
    }
}

/// Locks a mutex; a panic while it was held leaves the data consistent: every update is one
/// assignment.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long to wait after the `failures`th failure in a row: exponential from [`RETRY_MIN`]
/// up to [`RETRY_MAX`], then jittered into its upper half, so that agents that lost the CA
/// together do not come back together.
fn backoff(failures: u32, now: SystemTime) -> Duration {
    use std::hash::BuildHasher as _;
    let exponent = failures.saturating_sub(1).min(16);
    let base = RETRY_MIN.saturating_mul(1 << exponent).min(RETRY_MAX);
    let random = std::collections::hash_map::RandomState::new().hash_one(now);
    let fraction = (random % 1000) as f64 / 1000.0;
    base.mul_f64(0.5 + fraction / 2.0)
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("issuer", &self.issuer.name())
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
        Manager::new(Issuer::Local(ca), "cluster.local", clock).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn issues_once_per_identity() {
        let manager = manager(TestClock::new());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let b = id("spiffe://cluster.local/ns/default/sa/b");
        let first = manager.certified(&a).await.unwrap();
        let again = manager.certified(&a).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = manager.certified(&b).await.unwrap();
        assert_ne!(first.serial(), other.serial());
        assert_eq!(other.identity(), &b);
        assert_eq!(manager.list().len(), 2);

        let err = manager
            .certified(&id("spiffe://foo/ns/default/sa/a"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ForeignIdentity { .. }), "{err}");
        assert_eq!(manager.list().len(), 2);
    }

    #[tokio::test]
    async fn renews_at_half_life() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let old = manager.certified(&a).await.unwrap();
        assert_eq!(manager.next_renewal(), Some(old.renew_at()));

        clock.advance(11 * HOUR);
        assert!(manager.renew_due().await.is_empty());
        assert!(Arc::ptr_eq(&manager.certified(&a).await.unwrap(), &old));
        assert_eq!(manager.list()[0].state, CertState::Valid);

        // Half of 24 h, plus the minute of backdating already behind us.
        clock.advance(HOUR);
        assert_eq!(manager.list()[0].state, CertState::RenewalDue);
        assert_eq!(manager.renew_due().await, vec![a.clone()]);
        let new = manager.certified(&a).await.unwrap();
        assert_ne!(new.serial(), old.serial());
        assert!(new.not_after() > old.not_after());
        // The old certificate is untouched for whoever still holds it.
        assert!(old.is_valid_at(clock.now()));
        assert_eq!(old.certified_key().cert, old.chain());
        assert!(manager.renew_due().await.is_empty(), "renewed once");
        assert_eq!(manager.list()[0].state, CertState::Valid);
    }

    #[tokio::test]
    async fn an_expired_certificate_is_replaced_on_use() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let old = manager.certified(&a).await.unwrap();
        clock.advance(25 * HOUR);
        assert_eq!(manager.list()[0].state, CertState::Expired);
        let new = manager.certified(&a).await.unwrap();
        assert_ne!(new.serial(), old.serial());
        assert!(new.is_valid_at(clock.now()));
    }

    #[tokio::test]
    async fn forget_drops_the_certificate() {
        let manager = manager(TestClock::new());
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let first = manager.certified(&a).await.unwrap();
        assert!(manager.forget(&a));
        assert!(!manager.forget(&a));
        assert!(manager.list().is_empty());
        assert_eq!(manager.next_renewal(), None);
        let second = manager.certified(&a).await.unwrap();
        assert_ne!(first.serial(), second.serial());
    }

    #[tokio::test]
    async fn list_shows_serial_and_expiry() {
        let clock = TestClock::new();
        let manager = manager(clock.clone());
        let b = id("spiffe://cluster.local/ns/default/sa/b");
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        let cert_b = manager.certified(&b).await.unwrap();
        let cert_a = manager.certified(&a).await.unwrap();
        let list = manager.list();
        assert_eq!(
            list,
            vec![
                CertInfo {
                    identity: a,
                    serial: Some(cert_a.serial().to_owned()),
                    not_before: Some(cert_a.not_before()),
                    not_after: Some(cert_a.not_after()),
                    renew_at: Some(cert_a.renew_at()),
                    state: CertState::Valid,
                    renewal_error: None,
                },
                CertInfo {
                    identity: b,
                    serial: Some(cert_b.serial().to_owned()),
                    not_before: Some(cert_b.not_before()),
                    not_after: Some(cert_b.not_after()),
                    renew_at: Some(cert_b.renew_at()),
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
        let old = manager.certified(&a).await.unwrap();
        clock.advance(13 * HOUR);
        let task = tokio::spawn(manager.clone().run());
        let mut renewed = false;
        for _ in 0..200 {
            if manager.current(&a).unwrap().serial() != old.serial() {
                renewed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(renewed, "run() did not renew a certificate past half life");
    }

    #[tokio::test]
    async fn ensure_signs_locally_at_once_and_current_never_issues() {
        let manager = Arc::new(manager(TestClock::new()));
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        assert!(manager.current(&a).is_none());
        assert!(manager.list().is_empty(), "current() does not register");
        assert!(manager.ensure(&a).unwrap());
        let cert = manager.current(&a).unwrap();
        assert!(Arc::ptr_eq(&cert, &manager.certified(&a).await.unwrap()));
        assert!(
            manager
                .ensure(&id("spiffe://other/ns/default/sa/a"))
                .is_err()
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let now = SystemTime::now();
        for failures in 1..40 {
            let wait = backoff(failures, now);
            let base = RETRY_MIN
                .saturating_mul(1 << failures.saturating_sub(1).min(16))
                .min(RETRY_MAX);
            assert!(
                wait >= base / 2 && wait <= base,
                "{failures}: {wait:?} vs {base:?}"
            );
        }
        assert!(backoff(30, now) <= RETRY_MAX);
        assert!(backoff(1, now) <= RETRY_MIN);
    }

    #[tokio::test]
    async fn a_failed_attempt_is_not_retried_before_its_backoff() {
        let clock = TestClock::new();
        let manager = Arc::new(manager(clock.clone()));
        let a = id("spiffe://cluster.local/ns/default/sa/a");
        // Past the test CA's validity, every issuance fails.
        clock.advance(2 * 365 * 24 * HOUR);
        assert!(
            manager.ensure(&a).is_err(),
            "the first attempt runs and fails"
        );
        let list = manager.list();
        assert_eq!(list[0].state, CertState::Pending);
        assert!(list[0].renewal_error.is_some());
        // Reconcile passes and connections right after do not ask again.
        assert!(
            !manager.ensure(&a).unwrap(),
            "no second attempt inside the backoff"
        );
        assert!(matches!(
            manager.certified(&a).await,
            Err(Error::Unavailable { .. })
        ));
        assert!(manager.next_renewal().unwrap() > clock.now());
        // Once it has passed, the next one runs (and fails again).
        clock.advance(RETRY_MAX);
        assert!(manager.ensure(&a).is_err(), "retried after the backoff");
        assert!(!manager.issuer_status().reachable);
        let note = manager
            .readiness()
            .unwrap()
            .expect("a note while the issuer fails");
        assert!(
            note.contains("unreachable") && note.contains("0 certificate(s) still valid"),
            "{note}"
        );
    }
}
