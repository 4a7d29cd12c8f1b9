//! Certificate signing requests.
//!
//! The agent asks a CA for a workload certificate with a CSR for a key it made and keeps
//! ([`request`]); the CA accepts a CSR only after [`Csr::parse_pem`] has checked it: well-formed
//! PKCS#10, a signature made by the key it carries (proof of possession), and a key meshlet
//! issues for. What the CSR asks for beyond its key and SANs is never copied into a certificate
//! ([`super::Ca::sign`] writes its own profile).

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::{
    certification_request::X509CertificationRequest, extensions::GeneralName,
    extensions::ParsedExtension, prelude::FromDer as _, public_key::PublicKey,
};

use super::Identity;

/// The longest CSR accepted, in PEM bytes: an RSA 4096 CSR is under 2 KiB.
pub const MAX_CSR_PEM: usize = 16 * 1024;

/// A fresh workload key and a CSR for it, naming `identity` as the only (URI) SAN.
#[derive(Debug)]
pub struct Request {
    /// The PEM CSR to send.
    pub pem: String,
    /// The key, to pair with the certificate that comes back (PKCS#8). Never leaves memory.
    pub key: PrivateKeyDer<'static>,
    /// The raw public key, to check the certificate that comes back is for this key.
    pub public_key: Vec<u8>,
}

/// Makes an ECDSA P-256 key and a CSR for `identity` (empty subject, the SPIFFE ID as the only
/// SAN), as ztunnel does.
pub fn request(identity: &Identity) -> Result<Request, CsrError> {
    let failed = |err: rcgen::Error| CsrError::Build(err.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(identity.to_string()).map_err(failed)?,
    )];
    let csr = params.serialize_request(&key).map_err(failed)?;
    Ok(Request {
        pem: csr.pem().map_err(failed)?,
        public_key: key.public_key_raw().to_vec(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// A CSR whose signature verified, with what a CA decides on.
#[derive(Debug)]
pub struct Csr {
    uris: Vec<String>,
    others: Vec<String>,
    public_key: rcgen::SubjectPublicKeyInfo,
    key_kind: String,
}

impl Csr {
    /// Parses and checks a PEM CSR: one `CERTIFICATE REQUEST` block, valid PKCS#10 DER with
    /// nothing after it, signed by its own key, for an ECDSA P-256/P-384 or RSA 2048-4096 key.
    pub fn parse_pem(pem_text: &str) -> Result<Self, CsrError> {
        if pem_text.len() > MAX_CSR_PEM {
            return Err(CsrError::Malformed(format!(
                "it is {} bytes, more than {MAX_CSR_PEM}",
                pem_text.len()
            )));
        }
        let block = pem::parse(pem_text).map_err(|err| CsrError::Malformed(err.to_string()))?;
        if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
            return Err(CsrError::Malformed(format!(
                "its PEM block is {:?}, not CERTIFICATE REQUEST",
                block.tag()
            )));
        }
        let (rest, csr) = X509CertificationRequest::from_der(block.contents())
            .map_err(|err| CsrError::Malformed(err.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(
                "trailing data after the CSR".to_owned(),
            ));
        }
        csr.verify_signature()
            .map_err(|err| CsrError::Signature(err.to_string()))?;

        let spki = &csr.certification_request_info.subject_pki;
        let key_kind = match spki.parsed() {
            Ok(PublicKey::EC(point)) => match point.key_size() {
                size @ (256 | 384) => format!("ECDSA P-{size}"),
                size => return Err(CsrError::Key(format!("an ECDSA key of {size} bits"))),
            },
            Ok(PublicKey::RSA(rsa)) => match rsa.key_size() {
                bits @ 2048..=4096 => format!("RSA {bits}"),
                bits => return Err(CsrError::Key(format!("a {bits}-bit RSA key"))),
            },
            Ok(_) => return Err(CsrError::Key(format!("a {} key", spki.algorithm.algorithm))),
            Err(err) => return Err(CsrError::Key(format!("an unreadable key ({err})"))),
        };
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|err| CsrError::Key(format!("{key_kind} rcgen cannot use ({err})")))?;

        let mut uris = Vec::new();
        let mut others = Vec::new();
        for extension in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = extension {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                        other => others.push(other.to_string()),
                    }
                }
            }
        }
        Ok(Self {
            uris,
            others,
            public_key,
            key_kind,
        })
    }

    /// The URI SANs asked for.
    pub fn uris(&self) -> &[String] {
        &self.uris
    }

    /// Every other SAN asked for (DNS names, IP addresses, emails...), described.
    pub fn other_sans(&self) -> &[String] {
        &self.others
    }

    /// The key to certify.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }

    /// What the key is, e.g. `ECDSA P-256`.
    pub fn key_kind(&self) -> &str {
        &self.key_kind
    }
}

/// Why a CSR was not accepted (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PKCS#10 CSR in PEM.
    #[error("the CSR is malformed: {0}")]
    Malformed(String),
    /// The signature does not verify with the CSR's own key.
    #[error("the CSR's signature does not verify with its key: {0}")]
    Signature(String),
    /// The key is of a kind meshlet does not certify.
    #[error("the CSR's key is {0}; meshlet certifies ECDSA P-256/P-384 and RSA 2048-4096 keys")]
    Key(String),
    /// Making a CSR failed.
    #[error("making a CSR failed: {0}")]
    Build(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    #[test]
    fn a_request_parses_back_with_its_identity_and_key() {
        let request = request(&id()).unwrap();
        let csr = Csr::parse_pem(&request.pem).unwrap();
        assert_eq!(csr.uris(), ["spiffe://cluster.local/ns/default/sa/web"]);
        assert!(csr.other_sans().is_empty());
        assert_eq!(csr.key_kind(), "ECDSA P-256");
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(csr.public_key()),
            request.public_key.as_slice()
        );
    }

    #[test]
    fn extra_sans_are_reported() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            Ia5String::try_from("spiffe://cluster.local/ns/default/sa/web").unwrap(),
        ));
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = Csr::parse_pem(&pem).unwrap();
        assert_eq!(csr.key_kind(), "ECDSA P-384");
        assert_eq!(csr.uris().len(), 1);
        assert_eq!(csr.other_sans().len(), 1, "{:?}", csr.other_sans());
        assert!(csr.other_sans()[0].contains("evil.example"));
    }

    #[test]
    fn a_tampered_csr_fails_its_signature() {
        let request = request(&id()).unwrap();
        let block = pem::parse(&request.pem).unwrap();
        let mut der = block.contents().to_vec();
        // Flip a byte of the SAN inside the signed part: the signature no longer matches.
        let at = der
            .windows(3)
            .position(|w| w == b"web")
            .expect("the SAN is in the DER");
        der[at] = b'W';
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(
            Csr::parse_pem(&tampered),
            Err(CsrError::Signature(_))
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        for input in [
            "",
            "not pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(
                matches!(Csr::parse_pem(input), Err(CsrError::Malformed(_))),
                "{input:?}"
            );
        }
        let huge = "A".repeat(MAX_CSR_PEM + 1);
        assert!(matches!(Csr::parse_pem(&huge), Err(CsrError::Malformed(_))));
    }

    #[test]
    fn ed25519_keys_are_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(
            matches!(Csr::parse_pem(&pem), Err(CsrError::Key(_))),
            "{:?}",
            Csr::parse_pem(&pem)
        );
    }
}
