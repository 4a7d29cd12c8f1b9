//! Workload identity: SPIFFE identities, the mesh CA, workload certificates and the TLS
//! configurations the HBONE tunnel uses.
//!
//! Every pod runs as a Kubernetes service account, and its identity is the SPIFFE ID
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ([`Identity`]). The node's
//! [`Ca`] (a mesh root or intermediate given with `--ca-cert`/`--ca-key`, or a development root
//! generated into the state directory) signs one short-lived ECDSA P-256 certificate per identity
//! with local pods ([`Certified`]); the [`Manager`] issues them on first use, renews them at
//! half life and forgets them when the last pod of a service account leaves. Private keys live
//! in memory only.
//!
//! [`client_config`] and [`server_config`] build the rustls configurations HBONE speaks, wire
//! compatible with Istio's ztunnel: TLS 1.3 only, ALPN `h2`, no SNI, mutual authentication. The
//! client accepts exactly the identity it expects for the destination workload (rustls only
//! knows DNS names and IP addresses, so the URI SAN check is ours); the server accepts any
//! workload of the mesh's trust domain and leaves the rest to policy, reading the caller with
//! [`peer_identity`].

mod ca;
pub mod csr;
mod manager;
mod remote;
mod tls;

use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

pub use ca::{Ca, Certified, DEFAULT_LIFETIME, Signed, generate_root_pem};
pub use manager::{CertInfo, CertState, Clock, Issuer, IssuerStatus, Manager, SystemClock};
pub use remote::{RemoteCa, RemoteConfig};
pub use tls::{
    ALPN_H2, Roots, SingleCert, client_config, parse_bundle, peer_identity, provider, server_config,
};

/// The trust domain of a mesh that does not configure one, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The longest SPIFFE ID the SPIFFE specification allows, in bytes.
const MAX_ID_LEN: usize = 2048;
/// The longest trust domain the SPIFFE specification allows, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The identity of a Kubernetes service account in the mesh:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict: the trust domain follows the SPIFFE rules (lowercase letters, digits, `.`,
/// `-`, `_`), and the path is exactly `/ns/<namespace>/sa/<service-account>` with non-empty
/// segments of letters, digits, `.`, `-` and `_`. Anything else (another scheme, a port, a query,
/// extra path segments, percent-encoding) is refused.
///
/// It is held by every connection it names, so it is one shared string: cloning it is one
/// reference count, and its parts are slices of it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The whole SPIFFE ID, checked.
    uri: Arc<str>,
    /// Where the namespace starts in `uri`.
    namespace_at: u16,
    /// Where the service account starts in `uri`.
    service_account_at: u16,
}

const SCHEME: &str = "spiffe://";
const NAMESPACE_SEGMENT: &str = "/ns/";
const SERVICE_ACCOUNT_SEGMENT: &str = "/sa/";

impl Identity {
    /// The identity of `service_account` in `namespace`, in `trust_domain`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let uri = format!(
            "{SCHEME}{trust_domain}{NAMESPACE_SEGMENT}{namespace}{SERVICE_ACCOUNT_SEGMENT}{service_account}"
        );
        let invalid = |reason: String| Error::InvalidIdentity {
            input: uri.clone(),
            reason,
        };
        check_trust_domain(trust_domain).map_err(&invalid)?;
        check_segment("namespace", namespace).map_err(&invalid)?;
        check_segment("service account", service_account).map_err(&invalid)?;
        let len = uri.len();
        if len > MAX_ID_LEN {
            return Err(invalid(format!(
                "it is {len} bytes long, SPIFFE IDs are at most {MAX_ID_LEN}"
            )));
        }
        let namespace_at = SCHEME.len() + trust_domain.len() + NAMESPACE_SEGMENT.len();
        let service_account_at = namespace_at + namespace.len() + SERVICE_ACCOUNT_SEGMENT.len();
        Ok(Self {
            uri: uri.into(),
            // Both below MAX_ID_LEN.
            namespace_at: namespace_at as u16,
            service_account_at: service_account_at as u16,
        })
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidIdentity {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it has no path"))?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account).map_err(|err| match err {
                    Error::InvalidIdentity { reason, .. } => Error::InvalidIdentity {
                        input: input.to_owned(),
                        reason,
                    },
                    other => other,
                })
            }
            _ => Err(invalid(
                "its path is not /ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.namespace_at) - NAMESPACE_SEGMENT.len()]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.namespace_at)
            ..usize::from(self.service_account_at) - SERVICE_ACCOUNT_SEGMENT.len()]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_at)..]
    }

    /// The SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

/// Ordered by trust domain, then namespace, then service account.
impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        fn parts(id: &Identity) -> (&str, &str, &str) {
            (id.trust_domain(), id.namespace(), id.service_account())
        }
        parts(self).cmp(&parts(other))
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain name against the SPIFFE rules.
fn check_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("the trust domain is empty".to_owned());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes"
        ));
    }
    match trust_domain
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(format!(
            "the trust domain {trust_domain:?} contains {c:?}; only lowercase letters, digits, \
             '.', '-' and '_' are allowed"
        )),
        None => Ok(()),
    }
}

/// Checks one path segment (namespace or service account) against the SPIFFE rules.
fn check_segment(what: &str, segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if segment == "." || segment == ".." {
        return Err(format!("the {what} is {segment:?}"));
    }
    match segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(format!(
            "the {what} {segment:?} contains {c:?}; only letters, digits, '.', '-' and '_' are \
             allowed"
        )),
        None => Ok(()),
    }
}

/// Errors from parsing identities, loading the CA, issuing certificates and verifying peers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string is not the SPIFFE identity of a service account.
    #[error(
        "{input:?} is not a workload identity: {reason}; expected \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    InvalidIdentity {
        /// The string.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain: {0}; pass e.g. --trust-domain cluster.local")]
    InvalidTrustDomain(String),
    /// PEM input holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate could not be parsed.
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    Certificate {
        /// Which certificate.
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The CA private key could not be loaded.
    #[error(
        "the CA key could not be read ({0}): it must be an unencrypted PEM private key (PKCS#8, \
         SEC1 or PKCS#1) for ECDSA P-256, ECDSA P-384 or RSA 2048-4096"
    )]
    CaKey(#[source] rcgen::Error),
    /// The CA key is of a kind meshlet does not sign with.
    #[error(
        "the CA key is {found}; meshlet signs with ECDSA P-256, ECDSA P-384 or RSA 2048-4096 \
         keys"
    )]
    UnsupportedCaKey {
        /// What the key is.
        found: String,
    },
    /// The CA key is not the key of the CA certificate.
    #[error(
        "CA key does not match the CA certificate {subject}: --ca-key must be the private key of \
         the first certificate in --ca-cert"
    )]
    KeyMismatch {
        /// The CA certificate's subject.
        subject: String,
    },
    /// A certificate of the CA chain may not issue certificates.
    #[error(
        "certificate {subject} in the CA chain is not a CA ({reason}); --ca-cert must hold the \
         signing CA certificate first, then its issuers up to the root"
    )]
    NotCa {
        /// The certificate's subject.
        subject: String,
        /// Why it is not a CA.
        reason: &'static str,
    },
    /// The CA chain is not in issuing order.
    #[error(
        "the CA chain is out of order: {subject} (certificate {position}) was not issued by the \
         certificate after it, {next}; list the CA certificate first, then each issuer in turn, \
         ending with the root"
    )]
    ChainOrder {
        /// The subject of the certificate whose issuer does not follow it.
        subject: String,
        /// Its 1-based position in the PEM input.
        position: usize,
        /// The subject of the certificate that follows it.
        next: String,
    },
    /// The CA chain does not end with a root.
    #[error(
        "the CA chain ends at {subject}, which is not a self-signed root: append the root \
         certificate (Istio's cert-chain.pem holds the CA certificate, its intermediates and the \
         root)"
    )]
    NoRoot {
        /// The subject of the last certificate.
        subject: String,
    },
    /// A certificate of the CA chain is expired or not valid yet.
    #[error(
        "CA certificate {subject} is valid from {not_before} to {not_after}, not now: rotate the \
         CA (or check the node's clock)"
    )]
    CaNotValid {
        /// The certificate's subject.
        subject: String,
        /// Its notBefore.
        not_before: String,
        /// Its notAfter.
        not_after: String,
    },
    /// The CA's subject cannot be written as the issuer of the certificates it signs.
    #[error(
        "the subject of CA certificate {subject} cannot be reproduced as the issuer of workload \
         certificates ({reason}); use a CA whose subject has one attribute of each type per RDN"
    )]
    UnsupportedCaName {
        /// The CA certificate's subject.
        subject: String,
        /// What cannot be reproduced.
        reason: String,
    },
    /// A probe certificate issued by the loaded CA did not verify against its root.
    #[error(
        "a certificate issued by this CA does not verify against the CA's root ({0}); check that \
         --ca-cert and --ca-key belong together and the chain is complete"
    )]
    SelfTest(#[source] rustls::Error),
    /// Signing a certificate failed.
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        /// The identity the certificate was for.
        identity: Identity,
        /// The signer's error.
        source: rcgen::Error,
    },
    /// The CA chain expires before the certificate would start.
    #[error(
        "cannot issue a certificate for {identity}: the CA chain expires at {ca_not_after}; \
         rotate the CA"
    )]
    CaExpired {
        /// The identity the certificate was for.
        identity: Identity,
        /// The earliest notAfter in the CA chain.
        ca_not_after: String,
    },
    /// A certificate was requested for an identity of another trust domain.
    #[error("cannot issue a certificate for {identity}: this mesh's trust domain is {mesh}")]
    ForeignIdentity {
        /// The identity asked for.
        identity: Identity,
        /// The mesh's trust domain.
        mesh: String,
    },
    /// The peer's identity is in another trust domain.
    #[error("peer is in trust domain {peer}, this mesh is {mesh}")]
    ForeignTrustDomain {
        /// The peer's trust domain.
        peer: String,
        /// The mesh's trust domain.
        mesh: String,
    },
    /// The server is not the workload the client meant to reach.
    #[error("certificate for {presented} presented, expected {expected}")]
    WrongPeer {
        /// The identity in the server's certificate.
        presented: Identity,
        /// The destination workload's identity.
        expected: Identity,
    },
    /// The peer sent no certificate.
    #[error("the peer sent no certificate; mesh peers authenticate with workload certificates")]
    NoPeerCertificate,
    /// The peer's certificate carries no SPIFFE identity.
    #[error(
        "the peer certificate has no URI SAN (spiffe://...): it is not a mesh workload certificate"
    )]
    NoIdentity,
    /// The peer's certificate carries several URI SANs.
    #[error(
        "the peer certificate has {count} URI SANs; a workload certificate carries exactly one \
         SPIFFE identity"
    )]
    AmbiguousIdentity {
        /// How many URI SANs it has.
        count: usize,
    },
    /// rustls refused a configuration.
    #[error("building the TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// No certificate could be obtained for an identity (yet).
    #[error("no certificate for {identity}: {reason}")]
    Unavailable {
        /// The identity.
        identity: Identity,
        /// The last attempt's error.
        reason: String,
    },
    /// `--ca-address` is not usable.
    #[error("--ca-address {address:?}: {reason}")]
    CaAddress {
        /// The address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA trust bundle (`--ca-root`) cannot be used.
    #[error("the CA trust bundle {path}: {reason}")]
    TrustBundle {
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The service-account token (`--ca-token-path`) cannot be read.
    #[error("the CA token {path}: {reason}")]
    Token {
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Making a CSR failed.
    #[error("{0}")]
    Csr(String),
    /// The CA refused or could not be reached.
    #[error("the CA at {address} answered {code}: {message}")]
    CaRequest {
        /// The CA's address.
        address: String,
        /// The gRPC status code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The CA's answer is not a usable certificate.
    #[error("the CA's answer is not usable: {0}")]
    CaResponse(String),
    /// A file or directory of the CA state could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Only one of the development root's certificate and key is in the state directory.
    #[error(
        "found {present} but not {missing}: restore the missing file, or delete both to generate \
         a new development root (every workload certificate will change)"
    )]
    PartialState {
        /// The file that is there.
        present: std::path::PathBuf,
        /// The file that is missing.
        missing: std::path::PathBuf,
    },
}

impl Error {
    /// The identity error inside an error of a rustls handshake, if a mesh verifier refused the
    /// peer: e.g. [`Error::WrongPeer`] when the server is not the expected workload.
    pub fn from_tls(err: &rustls::Error) -> Option<&Self> {
        match err {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other
                .0
                .downcast_ref::<tls::Refused>()
                .map(|refused| &refused.0),
            _ => None,
        }
    }

    fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}

/// Formats a time as RFC 3339 (UTC, whole seconds), for messages and the admin API.
pub fn rfc3339(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time).replace_nanosecond(0);
    match time {
        Ok(time) => time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| format!("{time}")),
        Err(_) => "<unrepresentable time>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trip() {
        let input = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id = Identity::parse(input).unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), input);
        assert_eq!(input.parse::<Identity>().unwrap(), id);
        assert_eq!(
            Identity::new("cluster.local", "default", "bookinfo-productpage").unwrap(),
            id
        );
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{input}\""));
        assert_eq!(
            serde_json::from_str::<Identity>(&format!("\"{input}\"")).unwrap(),
            id
        );
    }

    #[test]
    fn identity_order_and_hash_follow_the_fields() {
        let a = Identity::parse("spiffe://cluster.local/ns/a/sa/z").unwrap();
        let b = Identity::parse("spiffe://cluster.local/ns/b/sa/a").unwrap();
        assert!(a < b);
        // By the fields, not by the string ('-' sorts before '/').
        let a_b = Identity::parse("spiffe://cluster.local/ns/a-b/sa/z").unwrap();
        assert!(a < a_b);
        let set: std::collections::HashSet<_> = [a.clone(), a.clone(), b.clone()].into();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn identity_rejects_malformed() {
        for (input, why) in [
            ("spiffe://cluster.local/ns/default", "its path is not"),
            ("spiffe://cluster.local/ns/default/sa", "path"),
            (
                "spiffe://cluster.local/ns/default/sa/",
                "service account is empty",
            ),
            ("spiffe://cluster.local/ns//sa/x", "namespace is empty"),
            ("spiffe://cluster.local/ns/default/sa/x/extra", "path"),
            ("spiffe://cluster.local/ns/default/sa/x/", "path"),
            ("spiffe://cluster.local/sa/x/ns/default", "path"),
            ("spiffe://cluster.local//ns/default/sa/x", "path"),
            ("https://cluster.local/ns/default/sa/x", "spiffe://"),
            ("SPIFFE://cluster.local/ns/default/sa/x", "spiffe://"),
            ("spiffe:///ns/default/sa/x", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/default/sa/x", "contains 'C'"),
            (
                "spiffe://cluster.local:8080/ns/default/sa/x",
                "contains ':'",
            ),
            (
                "spiffe://user@cluster.local/ns/default/sa/x",
                "contains '@'",
            ),
            ("spiffe://cluster.local/ns/default/sa/x?y", "contains '?'"),
            ("spiffe://cluster.local/ns/default/sa/x%41", "contains '%'"),
            ("spiffe://cluster.local/ns/../sa/x", "namespace is \"..\""),
            ("spiffe://cluster.local", "no path"),
            ("", "spiffe://"),
        ] {
            let err = Identity::parse(input).expect_err(input);
            let message = err.to_string();
            assert!(
                matches!(err, Error::InvalidIdentity { .. }),
                "{input}: {message}"
            );
            assert!(message.contains(why), "{input}: {message} (wanted {why:?})");
            assert!(message.contains(&format!("{input:?}")), "{message}");
        }
        let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(2048));
        assert!(Identity::parse(&long).is_err());
        assert!(Identity::new("cluster.local", "ns", "a/b").is_err());
    }

    #[test]
    fn rfc3339_formats_utc_seconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(86_400_500);
        assert_eq!(rfc3339(t), "1970-01-02T00:00:00Z");
    }
}
