//! The mesh CA: the signing certificate and key, loaded from PEM or generated for development,
//! and the workload certificates it issues.

use std::{
    fmt,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
    string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString},
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use tracing::{info, warn};
use x509_parser::{
    asn1_rs::Tag, certificate::X509Certificate, extensions::ParsedExtension, public_key::PublicKey,
    time::ASN1Time, x509::X509Name,
};

use super::{Error, Identity, check_trust_domain, rfc3339, tls};

/// How long a workload certificate is valid: 24 hours, as in Istio. It is renewed at half life.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How far before "now" a certificate's validity starts, to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// How long a generated development root is valid: ten years, like Istio's self-signed root.
const DEV_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Where [`Ca::load_or_generate`] keeps the development root, under the state directory.
const STATE_SUBDIR: &str = "ca";
const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";

/// The mesh CA: signs workload certificates.
///
/// It is either a root, or an intermediate whose chain up to the root is known. Certificates it
/// issues are sent with the intermediates (the CA's own certificate when it is not the root,
/// then the certificates above it) but never the root: peers must already hold it as their
/// trust anchor, so sending it would only add bytes to every handshake.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Whether the CA certificate has a subject key identifier to copy into issued
    /// certificates' authority key identifier.
    has_key_id: bool,
    /// The CA certificate and the intermediates above it, without the root.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    roots: Arc<RootCertStore>,
    /// The earliest notAfter of the chain: no certificate outlives it.
    not_after: SystemTime,
    subject: String,
    key_kind: String,
}

impl Ca {
    /// Loads a CA from PEM.
    ///
    /// `cert_chain_pem` holds the signing CA certificate first, then each certificate above it
    /// in issuing order, ending with the self-signed root: for a root CA that is just the root;
    /// for an intermediate it is Istio's `cert-chain.pem` (or `ca-cert.pem` followed by
    /// `root-cert.pem`). The root becomes the trust anchor; everything before it is sent after
    /// each issued certificate.
    ///
    /// `key_pem` is the CA certificate's unencrypted private key (PKCS#8, SEC1 or PKCS#1):
    /// ECDSA P-256, ECDSA P-384 or RSA 2048-4096 bits.
    ///
    /// The chain must be in order, made of CA certificates valid now, and the key must be the
    /// CA certificate's; a probe certificate is issued and verified against the root before the
    /// CA is accepted.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| Error::Pem {
                what: "the CA certificate chain",
                reason: err.to_string(),
            })?;
        if chain.is_empty() {
            return Err(Error::Pem {
                what: "the CA certificate chain",
                reason: "it holds no CERTIFICATE block".to_owned(),
            });
        }
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(i, der)| parse(der, || format!("certificate {} of the CA chain", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;

        let now = SystemTime::now();
        for (i, cert) in parsed.iter().enumerate() {
            check_ca(cert)?;
            let not_before = asn1_time(cert.validity().not_before);
            let not_after = asn1_time(cert.validity().not_after);
            if now < not_before || now > not_after {
                return Err(Error::CaNotValid {
                    subject: subject(cert),
                    not_before: rfc3339(not_before),
                    not_after: rfc3339(not_after),
                });
            }
            if let Some(next) = parsed.get(i + 1)
                && cert.issuer().as_raw() != next.subject().as_raw()
            {
                return Err(Error::ChainOrder {
                    subject: subject(cert),
                    position: i + 1,
                    next: subject(next),
                });
            }
        }
        let last = parsed.last().expect("the chain is not empty");
        if last.issuer().as_raw() != last.subject().as_raw() {
            return Err(Error::NoRoot {
                subject: subject(last),
            });
        }
        let not_after = parsed
            .iter()
            .map(|cert| asn1_time(cert.validity().not_after))
            .min()
            .expect("the chain is not empty");

        let ca_cert = &parsed[0];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| Error::Pem {
            what: "the CA key",
            reason: format!("{err}; it must hold one unencrypted PRIVATE KEY block"),
        })?;
        let key = KeyPair::try_from(&key).map_err(Error::CaKey)?;
        if key.public_key_raw() != ca_cert.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch {
                subject: subject(ca_cert),
            });
        }
        let key_kind = key_kind(&key, ca_cert)?;

        let distinguished_name =
            distinguished_name(ca_cert.subject()).map_err(|reason| Error::UnsupportedCaName {
                subject: subject(ca_cert),
                reason,
            })?;
        let key_id = ca_cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name;
        params.key_identifier_method =
            KeyIdMethod::PreSpecified(key_id.clone().unwrap_or_default());
        let issuer = Issuer::new(params, key);

        let root = chain.last().expect("the chain is not empty").clone();
        let mut roots = RootCertStore::empty();
        roots.add(root.clone()).map_err(|err| Error::Certificate {
            what: format!("the root certificate {}", subject(last)),
            reason: err.to_string(),
        })?;
        let ca = Self {
            issuer,
            has_key_id: key_id.is_some(),
            intermediates: chain[..chain.len() - 1].to_vec(),
            root,
            roots: Arc::new(roots),
            not_after,
            subject: subject(ca_cert),
            key_kind,
        };

        // A probe certificate proves the whole arrangement: the key signs what the certificate
        // says, the subject is reproduced byte for byte as the issuer (webpki matches names
        // exactly), and the chain verifies up to the root.
        let probe = Identity::new("meshlet.invalid", "meshlet", "ca-self-test")?;
        let certified = ca.issue(&probe, now, Duration::from_secs(5 * 60))?;
        let leaf = parse(certified.leaf(), || "the probe certificate".to_owned())?;
        if leaf.issuer().as_raw() != ca_cert.subject().as_raw() {
            return Err(Error::UnsupportedCaName {
                subject: ca.subject.clone(),
                reason: "its encoding cannot be reproduced exactly".to_owned(),
            });
        }
        tls::verify_chain(certified.chain(), &ca.roots, now).map_err(Error::SelfTest)?;
        Ok(ca)
    }

    /// Creates a self-signed ECDSA P-256 root for `trust_domain`, for development and demos.
    ///
    /// Nothing else trusts it, and it lives only as long as this value: see
    /// [`Ca::load_or_generate`] to keep one across restarts.
    pub fn generate_dev(trust_domain: &str) -> Result<Self, Error> {
        let (cert_pem, key_pem) = dev_root_pem(trust_domain, SystemTime::now())?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Loads the development root from `<state_dir>/ca/root-cert.pem` and `root-key.pem`, or
    /// generates one there (key file mode 0600) if neither exists.
    ///
    /// Either way it logs a warning: a generated root's key sits unencrypted on the node and no
    /// other cluster trusts it. Production meshes pass `--ca-cert` and `--ca-key` instead.
    pub fn load_or_generate(state_dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let dir = state_dir.join(STATE_SUBDIR);
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_exists = cert_path
            .try_exists()
            .map_err(Error::io("inspect", &cert_path))?;
        let key_exists = key_path
            .try_exists()
            .map_err(Error::io("inspect", &key_path))?;
        match (cert_exists, key_exists) {
            (true, true) => {
                let cert_pem =
                    fs::read_to_string(&cert_path).map_err(Error::io("read", &cert_path))?;
                let key_pem =
                    fs::read_to_string(&key_path).map_err(Error::io("read", &key_path))?;
                let mode = fs::metadata(&key_path)
                    .map_err(Error::io("inspect", &key_path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    warn!(
                        path = %key_path.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "the development root key is readable by other users: chmod 600 it"
                    );
                }
                let ca = Self::from_pem(&cert_pem, &key_pem)?;
                warn!(
                    dir = %dir.display(),
                    subject = %ca.subject,
                    not_after = %rfc3339(ca.not_after),
                    "USING A DEVELOPMENT ROOT CA generated by meshlet: its key is stored \
                     unencrypted on this node and no other mesh trusts it; pass --ca-cert and \
                     --ca-key outside development"
                );
                Ok(ca)
            }
            (false, false) => {
                let (cert_pem, key_pem) = dev_root_pem(trust_domain, SystemTime::now())?;
                let ca = Self::from_pem(&cert_pem, &key_pem)?;
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(Error::io("create", &dir))?;
                // The key first: a crash between the two leaves a key without a certificate,
                // which the next start reports instead of silently generating another root.
                write_file(&key_path, key_pem.as_bytes(), 0o600)?;
                write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
                sync_dir(&dir)?;
                warn!(
                    dir = %dir.display(),
                    subject = %ca.subject,
                    not_after = %rfc3339(ca.not_after),
                    "GENERATED A DEVELOPMENT ROOT CA: its key is stored unencrypted on this node \
                     and no other mesh trusts it; pass --ca-cert and --ca-key outside development"
                );
                Ok(ca)
            }
            (true, false) => Err(Error::PartialState {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(Error::PartialState {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    /// Issues a workload certificate for `identity`, valid from a minute before `now` until
    /// `now + lifetime` (or until the CA chain expires, if that is sooner), with a fresh ECDSA
    /// P-256 key: the local path, where the node holds the CA (`--ca-cert`, development).
    pub fn issue(
        &self,
        identity: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Certified, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            Error::Issue {
                identity: identity.clone(),
                source,
            }
        })?;
        let signed = self.sign(identity, &key, now, lifetime)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Certified::new(
            identity.clone(),
            signed.chain,
            key,
            signed.not_before,
            signed.not_after,
            signed.serial,
        )
    }

    /// Signs a workload certificate for `identity` binding `public_key` (the key of a verified
    /// CSR, or a key just generated), valid from a minute before `now` until `now + lifetime`
    /// (or until the CA chain expires, if that is sooner).
    ///
    /// The certificate is X.509 v3 with an empty subject, the SPIFFE ID as its only (critical)
    /// subject alternative name, key usage digitalSignature (plus keyEncipherment for an RSA
    /// key), extended key usage serverAuth and clientAuth, basicConstraints CA:false, and a
    /// random 128-bit serial number. Nothing else from a CSR is copied.
    pub fn sign(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Signed, Error> {
        let signing = |source| Error::Issue {
            identity: identity.clone(),
            source,
        };
        // Backdated for clock skew between nodes, by at most a tenth of the lifetime so that
        // short-lived certificates still renew at (close to) half their remaining life.
        let backdate = BACKDATE.min(lifetime / 10);
        let not_before = whole_seconds(now.checked_sub(backdate).unwrap_or(UNIX_EPOCH));
        let not_after = whole_seconds(now + lifetime).min(self.not_after);
        if not_after <= now {
            return Err(Error::CaExpired {
                identity: identity.clone(),
                ca_not_after: rfc3339(self.not_after),
            });
        }
        let serial = random_serial()?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(identity.to_string()).map_err(signing)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // keyEncipherment only matters for RSA key transport (Istio sets it for RSA keys).
        if public_key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = self.has_key_id;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));

        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(signing)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(Signed {
            chain,
            not_before,
            not_after,
            serial: hex(&serial),
        })
    }

    /// Issues a TLS server certificate for `names` (DNS names or IP addresses) with a fresh
    /// ECDSA P-256 key, valid like [`Ca::sign`]'s: the certificate `meshlet ca` serves its API
    /// with, which clients verify against the mesh root (as istiod's serving certificate).
    /// Returns the chain (without the root) and the key.
    pub fn issue_server(
        &self,
        names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        let failed = |reason: String| Error::Pem {
            what: "the CA's serving certificate",
            reason,
        };
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|err| failed(err.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = self.has_key_id;
        params.not_before = whole_seconds(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH)).into();
        params.not_after = whole_seconds(now + lifetime).min(self.not_after).into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|err| failed(err.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|err| failed(err.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// The full chain of a signed certificate as Istio's CA API returns it: PEM, the
    /// certificate first, then the intermediates, then the root.
    pub fn chain_pem(&self, signed: &Signed) -> Vec<String> {
        signed
            .chain
            .iter()
            .chain(std::iter::once(&self.root))
            .map(|der| pem_certificate(der))
            .collect()
    }

    /// The trust anchors of the mesh: the root of the CA chain.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The certificates sent after each workload certificate: the CA certificate and the
    /// intermediates above it, never the root. Empty when the CA is the root.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// When the first certificate of the CA chain expires; issued certificates end by then.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA certificate's subject, e.g. `O=cluster.local`.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("key", &self.key_kind)
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// A certificate [`Ca::sign`] made: no private key, which stays with whoever asked.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The certificate followed by the CA's intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// When it becomes valid.
    pub not_before: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
    /// Its serial number, lowercase hexadecimal.
    pub serial: String,
}

/// A workload certificate with its private key.
///
/// The chain is the certificate followed by the CA's intermediates (never the root). The key is
/// kept in memory only.
pub struct Certified {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    certified_key: Arc<CertifiedKey>,
}

impl Certified {
    pub(super) fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        not_before: SystemTime,
        not_after: SystemTime,
        serial: String,
    ) -> Result<Self, Error> {
        let signing_key = tls::provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(Error::Tls)?;
        let certified_key = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
        Ok(Self {
            identity,
            chain,
            key,
            not_before,
            not_after,
            serial,
            certified_key,
        })
    }

    /// The identity the certificate is for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The workload certificate followed by the CA's intermediates, as sent in handshakes.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The workload certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The private key (PKCS#8).
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// When the certificate becomes valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the certificate should be replaced: at half its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    /// Whether the certificate is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The serial number, in lowercase hexadecimal.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain and signing key, as rustls uses them.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }
}

impl fmt::Debug for Certified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certified")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A self-signed ECDSA P-256 development root for `trust_domain`, as (certificate PEM, key PEM).
fn dev_root_pem(trust_domain: &str, now: SystemTime) -> Result<(String, String), Error> {
    root_pem(trust_domain, "meshlet development root CA", now)
}

/// A new self-signed ECDSA P-256 root CA for `trust_domain`, valid ten years, as (certificate
/// PEM, key PEM): what `meshlet ca` creates once when it is given no `cacerts`.
pub fn generate_root_pem(trust_domain: &str) -> Result<(String, String), Error> {
    root_pem(trust_domain, "meshlet root CA", SystemTime::now())
}

fn root_pem(
    trust_domain: &str,
    common_name: &str,
    now: SystemTime,
) -> Result<(String, String), Error> {
    check_trust_domain(trust_domain).map_err(Error::InvalidTrustDomain)?;
    let generating = |err: rcgen::Error| Error::Pem {
        what: "generating a root CA",
        reason: err.to_string(),
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generating)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    // Istio's self-signed root is named after the trust domain the same way.
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = whole_seconds(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH)).into();
    params.not_after = whole_seconds(now + DEV_ROOT_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let cert = params.self_signed(&key).map_err(generating)?;
    info!(trust_domain, common_name, "generated a root CA");
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks that a certificate of the CA chain may issue certificates.
fn check_ca(cert: &X509Certificate<'_>) -> Result<(), Error> {
    let bad = |err: x509_parser::error::X509Error| Error::Certificate {
        what: format!("CA certificate {}", subject(cert)),
        reason: err.to_string(),
    };
    match cert.basic_constraints().map_err(bad)? {
        Some(constraints) if constraints.value.ca => {}
        _ => {
            return Err(Error::NotCa {
                subject: subject(cert),
                reason: "it lacks basicConstraints CA:true",
            });
        }
    }
    if let Some(usage) = cert.key_usage().map_err(bad)?
        && !usage.value.key_cert_sign()
    {
        return Err(Error::NotCa {
            subject: subject(cert),
            reason: "its key usage lacks keyCertSign",
        });
    }
    Ok(())
}

/// Names the CA key and checks it is one meshlet signs with.
fn key_kind(key: &KeyPair, cert: &X509Certificate<'_>) -> Result<String, Error> {
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Ok("ECDSA P-256".to_owned());
    }
    if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Ok("ECDSA P-384".to_owned());
    }
    if alg == &rcgen::PKCS_RSA_SHA256 {
        let bits = match cert.public_key().parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => 0,
        };
        return match bits {
            2048..=4096 => Ok(format!("RSA {bits}")),
            _ => Err(Error::UnsupportedCaKey {
                found: format!("a {bits}-bit RSA key"),
            }),
        };
    }
    let found = if alg == &rcgen::PKCS_ED25519 {
        "an Ed25519 key"
    } else if alg == &rcgen::PKCS_ECDSA_P521_SHA512 {
        "an ECDSA P-521 key"
    } else {
        "of an unsupported kind"
    };
    Err(Error::UnsupportedCaKey {
        found: found.to_owned(),
    })
}

/// The size in bits of an RSA modulus given as a big-endian integer.
fn rsa_bits(modulus: &[u8]) -> usize {
    let first = modulus
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(modulus.len());
    match modulus.get(first) {
        Some(top) => (modulus.len() - first) * 8 - top.leading_zeros() as usize,
        None => 0,
    }
}

/// Copies a certificate's subject into a name rcgen writes as the issuer of the certificates it
/// signs. rcgen has no multi-valued RDNs and keeps one value per attribute type, so those are
/// refused rather than silently changed (webpki would then fail to chain every certificate).
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in name.iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err("it has a multi-valued RDN".to_owned());
        };
        let oid: Vec<u64> = attribute
            .attr_type()
            .iter()
            .ok_or("an attribute type is not a valid OID")?
            .collect();
        let ty = DnType::from_oid(&oid);
        if seen.contains(&ty) {
            return Err(format!("attribute {} appears twice", attribute.attr_type()));
        }
        let value = attribute.attr_value();
        let data = value.data;
        let text = || {
            std::str::from_utf8(data)
                .map(str::to_owned)
                .map_err(|_| format!("attribute {} is not valid text", attribute.attr_type()))
        };
        let invalid = |err: rcgen::Error| format!("attribute {}: {err}", attribute.attr_type());
        let value = match value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?),
            Tag::PrintableString => {
                DnValue::PrintableString(PrintableString::try_from(text()?).map_err(invalid)?)
            }
            Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text()?).map_err(invalid)?),
            Tag::T61String => {
                DnValue::TeletexString(TeletexString::try_from(text()?).map_err(invalid)?)
            }
            Tag::BmpString => {
                DnValue::BmpString(BmpString::from_utf16be(data.to_vec()).map_err(invalid)?)
            }
            Tag::UniversalString => DnValue::UniversalString(
                UniversalString::from_utf32be(data.to_vec()).map_err(invalid)?,
            ),
            other => {
                return Err(format!(
                    "attribute {} has ASN.1 type {other:?}",
                    attribute.attr_type()
                ));
            }
        };
        seen.push(ty.clone());
        dn.push(ty, value);
    }
    Ok(dn)
}

/// Parses a DER certificate, naming it in the error.
pub(super) fn parse<'a>(
    der: &'a CertificateDer<'_>,
    what: impl FnOnce() -> String,
) -> Result<X509Certificate<'a>, Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::Certificate {
            what: what(),
            reason: "trailing data after the certificate".to_owned(),
        }),
        Err(err) => Err(Error::Certificate {
            what: what(),
            reason: err.to_string(),
        }),
    }
}

fn subject(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject().to_string();
    if subject.is_empty() {
        "<empty subject>".to_owned()
    } else {
        subject
    }
}

fn asn1_time(time: ASN1Time) -> SystemTime {
    let seconds = time.timestamp();
    match u64::try_from(seconds) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}

/// Truncates to whole seconds, the resolution of X.509 validity.
fn whole_seconds(time: SystemTime) -> SystemTime {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => UNIX_EPOCH + Duration::from_secs(since.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

/// 16 random bytes, positive and always 16 bytes long as a DER INTEGER (126 random bits).
fn random_serial() -> Result<[u8; 16], Error> {
    let mut serial = [0u8; 16];
    tls::provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| Error::Tls(rustls::Error::FailedToGetRandomBytes))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// One certificate as a PEM block.
pub(super) fn pem_certificate(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file atomically (temporary file, fsync, rename) with the given mode.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("pem.tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(Error::io("remove", &tmp)(err)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(Error::io("create", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(Error::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename into place", path))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(Error::io("sync", dir))
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::PathBuf;

    use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, RsaKeySize};
    use rustls::pki_types::pem::PemObject;
    use x509_parser::{extensions::GeneralName, oid_registry, x509::X509Version};

    use super::*;

    /// A CA certificate and key in PEM, made outside [`Ca`] as an operator's would be.
    pub(crate) struct TestCa {
        pub cert_pem: String,
        pub key_pem: String,
        pub key: KeyPair,
        pub params: CertificateParams,
    }

    impl TestCa {
        /// A root with `key` and a subject like Istio's (`O=<org>`).
        pub(crate) fn root(key: KeyPair, org: &str) -> Self {
            let params = ca_params(org);
            let cert = params.self_signed(&key).unwrap();
            Self {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                key,
                params,
            }
        }

        /// An intermediate CA signed by `self`.
        pub(crate) fn intermediate(&self, key: KeyPair, org: &str) -> Self {
            let mut params = ca_params(org);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.use_authority_key_identifier_extension = true;
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).unwrap();
            Self {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                key,
                params,
            }
        }

        pub(crate) fn ca(&self) -> Ca {
            Ca::from_pem(&self.cert_pem, &self.key_pem).unwrap()
        }
    }

    fn ca_params(org: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::OrganizationName,
            DnValue::PrintableString(org.try_into().unwrap()),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
        params
    }

    pub(crate) fn p256() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    pub(crate) fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    /// A directory under the system temporary directory, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let path = std::env::temp_dir().join(format!(
                "meshlet-identity-{name}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn verify(certified: &Certified, ca: &Ca) {
        tls::verify_chain(certified.chain(), &ca.roots(), SystemTime::now())
            .unwrap_or_else(|err| panic!("{} does not verify: {err}", certified.identity()));
    }

    #[test]
    fn leaf_profile() {
        let ca = TestCa::root(p256(), "cluster.local").ca();
        let identity = id("spiffe://cluster.local/ns/default/sa/reviews");
        let now = UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let certified = ca.issue(&identity, now, DEFAULT_LIFETIME).unwrap();

        assert_eq!(
            certified.chain().len(),
            1,
            "the chain of a root CA's leaf is the leaf"
        );
        assert_ne!(certified.leaf(), ca.root(), "the root is never sent");
        let cert = parse(certified.leaf(), || "leaf".to_owned()).unwrap();
        assert_eq!(cert.version(), X509Version::V3);
        assert_eq!(cert.subject().iter().count(), 0, "empty subject");
        assert_eq!(
            cert.issuer().as_raw(),
            parse(ca.root(), String::new).unwrap().subject().as_raw()
        );

        let san = cert.subject_alternative_name().unwrap().expect("a SAN");
        assert!(
            san.critical,
            "the SAN of a certificate with an empty subject is critical"
        );
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/reviews"
            )]
        );

        let eku = cert.extended_key_usage().unwrap().expect("an EKU").value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && !eku.email_protection && eku.other.is_empty());
        assert!(!eku.time_stamping && !eku.ocsp_signing);

        let usage = cert.key_usage().unwrap().expect("a key usage").value;
        assert!(usage.digital_signature());
        assert_eq!(usage.flags, 1, "digitalSignature only: {usage:?}");

        let constraints = cert
            .basic_constraints()
            .unwrap()
            .expect("basic constraints");
        assert!(!constraints.value.ca);
        assert!(constraints.critical);

        let spki = cert.public_key();
        assert_eq!(
            spki.algorithm.algorithm,
            oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            oid_registry::OID_EC_P256
        );

        let not_before = asn1_time(cert.validity().not_before);
        let not_after = asn1_time(cert.validity().not_after);
        assert_eq!(not_before, now - Duration::from_secs(60));
        assert_eq!(not_after, now + Duration::from_secs(24 * 3600));
        assert_eq!(certified.not_before(), not_before);
        assert_eq!(certified.not_after(), not_after);
        assert_eq!(
            certified.renew_at(),
            not_before + (not_after.duration_since(not_before).unwrap() / 2)
        );
        assert_eq!(certified.serial(), hex(cert.raw_serial()));
        assert_eq!(cert.raw_serial().len(), 16);
        verify(&certified, &ca);

        // A fresh key and serial for every certificate.
        let again = ca.issue(&identity, now, DEFAULT_LIFETIME).unwrap();
        assert_ne!(again.serial(), certified.serial());
        let again_cert = parse(again.leaf(), String::new).unwrap();
        assert_ne!(again_cert.public_key().raw, cert.public_key().raw);
        assert_ne!(
            again.private_key().secret_der(),
            certified.private_key().secret_der()
        );
    }

    #[test]
    fn intermediate_chain_is_leaf_and_intermediate() {
        let root = TestCa::root(
            KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
            "root",
        );
        let intermediate = root.intermediate(p256(), "cluster.local");
        let chain_pem = format!("{}{}", intermediate.cert_pem, root.cert_pem);
        let ca = Ca::from_pem(&chain_pem, &intermediate.key_pem).unwrap();

        let certified = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                SystemTime::now(),
                DEFAULT_LIFETIME,
            )
            .unwrap();
        assert_eq!(certified.chain().len(), 2);
        let intermediate_der =
            CertificateDer::from_pem_slice(intermediate.cert_pem.as_bytes()).unwrap();
        let root_der = CertificateDer::from_pem_slice(root.cert_pem.as_bytes()).unwrap();
        assert_eq!(certified.chain()[1], intermediate_der);
        assert!(
            !certified.chain().contains(&root_der),
            "the root is never sent"
        );
        assert_eq!(ca.root(), &root_der);
        assert_eq!(ca.intermediates(), &[intermediate_der]);
        let leaf = parse(certified.leaf(), String::new).unwrap();
        let intermediate_cert = parse(&certified.chain()[1], String::new).unwrap();
        assert_eq!(leaf.issuer().as_raw(), intermediate_cert.subject().as_raw());
        verify(&certified, &ca);

        // The intermediate alone is not enough: the root must come with it.
        let err = Ca::from_pem(&intermediate.cert_pem, &intermediate.key_pem).unwrap_err();
        assert!(matches!(err, Error::NoRoot { .. }), "{err}");
        assert!(err.to_string().contains("append the root"), "{err}");
        // Nor may the chain be out of order.
        let reversed = format!("{}{}", root.cert_pem, intermediate.cert_pem);
        let err = Ca::from_pem(&reversed, &root.key_pem).unwrap_err();
        assert!(matches!(err, Error::ChainOrder { .. }), "{err}");
    }

    #[test]
    fn ca_key_types() {
        let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
        for (name, key) in [
            ("P-256", p256()),
            (
                "P-384",
                KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
            ),
            ("RSA 2048", rsa),
        ] {
            let test_ca = TestCa::root(key, "cluster.local");
            let ca = test_ca.ca();
            assert!(format!("{ca:?}").contains(name), "{ca:?}");
            let certified = ca
                .issue(
                    &id("spiffe://cluster.local/ns/a/sa/b"),
                    SystemTime::now(),
                    DEFAULT_LIFETIME,
                )
                .unwrap();
            verify(&certified, &ca);
        }
    }

    #[test]
    fn ca_key_in_pkcs1_and_sec1_pem() {
        // Istio's ca-key.pem is usually "RSA PRIVATE KEY" (PKCS#1), and openssl writes
        // "EC PRIVATE KEY" (SEC1) with an "EC PARAMETERS" block first.
        let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
        let test_ca = TestCa::root(rsa, "cluster.local");
        let pkcs1 = pkcs8_inner(&test_ca.key.serialize_der());
        let key_pem = pem_block("RSA PRIVATE KEY", &pkcs1);
        let ca = Ca::from_pem(&test_ca.cert_pem, &key_pem).unwrap();
        verify(
            &ca.issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                SystemTime::now(),
                DEFAULT_LIFETIME,
            )
            .unwrap(),
            &ca,
        );

        let test_ca = TestCa::root(p256(), "cluster.local");
        let sec1 = pkcs8_inner(&test_ca.key.serialize_der());
        let key_pem = format!(
            "{}{}",
            pem_block(
                "EC PARAMETERS",
                &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
            ),
            pem_block("EC PRIVATE KEY", &sec1)
        );
        Ca::from_pem(&test_ca.cert_pem, &key_pem).unwrap();
    }

    /// The privateKey OCTET STRING of a PKCS#8 PrivateKeyInfo: PKCS#1 for RSA, SEC1 for EC.
    fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
        use x509_parser::der_parser::{ber::BerObjectContent, parse_der};
        let (_, info) = parse_der(pkcs8).unwrap();
        let BerObjectContent::Sequence(items) = info.content else {
            panic!("not a sequence")
        };
        let BerObjectContent::OctetString(inner) = items[2].content else {
            panic!("no privateKey")
        };
        inner.to_vec()
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        pem::encode(&pem::Pem::new(label, der))
    }

    #[test]
    fn mismatched_key_is_refused() {
        let test_ca = TestCa::root(p256(), "cluster.local");
        let other = TestCa::root(p256(), "cluster.local");
        let err = Ca::from_pem(&test_ca.cert_pem, &other.key_pem).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("CA key does not match the CA certificate O=cluster.local"),
            "{err}"
        );
        // A key of another type too.
        let p384 = TestCa::root(KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(), "x");
        let err = Ca::from_pem(&test_ca.cert_pem, &p384.key_pem).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn bad_ca_input_is_refused_clearly() {
        let test_ca = TestCa::root(p256(), "cluster.local");
        let err = Ca::from_pem("", &test_ca.key_pem).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        let err = Ca::from_pem(&test_ca.cert_pem, "").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Pem {
                    what: "the CA key",
                    ..
                }
            ),
            "{err}"
        );

        // A leaf is not a CA.
        let ca = test_ca.ca();
        let leaf = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                SystemTime::now(),
                DEFAULT_LIFETIME,
            )
            .unwrap();
        let leaf_pem = pem_block("CERTIFICATE", leaf.leaf());
        let PrivateKeyDer::Pkcs8(leaf_key) = leaf.private_key() else {
            panic!("PKCS#8")
        };
        let leaf_key_pem = pem_block("PRIVATE KEY", leaf_key.secret_pkcs8_der());
        let err =
            Ca::from_pem(&format!("{leaf_pem}{}", test_ca.cert_pem), &leaf_key_pem).unwrap_err();
        assert!(matches!(err, Error::NotCa { .. }), "{err}");

        // An expired CA.
        let mut params = ca_params("old");
        params.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
        params.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
        let key = p256();
        let cert = params.self_signed(&key).unwrap();
        let err = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, Error::CaNotValid { .. }), "{err}");

        // A subject rcgen cannot write back as an issuer.
        let key = p256();
        let mut cert_der = ca_params("x").self_signed(&key).unwrap().der().to_vec();
        // Turn the PrintableString "x" of the issuer and the subject into a NumericString (tag
        // 0x12): legal DER, but not a string type rcgen can write. (The root's own signature is
        // not checked: it is the trust anchor.)
        let value = [0x13, 0x01, b'x'];
        let positions: Vec<usize> = (0..cert_der.len() - 2)
            .filter(|&i| cert_der[i..i + 3] == value)
            .collect();
        assert_eq!(positions.len(), 2, "issuer and subject");
        for i in positions {
            cert_der[i] = 0x12;
        }
        let err =
            Ca::from_pem(&pem_block("CERTIFICATE", &cert_der), &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, Error::UnsupportedCaName { .. }), "{err}");
    }

    #[test]
    fn issue_refuses_when_the_ca_chain_has_expired() {
        let ca = TestCa::root(p256(), "cluster.local").ca();
        let later = ca.not_after() + Duration::from_secs(1);
        let err = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                later,
                DEFAULT_LIFETIME,
            )
            .unwrap_err();
        assert!(matches!(err, Error::CaExpired { .. }), "{err}");
        // Near the end, certificates stop at the CA's expiry.
        let near = ca.not_after() - Duration::from_secs(3600);
        let certified = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                near,
                DEFAULT_LIFETIME,
            )
            .unwrap();
        assert_eq!(certified.not_after(), ca.not_after());
    }

    #[test]
    fn dev_root_is_persisted_and_reloaded() {
        let dir = TempDir::new("dev-root");
        let ca = Ca::load_or_generate(&dir.0, "cluster.local").unwrap();
        let cert_path = dir.0.join("ca/root-cert.pem");
        let key_path = dir.0.join("ca/root-key.pem");
        let key_mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let dir_mode = fs::metadata(dir.0.join("ca")).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let root = parse(ca.root(), String::new).unwrap();
        assert_eq!(
            root.subject().to_string(),
            "O=cluster.local, CN=meshlet development root CA"
        );
        assert!(ca.intermediates().is_empty());
        let certified = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                SystemTime::now(),
                DEFAULT_LIFETIME,
            )
            .unwrap();

        let reloaded = Ca::load_or_generate(&dir.0, "cluster.local").unwrap();
        assert_eq!(reloaded.root(), ca.root());
        verify(&certified, &reloaded);

        fs::remove_file(&cert_path).unwrap();
        let err = Ca::load_or_generate(&dir.0, "cluster.local").unwrap_err();
        assert!(matches!(err, Error::PartialState { .. }), "{err}");
        assert!(err.to_string().contains("root-key.pem"), "{err}");
        assert!(key_path.exists(), "nothing is overwritten");

        let err = Ca::generate_dev("Cluster.Local").unwrap_err();
        assert!(matches!(err, Error::InvalidTrustDomain(_)), "{err}");
    }
}
