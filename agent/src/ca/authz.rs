//! What a caller may be issued: the checks on the request itself (SANs, trust domain,
//! metadata, validity) and on who asks. Whether a pod of the identity is on the caller's node
//! is [`super::pods`]'s part.

use std::time::Duration;

use super::{
    authn::Caller,
    refusal::{Reason, Refusal},
};
use crate::{
    identity::{Identity, csr::Csr},
    proto::IstioCertificateRequest,
};

/// A `namespace/name` service account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::str::FromStr for Account {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not <namespace>/<service-account>")),
        }
    }
}

/// The identity a request asks for: the CSR's one SPIFFE URI SAN, in `trust_domain`, which the
/// `ImpersonatedIdentity` metadata (when present) must repeat.
pub fn requested_identity(
    request: &IstioCertificateRequest,
    csr: &Csr,
    trust_domain: &str,
) -> Result<Identity, Refusal> {
    if !csr.other_sans().is_empty() {
        return Err(Refusal::new(
            Reason::BadSans,
            format!(
                "the CSR asks for SANs other than a SPIFFE ID ({}); only the identity is signed",
                csr.other_sans().join(", ")
            ),
        ));
    }
    let [uri] = csr.uris() else {
        return Err(Refusal::new(
            Reason::BadSans,
            format!(
                "the CSR has {} URI SANs; exactly one SPIFFE ID is signed",
                csr.uris().len()
            ),
        ));
    };
    let identity =
        Identity::parse(uri).map_err(|err| Refusal::new(Reason::BadSans, err.to_string()))?;
    if identity.trust_domain() != trust_domain {
        return Err(Refusal::new(
            Reason::ForeignTrustDomain,
            format!("{identity} is not in this mesh's trust domain, {trust_domain}"),
        ));
    }
    match request.impersonated_identity() {
        None => {}
        Some(Err(())) => {
            return Err(Refusal::new(
                Reason::IdentityMismatch,
                "the ImpersonatedIdentity metadata is not a string",
            ));
        }
        Some(Ok(named)) if named != uri => {
            return Err(Refusal::new(
                Reason::IdentityMismatch,
                format!("the metadata asks for {named:?} but the CSR is for {uri}"),
            ));
        }
        Some(Ok(_)) => {}
    }
    Ok(identity)
}

/// How long the certificate will be valid: what was asked (0: the cap), at most `cap`.
pub fn validity(requested_seconds: i64, cap: Duration) -> Result<Duration, Refusal> {
    match u64::try_from(requested_seconds) {
        Ok(0) => Ok(cap),
        Ok(seconds) if Duration::from_secs(seconds) <= cap => Ok(Duration::from_secs(seconds)),
        _ => Err(Refusal::new(
            Reason::Validity,
            format!(
                "a validity of {requested_seconds} s was asked for; the most this CA signs is {} s",
                cap.as_secs()
            ),
        )),
    }
}

/// Whether `caller` may ask for `identity` at all: its own identity, or any identity if it is
/// one of `node_agents` (which then still needs a pod of that identity on its node).
pub fn may_request(
    caller: &Caller,
    identity: &Identity,
    node_agents: &[Account],
) -> Result<(), Refusal> {
    let own = identity.namespace() == caller.namespace
        && identity.service_account() == caller.service_account;
    let agent = node_agents
        .iter()
        .any(|a| a.namespace == caller.namespace && a.name == caller.service_account);
    if own || agent {
        Ok(())
    } else {
        Err(Refusal::new(
            Reason::NotNodeAgent,
            format!(
                "{} asks for {identity}, and only node agents ({}) may ask for identities other \
                 than their own",
                caller.account(),
                node_agents
                    .iter()
                    .map(|a| format!("{}/{}", a.namespace, a.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

    use super::*;

    fn csr(uris: &[&str], dns: &[&str]) -> Csr {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(Ia5String::try_from(*uri).unwrap()));
        }
        Csr::parse_pem(&params.serialize_request(&key).unwrap().pem().unwrap()).unwrap()
    }

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn reason(result: Result<Identity, Refusal>) -> Reason {
        result.unwrap_err().reason
    }

    #[test]
    fn the_csr_must_name_exactly_one_identity_of_the_mesh() {
        let plain = IstioCertificateRequest::default();
        assert_eq!(
            requested_identity(&plain, &csr(&[WEB], &[]), "cluster.local")
                .unwrap()
                .to_string(),
            WEB
        );
        let two = csr(&[WEB, "spiffe://cluster.local/ns/default/sa/db"], &[]);
        assert_eq!(
            reason(requested_identity(&plain, &two, "cluster.local")),
            Reason::BadSans
        );
        let dns = csr(&[WEB], &["web.default.svc"]);
        assert_eq!(
            reason(requested_identity(&plain, &dns, "cluster.local")),
            Reason::BadSans
        );
        let none = csr(&[], &[]);
        assert_eq!(
            reason(requested_identity(&plain, &none, "cluster.local")),
            Reason::BadSans
        );
        let not_spiffe = csr(&["https://example.com/"], &[]);
        assert_eq!(
            reason(requested_identity(&plain, &not_spiffe, "cluster.local")),
            Reason::BadSans
        );
        let foreign = csr(&["spiffe://other.domain/ns/default/sa/web"], &[]);
        assert_eq!(
            reason(requested_identity(&plain, &foreign, "cluster.local")),
            Reason::ForeignTrustDomain
        );
    }

    #[test]
    fn the_metadata_must_repeat_the_csr() {
        let web = csr(&[WEB], &[]);
        let same = IstioCertificateRequest {
            metadata: Some(IstioCertificateRequest::impersonating(WEB)),
            ..Default::default()
        };
        assert!(requested_identity(&same, &web, "cluster.local").is_ok());
        let other = IstioCertificateRequest {
            metadata: Some(IstioCertificateRequest::impersonating(
                "spiffe://cluster.local/ns/kube-system/sa/admin",
            )),
            ..Default::default()
        };
        assert_eq!(
            reason(requested_identity(&other, &web, "cluster.local")),
            Reason::IdentityMismatch
        );
    }

    #[test]
    fn validity_is_capped() {
        let day = Duration::from_secs(86400);
        assert_eq!(validity(0, day).unwrap(), day);
        assert_eq!(validity(3600, day).unwrap(), Duration::from_secs(3600));
        assert_eq!(validity(86400, day).unwrap(), day);
        assert_eq!(validity(86401, day).unwrap_err().reason, Reason::Validity);
        assert_eq!(validity(-1, day).unwrap_err().reason, Reason::Validity);
    }

    #[test]
    fn only_node_agents_ask_for_others() {
        let agents = vec!["meshlet-system/meshlet".parse::<Account>().unwrap()];
        let web = Identity::parse(WEB).unwrap();
        let caller = |ns: &str, sa: &str| Caller {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            node: None,
            pod: None,
        };
        assert!(may_request(&caller("meshlet-system", "meshlet"), &web, &agents).is_ok());
        assert!(may_request(&caller("default", "web"), &web, &agents).is_ok());
        assert_eq!(
            may_request(&caller("default", "db"), &web, &agents)
                .unwrap_err()
                .reason,
            Reason::NotNodeAgent
        );
        assert!("nope".parse::<Account>().is_err());
        assert!("a/b/c".parse::<Account>().is_err());
    }
}
