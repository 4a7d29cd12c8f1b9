//! The cluster CA as an issuer: Istio's certificate API (`meshlet ca`, or istiod) over TLS.
//!
//! For each certificate the agent makes a key, sends a CSR for the identity with its
//! service-account token (`authorization: Bearer`, Istio's `ImpersonatedIdentity` metadata and
//! `ClusterID` header, as ztunnel sends them), and checks what comes back before using it: the
//! leaf must carry exactly the identity asked for and the key just made, and chain to the trust
//! bundle. The key never leaves memory.
//!
//! The trust bundle (`--ca-root`, PEM, one root or several during a rotation) authenticates
//! the CA's TLS endpoint and is the set of roots peers' certificates must chain to. It is
//! re-read when it changes (a mounted ConfigMap is updated in place), and may be missing at
//! start: certificates are then pending until it appears.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
};
use tonic::transport::{Channel, Endpoint};

use super::{
    Certified, Error, Identity, ca, csr,
    tls::{self, Roots},
};
use crate::proto::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_client::IstioCertificateServiceClient,
};

/// How long a connection to the CA may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one certificate request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the cluster CA is and how to talk to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteConfig {
    /// `https://host:port` of Istio's certificate API.
    pub address: String,
    /// The PEM trust bundle.
    pub root: PathBuf,
    /// The projected service-account token to present.
    pub token: PathBuf,
    /// Sent as the `ClusterID` header (istiod uses it to pick the cluster).
    pub cluster_id: String,
}

/// A client of the cluster CA.
#[derive(Debug)]
pub struct RemoteCa {
    config: RemoteConfig,
    uri: Uri,
    /// Where to connect: the address's host (brackets removed) and port.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    roots: Roots,
    /// The bundle's text as last loaded, and the channel built for it.
    loaded: Mutex<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    pem: Option<String>,
    channel: Option<Channel>,
}

impl RemoteCa {
    /// A client for the CA at `config.address`; loads the trust bundle if it is there already.
    pub fn new(config: RemoteConfig) -> Result<Self, Error> {
        let invalid = |reason: String| Error::CaAddress {
            address: config.address.clone(),
            reason,
        };
        let uri: Uri = config
            .address
            .parse()
            .map_err(|err: http::uri::InvalidUri| invalid(err.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("it must be an https:// URL".to_owned()));
        }
        let host = uri
            .host()
            .ok_or_else(|| invalid("it has no host".to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|err| invalid(err.to_string()))?;
        let port = uri.port_u16().unwrap_or(443);
        let ca = Self {
            config,
            uri,
            host,
            port,
            server_name,
            roots: Roots::new(Arc::new(RootCertStore::empty())),
            loaded: Mutex::default(),
        };
        if let Err(err) = ca.reload_roots() {
            tracing::warn!("{err}; certificates wait for it");
        }
        Ok(ca)
    }

    /// The CA's address.
    pub fn address(&self) -> &str {
        &self.config.address
    }

    /// The trust bundle's path.
    pub fn root_path(&self) -> &Path {
        &self.config.root
    }

    /// The roots of the trust bundle (empty until it is loaded).
    pub fn roots(&self) -> Roots {
        self.roots.clone()
    }

    /// Re-reads the trust bundle; `true` if it changed. A bundle that cannot be read or parsed
    /// leaves the last good one in place.
    pub fn reload_roots(&self) -> Result<bool, Error> {
        let path = &self.config.root;
        let bad = |reason: String| Error::TrustBundle {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|err| bad(err.to_string()))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if loaded.pem.as_deref() == Some(pem.as_str()) {
            return Ok(false);
        }
        let roots = Arc::new(tls::parse_bundle(&pem).map_err(bad)?);
        self.roots.replace(roots);
        // The next request connects with the new roots.
        *loaded = Loaded {
            pem: Some(pem),
            channel: None,
        };
        Ok(true)
    }

    fn channel(&self) -> Result<Channel, Error> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if loaded.pem.is_none() {
            return Err(Error::TrustBundle {
                path: self.config.root.clone(),
                reason: "not loaded yet".to_owned(),
            });
        }
        if let Some(channel) = &loaded.channel {
            return Ok(channel.clone());
        }
        let mut tls = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(Error::Tls)?
            .with_root_certificates(self.roots.current())
            .with_no_client_auth();
        tls.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let (server_name, host, port) = (self.server_name.clone(), self.host.clone(), self.port);
        // The channel only ever dials the CA's own address.
        let connect = tower::service_fn(move |_: Uri| {
            let (connector, server_name, host) =
                (connector.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let channel = Endpoint::from(self.uri.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_with_connector_lazy(connect);
        loaded.channel = Some(channel.clone());
        Ok(channel)
    }

    /// Sends one `CreateCertificate` request as is, with `token` as the bearer token and the
    /// configured cluster ID: the wire call under [`RemoteCa::issue`], for tools and tests.
    pub async fn call(
        &self,
        message: IstioCertificateRequest,
        token: Option<&str>,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let channel = self
            .channel()
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        let mut request = tonic::Request::new(message);
        let header = |value: String| {
            value
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("not a valid header value"))
        };
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", header(format!("Bearer {token}"))?);
        }
        request
            .metadata_mut()
            .insert("clusterid", header(self.config.cluster_id.clone())?);
        request.set_timeout(REQUEST_TIMEOUT);
        Ok(IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await?
            .into_inner())
    }

    /// Asks the CA for a certificate for `identity`, valid for `lifetime`.
    pub async fn issue(
        &self,
        identity: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Certified, Error> {
        // Pick up a bundle that appeared or changed since the last pass.
        if let Err(err) = self.reload_roots()
            && self
                .loaded
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pem
                .is_none()
        {
            return Err(err);
        }
        let token_path = &self.config.token;
        let token = std::fs::read_to_string(token_path).map_err(|err| Error::Token {
            path: token_path.clone(),
            reason: err.to_string(),
        })?;
        let request = csr::request(identity).map_err(|err| Error::Csr(err.to_string()))?;
        let message = IstioCertificateRequest {
            csr: request.pem.clone(),
            validity_duration: lifetime.as_secs() as i64,
            metadata: Some(IstioCertificateRequest::impersonating(
                &identity.to_string(),
            )),
        };
        let response = self
            .call(message, Some(token.trim()))
            .await
            .map_err(|status| Error::CaRequest {
                address: self.config.address.clone(),
                code: format!("{:?}", status.code()),
                message: status.message().to_owned(),
            })?;
        accept(
            identity,
            request,
            &response.cert_chain,
            &self.roots.current(),
            now,
        )
    }
}

/// Checks a CA's answer and pairs it with the key: the leaf must be for `identity` and for the
/// key of `request`, and the chain (the leaf, then intermediates; a root at the end is dropped)
/// must lead to `roots`.
fn accept(
    identity: &Identity,
    request: csr::Request,
    cert_chain: &[String],
    roots: &RootCertStore,
    now: SystemTime,
) -> Result<Certified, Error> {
    let bad = |reason: String| Error::CaResponse(reason);
    let mut chain = Vec::new();
    for pem in cert_chain {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            chain.push(der.map_err(|err| bad(format!("a certificate is not PEM: {err}")))?);
        }
    }
    if chain.is_empty() {
        return Err(bad("the CA returned no certificate".to_owned()));
    }
    // Roots are not sent in handshakes: drop self-issued certificates after the leaf.
    while chain.len() > 1 {
        let last = ca::parse(chain.last().expect("not empty"), || {
            "a CA certificate".to_owned()
        })?;
        if last.subject().as_raw() != last.issuer().as_raw() {
            break;
        }
        chain.pop();
    }
    let leaf = ca::parse(&chain[0], || "the issued certificate".to_owned())?;
    let presented = tls::identity_of(&chain[0])?;
    if presented != *identity {
        return Err(bad(format!(
            "the certificate is for {presented}, not {identity}"
        )));
    }
    if leaf.public_key().subject_public_key.data.as_ref() != request.public_key.as_slice() {
        return Err(bad(
            "the certificate is not for the key the CSR carried".to_owned()
        ));
    }
    tls::verify_chain(&chain, roots, now).map_err(|err| {
        bad(format!(
            "the certificate does not chain to the trust bundle: {err}"
        ))
    })?;
    let validity = leaf.validity();
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let (not_before, not_after) = (time(validity.not_before), time(validity.not_after));
    let serial = ca::hex(leaf.raw_serial());
    drop(leaf);
    Certified::new(
        identity.clone(),
        chain,
        request.key,
        not_before,
        not_after,
        serial,
    )
}

#[cfg(test)]
mod tests {
    use super::{
        super::{
            DEFAULT_LIFETIME,
            ca::tests::{TestCa, id, p256},
        },
        *,
    };

    fn answer(
        ca: &super::super::Ca,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Vec<String> {
        let signed = ca
            .sign(identity, public_key, SystemTime::now(), DEFAULT_LIFETIME)
            .unwrap();
        ca.chain_pem(&signed)
    }

    #[test]
    fn accepts_a_chain_for_its_identity_and_key() {
        let ca = TestCa::root(p256(), "cluster.local").ca();
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let request = csr::request(&web).unwrap();
        let parsed = csr::Csr::parse_pem(&request.pem).unwrap();
        let chain = answer(&ca, &web, parsed.public_key());
        assert_eq!(chain.len(), 2, "leaf and root");
        let certified = accept(&web, request, &chain, &ca.roots(), SystemTime::now()).unwrap();
        assert_eq!(certified.identity(), &web);
        assert_eq!(certified.chain().len(), 1, "the root is not sent");
        assert!(certified.is_valid_at(SystemTime::now()));
    }

    #[test]
    fn refuses_another_identity_another_key_or_another_root() {
        let ca = TestCa::root(p256(), "cluster.local").ca();
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let db = id("spiffe://cluster.local/ns/default/sa/db");

        let request = csr::request(&web).unwrap();
        let key = csr::Csr::parse_pem(&request.pem).unwrap();
        let wrong_identity = answer(&ca, &db, key.public_key());
        let err = accept(
            &web,
            request,
            &wrong_identity,
            &ca.roots(),
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("not spiffe://cluster.local/ns/default/sa/web"),
            "{err}"
        );

        let request = csr::request(&web).unwrap();
        let other = csr::request(&web).unwrap();
        let other_key = csr::Csr::parse_pem(&other.pem).unwrap();
        let wrong_key = answer(&ca, &web, other_key.public_key());
        let err = accept(&web, request, &wrong_key, &ca.roots(), SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("not for the key"), "{err}");

        let stranger = TestCa::root(p256(), "cluster.local").ca();
        let request = csr::request(&web).unwrap();
        let key = csr::Csr::parse_pem(&request.pem).unwrap();
        let foreign = answer(&stranger, &web, key.public_key());
        let err = accept(&web, request, &foreign, &ca.roots(), SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");

        let request = csr::request(&web).unwrap();
        let err = accept(&web, request, &[], &ca.roots(), SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn the_address_must_be_https_with_a_host() {
        for bad in ["http://ca:15012", "ca:15012", "https://"] {
            let config = RemoteConfig {
                address: bad.to_owned(),
                root: "/nonexistent".into(),
                token: "/nonexistent".into(),
                cluster_id: "Kubernetes".to_owned(),
            };
            assert!(RemoteCa::new(config).is_err(), "{bad} accepted");
        }
    }

    /// A scratch file removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("meshlet-remote-{name}-{}", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn remote(bundle: &Path, token: &Path, cluster_id: &str) -> RemoteCa {
        RemoteCa::new(RemoteConfig {
            // Nothing listens here; no test below gets as far as connecting.
            address: "https://127.0.0.1:1".to_owned(),
            root: bundle.to_owned(),
            token: token.to_owned(),
            cluster_id: cluster_id.to_owned(),
        })
        .unwrap()
    }

    #[test]
    fn a_bad_trust_bundle_keeps_the_last_good_one() {
        let ca = TestCa::root(p256(), "cluster.local");
        let bundle = Scratch::new("bundle", &ca.cert_pem);
        let client = remote(&bundle.0, Path::new("/nonexistent"), "Kubernetes");
        assert_eq!(client.roots().current().len(), 1);
        assert!(!client.reload_roots().unwrap(), "unchanged");

        std::fs::write(&bundle.0, "not pem").unwrap();
        let err = client.reload_roots().unwrap_err();
        assert!(matches!(err, Error::TrustBundle { .. }), "{err}");
        assert_eq!(
            client.roots().current().len(),
            1,
            "the last good bundle stays"
        );

        let two = format!(
            "{}{}",
            ca.cert_pem,
            TestCa::root(p256(), "cluster.local").cert_pem
        );
        std::fs::write(&bundle.0, two).unwrap();
        assert!(client.reload_roots().unwrap());
        assert_eq!(
            client.roots().current().len(),
            2,
            "a rotation bundle: both roots"
        );
    }

    #[tokio::test]
    async fn missing_bundle_token_or_a_bad_cluster_id_fail_before_the_wire() {
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let none = remote(
            Path::new("/nonexistent/bundle.pem"),
            Path::new("/nonexistent"),
            "K",
        );
        let err = none
            .issue(&web, SystemTime::now(), DEFAULT_LIFETIME)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TrustBundle { .. }), "{err}");

        let ca = TestCa::root(p256(), "cluster.local");
        let bundle = Scratch::new("bundle2", &ca.cert_pem);
        let client = remote(&bundle.0, Path::new("/nonexistent/token"), "Kubernetes");
        let err = client
            .issue(&web, SystemTime::now(), DEFAULT_LIFETIME)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Token { .. }), "{err}");

        let bad_id = remote(&bundle.0, Path::new("/nonexistent"), "line\nbreak");
        let status = bad_id
            .call(IstioCertificateRequest::default(), Some("token"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}
