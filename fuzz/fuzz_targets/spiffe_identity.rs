//! Reading a peer's SPIFFE identity: `identity::peer_identity` on arbitrary DER (the HBONE
//! server calls it on every client certificate chain that verified) and `Identity::parse` on
//! arbitrary text (URI SANs, policy principals, command-line flags).
//!
//! Never panic; an identity that is accepted prints as a SPIFFE ID that parses back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlet::identity::{Identity, peer_identity};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    // The whole input as one certificate.
    if let Ok(identity) = peer_identity(&[CertificateDer::from(data)]) {
        round_trips(&identity);
    }
    // A two-certificate chain: the first byte says where to split the rest.
    if let Some((&at, rest)) = data.split_first() {
        let (leaf, issuer) = rest.split_at(usize::from(at) * rest.len() / 256);
        let chain = [CertificateDer::from(leaf), CertificateDer::from(issuer)];
        if let Ok(identity) = peer_identity(&chain) {
            round_trips(&identity);
        }
    }
    // The input as text.
    let text = String::from_utf8_lossy(data);
    if let Ok(identity) = Identity::parse(&text) {
        round_trips(&identity);
        assert_eq!(identity.to_string(), text, "parsing is exact");
    }
});

/// Asserts that an accepted identity prints as a SPIFFE ID that parses back to itself, and
/// that its parts make it again.
fn round_trips(identity: &Identity) {
    let printed = identity.to_string();
    let parsed = Identity::parse(&printed)
        .unwrap_or_else(|err| panic!("{printed:?} was accepted but does not parse: {err}"));
    assert_eq!(&parsed, identity);
    let rebuilt = Identity::new(
        identity.trust_domain(),
        identity.namespace(),
        identity.service_account(),
    )
    .unwrap_or_else(|err| panic!("{printed:?}: its parts are refused: {err}"));
    assert_eq!(&rebuilt, identity);
}
