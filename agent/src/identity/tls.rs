//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, no SNI, mutual authentication
//! with workload certificates, and the verifiers that check SPIFFE identities.

use std::{
    fmt,
    sync::{Arc, LazyLock, Mutex, PoisonError, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption, WantsClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
    server::{
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use x509_parser::extensions::GeneralName;

use super::{Certified, Error, Identity, ca, check_trust_domain};

/// The ALPN protocol HBONE negotiates: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));

/// The crypto provider of every mesh TLS configuration: rustls' aws-lc-rs provider.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// The TLS configuration of an HBONE client: the workload `local` connecting to the workload
/// `expected_peer`.
///
/// The client presents `local`'s certificate and accepts only a server certificate that chains
/// to `roots` and whose URI SAN is exactly `expected_peer`; the peer must be in `local`'s trust
/// domain. SNI is off (as in ztunnel), so the `ServerName` given to the connection is not sent
/// and not checked: pass the destination IP address. Resumption is off too, so that every
/// connection has its server's identity checked.
pub fn client_config(
    local: &Certified,
    expected_peer: Identity,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, Error> {
    let config = client_builder(
        expected_peer,
        local.identity().trust_domain(),
        roots,
        &[&rustls::version::TLS13],
    )?
    .with_client_cert_resolver(Arc::new(SingleCert::new(local)));
    Ok(Arc::new(finish_client(config)))
}

fn client_builder(
    expected_peer: Identity,
    trust_domain: &str,
    roots: Arc<RootCertStore>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ConfigBuilder<ClientConfig, WantsClientCert>, Error> {
    if expected_peer.trust_domain() != trust_domain {
        return Err(Error::ForeignTrustDomain {
            peer: expected_peer.trust_domain().to_owned(),
            mesh: trust_domain.to_owned(),
        });
    }
    let provider = provider();
    let verifier = ServerIdentityVerifier {
        roots,
        expected: expected_peer,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

fn finish_client(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config
}

/// The TLS configuration of an HBONE server.
///
/// The server certificate comes from `resolver` (e.g. a [`SingleCert`] with the destination
/// workload's certificate). Clients must present a certificate that chains to `roots` and
/// carries one SPIFFE identity in `trust_domain`; which identities may connect is for policy to
/// decide, with [`peer_identity`]. TLS 1.3 only, ALPN `h2` (a client offering only other
/// protocols is refused), no session tickets.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    roots: Roots,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, Error> {
    check_trust_domain(trust_domain).map_err(Error::InvalidTrustDomain)?;
    let provider = provider();
    let current = roots.current();
    let chain_verifier = webpki_client_verifier(current.clone())?;
    let verifier = ClientIdentityVerifier {
        roots,
        chain: Mutex::new((current, chain_verifier)),
        algorithms: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_owned(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

fn webpki_client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(Error::Verifier)
}

/// The roots the mesh trusts, shared by every TLS configuration and replaceable while they
/// are in use: a trust bundle that gains a new root (a root rotation) reaches the next
/// handshake of every listener.
#[derive(Debug, Clone)]
pub struct Roots(Arc<RwLock<Arc<RootCertStore>>>);

impl Roots {
    /// A handle holding `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        Self(Arc::new(RwLock::new(roots)))
    }

    /// The roots now.
    pub fn current(&self) -> Arc<RootCertStore> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the roots for every handshake from now on.
    pub fn replace(&self, roots: Arc<RootCertStore>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = roots;
    }
}

/// Parses a PEM trust bundle: one or more root certificates.
pub fn parse_bundle(pem: &str) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| err.to_string())?;
    if certs.is_empty() {
        return Err("it holds no CERTIFICATE block".to_owned());
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|err| format!("certificate {} is not a usable root: {err}", i + 1))?;
    }
    Ok(roots)
}

/// The SPIFFE identity of a peer, from the certificates of a completed handshake (the
/// connection's `peer_certificates()`): the one URI SAN of the first certificate.
///
/// It does not verify anything: use it on certificates the handshake verified.
pub fn peer_identity(certificates: &[CertificateDer<'_>]) -> Result<Identity, Error> {
    let leaf = certificates.first().ok_or(Error::NoPeerCertificate)?;
    identity_of(leaf)
}

pub(super) fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, Error> {
    let cert = ca::parse(leaf, || "the peer certificate".to_owned())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|err| Error::Certificate {
            what: "the peer certificate".to_owned(),
            reason: err.to_string(),
        })?
        .ok_or(Error::NoIdentity)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (None, _) => Err(Error::NoIdentity),
        (Some(uri), None) => Identity::parse(uri),
        (Some(_), Some(_)) => Err(Error::AmbiguousIdentity {
            count: 2 + uris.count(),
        }),
    }
}

/// Verifies a certificate chain as a server's, at `now`, against `roots`.
pub(super) fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: SystemTime,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let leaf = ParsedCertificate::try_from(leaf)?;
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    verify_server_cert_signed_by_trust_anchor(
        &leaf,
        roots,
        intermediates,
        now,
        PROVIDER.signature_verification_algorithms.all,
    )
}

/// Turns an identity error into the error rustls reports (and alerts the peer with
/// `certificate_unknown`); [`Error::from_tls`] gets it back.
fn refuse(err: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(err)))))
}

/// An identity error carried through rustls. rustls shows `CertificateError::Other` with its
/// `Debug` form, so that is the message here.
pub(super) struct Refused(pub(super) Error);

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// An HBONE client's server certificate verifier: webpki checks the chain, validity and
/// serverAuth usage against the mesh roots, then the URI SAN must be the expected identity.
#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let leaf = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identity_of(end_entity).map_err(refuse)?;
        if presented.trust_domain() != self.expected.trust_domain() {
            return Err(refuse(Error::ForeignTrustDomain {
                peer: presented.trust_domain().to_owned(),
                mesh: self.expected.trust_domain().to_owned(),
            }));
        }
        if presented != self.expected {
            return Err(refuse(Error::WrongPeer {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An HBONE server's client certificate verifier: webpki's (chain, validity, clientAuth usage,
/// certificate mandatory) against the current [`Roots`], then the certificate must carry one
/// identity of the trust domain.
#[derive(Debug)]
struct ClientIdentityVerifier {
    roots: Roots,
    /// webpki's verifier for the roots it was built from, rebuilt when they change.
    chain: Mutex<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
}

impl ClientIdentityVerifier {
    fn chain_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let current = self.roots.current();
        let mut chain = self.chain.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&chain.0, &current) {
            let verifier = webpki_client_verifier(current.clone())
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            *chain = (current, verifier);
        }
        Ok(chain.1.clone())
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The roots can change under a live configuration; peers pick their one certificate
        // without hints anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain_verifier()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = identity_of(end_entity).map_err(refuse)?;
        if identity.trust_domain() != self.trust_domain {
            return Err(refuse(Error::ForeignTrustDomain {
                peer: identity.trust_domain().to_owned(),
                mesh: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate resolver that always presents one workload certificate: as a server, the
/// destination workload's; as a client, the source workload's.
#[derive(Debug, Clone)]
pub struct SingleCert(Arc<CertifiedKey>);

impl SingleCert {
    /// Presents `certified`.
    pub fn new(certified: &Certified) -> Self {
        Self(certified.certified_key())
    }
}

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for SingleCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::KeyPair;
    use rustls::{AlertDescription, ClientConnection, ProtocolVersion, ServerConnection};

    use super::{
        super::{
            Ca, DEFAULT_LIFETIME,
            ca::tests::{TestCa, id, p256},
        },
        *,
    };

    const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const CLIENT: &str = "spiffe://cluster.local/ns/frontend/sa/web";
    const SERVER: &str = "spiffe://cluster.local/ns/backend/sa/api";

    struct Mesh {
        ca: Ca,
    }

    impl Mesh {
        fn new() -> Self {
            Self::with_root_named("cluster.local")
        }

        fn with_root_named(org: &str) -> Self {
            Self {
                ca: TestCa::root(p256(), org).ca(),
            }
        }

        fn cert(&self, identity: &str) -> Certified {
            self.ca
                .issue(&id(identity), SystemTime::now(), DEFAULT_LIFETIME)
                .unwrap()
        }

        fn client(&self, local: &Certified, expected: &str) -> ClientConfig {
            Arc::unwrap_or_clone(client_config(local, id(expected), self.ca.roots()).unwrap())
        }

        fn server(&self, local: &Certified) -> ServerConfig {
            Arc::unwrap_or_clone(
                server_config(
                    Arc::new(SingleCert::new(local)),
                    Roots::new(self.ca.roots()),
                    "cluster.local",
                )
                .unwrap(),
            )
        }
    }

    /// What each side of a handshake ended with.
    #[derive(Debug)]
    struct Outcome {
        client: Result<(), rustls::Error>,
        server: Result<(), rustls::Error>,
        client_conn: ClientConnection,
        server_conn: ServerConnection,
    }

    impl Outcome {
        fn ok(&self) -> bool {
            self.client.is_ok()
                && self.server.is_ok()
                && !self.client_conn.is_handshaking()
                && !self.server_conn.is_handshaking()
        }
    }

    /// Runs a handshake in memory, passing each side's bytes to the other until neither has
    /// anything more to say; alerts are delivered too.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Outcome {
        // A DNS name, which rustls would send as SNI were SNI not disabled. (The proxy passes
        // the destination IP; nothing checks it either way.)
        let server_name = ServerName::try_from("api.backend.svc.cluster.local").unwrap();
        let mut client_conn = ClientConnection::new(Arc::new(client), server_name).unwrap();
        let mut server_conn = ServerConnection::new(Arc::new(server)).unwrap();
        let mut client_result = Ok(());
        let mut server_result = Ok(());
        for _ in 0..20 {
            let mut moved = false;
            let mut buf = Vec::new();
            while client_conn.wants_write() {
                client_conn.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && server_result.is_ok() {
                moved = true;
                let mut input = &buf[..];
                while !input.is_empty() {
                    server_conn.read_tls(&mut input).unwrap();
                }
                server_result = server_conn.process_new_packets().map(drop);
            }
            let mut buf = Vec::new();
            while server_conn.wants_write() {
                server_conn.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() && client_result.is_ok() {
                moved = true;
                let mut input = &buf[..];
                while !input.is_empty() {
                    client_conn.read_tls(&mut input).unwrap();
                }
                client_result = client_conn.process_new_packets().map(drop);
            }
            if !moved {
                break;
            }
        }
        Outcome {
            client: client_result,
            server: server_result,
            client_conn,
            server_conn,
        }
    }

    #[test]
    fn mutual_handshake() {
        let mesh = Mesh::new();
        let client_cert = mesh.cert(CLIENT);
        let server_cert = mesh.cert(SERVER);
        let outcome = handshake(mesh.client(&client_cert, SERVER), mesh.server(&server_cert));
        assert!(outcome.ok(), "{outcome:?}");
        for (alpn, version) in [
            (
                outcome.client_conn.alpn_protocol(),
                outcome.client_conn.protocol_version(),
            ),
            (
                outcome.server_conn.alpn_protocol(),
                outcome.server_conn.protocol_version(),
            ),
        ] {
            assert_eq!(alpn, Some(ALPN_H2));
            assert_eq!(version, Some(ProtocolVersion::TLSv1_3));
        }
        assert_eq!(outcome.server_conn.server_name(), None, "no SNI is sent");
        let seen_by_client =
            peer_identity(outcome.client_conn.peer_certificates().unwrap()).unwrap();
        let seen_by_server =
            peer_identity(outcome.server_conn.peer_certificates().unwrap()).unwrap();
        assert_eq!(seen_by_client, id(SERVER));
        assert_eq!(seen_by_server, id(CLIENT));
    }

    #[test]
    fn mutual_handshake_through_an_intermediate() {
        let root = TestCa::root(
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
            "root",
        );
        let intermediate = root.intermediate(p256(), "cluster.local");
        let ca = Ca::from_pem(
            &format!("{}{}", intermediate.cert_pem, root.cert_pem),
            &intermediate.key_pem,
        )
        .unwrap();
        let mesh = Mesh { ca };
        let outcome = handshake(
            mesh.client(&mesh.cert(CLIENT), SERVER),
            mesh.server(&mesh.cert(SERVER)),
        );
        assert!(outcome.ok(), "{outcome:?}");
        assert_eq!(outcome.client_conn.peer_certificates().unwrap().len(), 2);
        assert_eq!(outcome.server_conn.peer_certificates().unwrap().len(), 2);
    }

    #[test]
    fn client_refuses_the_wrong_server() {
        let mesh = Mesh::new();
        let impostor = "spiffe://cluster.local/ns/backend/sa/not-api";
        let outcome = handshake(
            mesh.client(&mesh.cert(CLIENT), SERVER),
            mesh.server(&mesh.cert(impostor)),
        );
        let err = outcome.client.unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&format!(
                "certificate for {impostor} presented, expected {SERVER}"
            )),
            "{message}"
        );
        assert!(
            matches!(
                Error::from_tls(&err),
                Some(Error::WrongPeer { presented, expected })
                    if *presented == id(impostor) && *expected == id(SERVER)
            ),
            "{err:?}"
        );
        assert!(matches!(
            outcome.server,
            Err(rustls::Error::AlertReceived(_))
        ));
    }

    #[test]
    fn client_refuses_a_server_of_another_trust_domain() {
        let mesh = Mesh::new();
        let outcome = handshake(
            mesh.client(&mesh.cert(CLIENT), SERVER),
            mesh.server(&mesh.cert("spiffe://foo/ns/backend/sa/api")),
        );
        let message = outcome.client.unwrap_err().to_string();
        assert!(
            message.contains("peer is in trust domain foo, this mesh is cluster.local"),
            "{message}"
        );
        // And a client cannot even be configured to expect a peer outside its trust domain.
        let err = client_config(
            &mesh.cert(CLIENT),
            id("spiffe://foo/ns/a/sa/b"),
            mesh.ca.roots(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::ForeignTrustDomain { .. }), "{err}");
    }

    #[test]
    fn server_refuses_a_client_of_another_trust_domain() {
        let mesh = Mesh::new();
        // A client of trust domain foo, under the same root, that expects the right server.
        let foreign = mesh.cert("spiffe://foo/ns/frontend/sa/web");
        let client = client_builder(id(SERVER), "cluster.local", mesh.ca.roots(), TLS13)
            .unwrap()
            .with_client_cert_resolver(Arc::new(SingleCert::new(&foreign)));
        let outcome = handshake(finish_client(client), mesh.server(&mesh.cert(SERVER)));
        let message = outcome.server.unwrap_err().to_string();
        assert!(
            message.contains("peer is in trust domain foo, this mesh is cluster.local"),
            "{message}"
        );
    }

    #[test]
    fn server_refuses_a_client_without_certificate() {
        let mesh = Mesh::new();
        let client = client_builder(id(SERVER), "cluster.local", mesh.ca.roots(), TLS13)
            .unwrap()
            .with_no_client_auth();
        let outcome = handshake(finish_client(client), mesh.server(&mesh.cert(SERVER)));
        assert!(
            matches!(outcome.server, Err(rustls::Error::NoCertificatesPresented)),
            "{outcome:?}"
        );
        assert!(
            matches!(
                outcome.client,
                Err(rustls::Error::AlertReceived(
                    AlertDescription::CertificateRequired
                ))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn server_refuses_a_client_of_another_root() {
        let mesh = Mesh::new();
        // Another root, and an impostor root with the same name but another key.
        for (other, expected) in [
            (
                Mesh::with_root_named("other"),
                CertificateError::UnknownIssuer,
            ),
            (Mesh::new(), CertificateError::BadSignature),
        ] {
            let outcome = handshake(
                // The client trusts the server's root but holds a certificate of another root.
                mesh.client(&other.cert(CLIENT), SERVER),
                mesh.server(&mesh.cert(SERVER)),
            );
            assert!(
                matches!(
                    &outcome.server,
                    Err(rustls::Error::InvalidCertificate(err)) if *err == expected
                ),
                "{outcome:?}"
            );
            assert!(outcome.client.is_err(), "{outcome:?}");
        }
    }

    #[test]
    fn client_refuses_a_server_of_another_root() {
        let mesh = Mesh::new();
        for (other, expected) in [
            (
                Mesh::with_root_named("other"),
                CertificateError::UnknownIssuer,
            ),
            (Mesh::new(), CertificateError::BadSignature),
        ] {
            let outcome = handshake(
                mesh.client(&mesh.cert(CLIENT), SERVER),
                other.server(&other.cert(SERVER)),
            );
            assert!(
                matches!(
                    &outcome.client,
                    Err(rustls::Error::InvalidCertificate(err)) if *err == expected
                ),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn server_refuses_an_expired_client_certificate() {
        let mesh = Mesh::new();
        let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        let expired = mesh
            .ca
            .issue(&id(CLIENT), two_days_ago, DEFAULT_LIFETIME)
            .unwrap();
        let outcome = handshake(
            mesh.client(&expired, SERVER),
            mesh.server(&mesh.cert(SERVER)),
        );
        assert!(
            matches!(
                outcome.server,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn server_refuses_tls12() {
        let mesh = Mesh::new();
        let client_cert = mesh.cert(CLIENT);
        let client = client_builder(
            id(SERVER),
            "cluster.local",
            mesh.ca.roots(),
            &[&rustls::version::TLS12],
        )
        .unwrap()
        .with_client_cert_resolver(Arc::new(SingleCert::new(&client_cert)));
        let outcome = handshake(finish_client(client), mesh.server(&mesh.cert(SERVER)));
        assert!(
            matches!(outcome.server, Err(rustls::Error::PeerIncompatible(_))),
            "{outcome:?}"
        );
        assert!(outcome.client.is_err());

        // The same client with TLS 1.3 gets through: the refusal is the version's.
        let client = client_builder(
            id(SERVER),
            "cluster.local",
            mesh.ca.roots(),
            &[&rustls::version::TLS12, &rustls::version::TLS13],
        )
        .unwrap()
        .with_client_cert_resolver(Arc::new(SingleCert::new(&client_cert)));
        let outcome = handshake(finish_client(client), mesh.server(&mesh.cert(SERVER)));
        assert!(outcome.ok(), "{outcome:?}");
    }

    #[test]
    fn server_refuses_a_client_without_h2() {
        let mesh = Mesh::new();
        let mut client = mesh.client(&mesh.cert(CLIENT), SERVER);
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let outcome = handshake(client, mesh.server(&mesh.cert(SERVER)));
        assert!(
            matches!(outcome.server, Err(rustls::Error::NoApplicationProtocol)),
            "{outcome:?}"
        );
        assert!(
            matches!(
                outcome.client,
                Err(rustls::Error::AlertReceived(
                    AlertDescription::NoApplicationProtocol
                ))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn peer_identity_needs_one_spiffe_uri() {
        let mesh = Mesh::new();
        assert!(matches!(peer_identity(&[]), Err(Error::NoPeerCertificate)));
        let certified = mesh.cert(CLIENT);
        assert_eq!(peer_identity(certified.chain()).unwrap(), id(CLIENT));
        // A CA certificate has no URI SAN.
        assert!(matches!(
            peer_identity(std::slice::from_ref(mesh.ca.root())),
            Err(Error::NoIdentity)
        ));
    }
}
