//! Where `meshlet ca`'s signing key comes from, and how the agents learn the roots to trust.
//!
//! - Istio's `cacerts` layout in `--cacerts-dir` (the `cacerts` Secret mounted, as istiod
//!   mounts it): `ca-cert.pem` and `ca-key.pem` sign, `cert-chain.pem` leads from `ca-cert.pem`
//!   to the root, `root-cert.pem` is the trust bundle (one root, or several while rotating).
//! - Otherwise a self-signed root kept in the Secret `--root-secret` (Istio's
//!   `istio-ca-secret` layout): the first replica to start creates it; every other replica, and
//!   every restart, loads it. Two replicas racing both try to create it; the loser of the
//!   race (409 Conflict) loads the winner's.
//!
//! Either way the bundle is published in the ConfigMap `--root-configmap` (key
//! `root-cert.pem`), which the DaemonSet mounts for the agents' `--ca-root`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use tracing::{info, warn};

use crate::identity::{self, Ca};

/// The file and Secret keys of Istio's CA layout.
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing key.
pub const CA_KEY: &str = "ca-key.pem";
/// The chain from `ca-cert.pem` to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The trust bundle.
pub const ROOT_CERT: &str = "root-cert.pem";

/// The CA and the bundle of roots the mesh trusts.
#[derive(Debug)]
pub struct Root {
    /// Signs.
    pub ca: std::sync::Arc<Ca>,
    /// PEM roots to publish: the CA's root, and any other root being rotated in or out.
    pub bundle: String,
    /// Where it came from, for the log.
    pub source: String,
}

/// Loads the CA from `cacerts_dir` if it holds `ca-key.pem`, else from (or into) the Secret
/// `namespace/secret`.
pub async fn load(
    client: &Client,
    cacerts_dir: &Path,
    namespace: &str,
    secret: &str,
    trust_domain: &str,
) -> anyhow::Result<Root> {
    if cacerts_dir.join(CA_KEY).exists() {
        return from_cacerts(cacerts_dir);
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(existing) = secrets
            .get_opt(secret)
            .await
            .with_context(|| format!("read the root Secret {namespace}/{secret}"))?
        {
            return from_secret(&existing, namespace, secret);
        }
        let (cert, key) = identity::generate_root_pem(trust_domain)?;
        let created = Secret {
            metadata: ObjectMeta {
                name: Some(secret.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "meshlet".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("istio.io/ca-root".to_owned()),
            data: Some(BTreeMap::from([
                (CA_CERT.to_owned(), ByteString(cert.clone().into_bytes())),
                (CA_KEY.to_owned(), ByteString(key.into_bytes())),
                (ROOT_CERT.to_owned(), ByteString(cert.into_bytes())),
            ])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &created).await {
            Ok(stored) => {
                info!(secret = %format!("{namespace}/{secret}"), "created the mesh root CA and stored it in a Secret");
                return from_secret(&stored, namespace, secret);
            }
            // Another replica created it first: load theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("store the new root in the Secret {namespace}/{secret}")
                });
            }
        }
    }
    bail!("the root Secret {namespace}/{secret} keeps appearing and disappearing")
}

/// Loads Istio's `cacerts` files.
pub fn from_cacerts(dir: &Path) -> anyhow::Result<Root> {
    let read = |name: &str| -> anyhow::Result<Option<String>> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("read {}", path.display())),
        }
    };
    let key = read(CA_KEY)?.context("ca-key.pem disappeared")?;
    let ca_cert = read(CA_CERT)?
        .with_context(|| format!("{} has ca-key.pem but no ca-cert.pem", dir.display()))?;
    let bundle = read(ROOT_CERT)?.unwrap_or_default();
    let chain = read(CERT_CHAIN)?.unwrap_or_else(|| ca_cert.clone());
    let ca = ca_with_root(&chain, &key, &bundle)
        .with_context(|| format!("load Istio's cacerts from {}", dir.display()))?;
    let bundle = if bundle.trim().is_empty() {
        identity_root_pem(&ca)
    } else {
        bundle
    };
    check_bundle_has(&ca, &bundle)?;
    Ok(Root {
        ca: ca.into(),
        bundle,
        source: format!("cacerts in {}", dir.display()),
    })
}

fn from_secret(secret: &Secret, namespace: &str, name: &str) -> anyhow::Result<Root> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> anyhow::Result<String> {
        let bytes = data
            .get(key)
            .with_context(|| format!("the Secret {namespace}/{name} has no {key}"))?;
        String::from_utf8(bytes.0.clone())
            .with_context(|| format!("{key} in the Secret {namespace}/{name} is not text"))
    };
    let cert = text(CA_CERT)?;
    let key = text(CA_KEY)?;
    let bundle = text(ROOT_CERT).unwrap_or_else(|_| cert.clone());
    let ca = ca_with_root(&cert, &key, &bundle)
        .with_context(|| format!("load the root CA from the Secret {namespace}/{name}"))?;
    check_bundle_has(&ca, &bundle)?;
    Ok(Root {
        ca: ca.into(),
        bundle,
        source: format!("Secret {namespace}/{name}"),
    })
}

/// The CA from `chain` (the signing certificate first) and `key`: as given if the chain ends
/// at its root, else completed with the root of `bundle` that issued its last certificate.
fn ca_with_root(chain: &str, key: &str, bundle: &str) -> Result<Ca, identity::Error> {
    match Ca::from_pem(chain, key) {
        Err(identity::Error::NoRoot { subject }) => {
            for root in CertificateDer::pem_slice_iter(bundle.as_bytes()).flatten() {
                let root_pem = pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec()));
                if let Ok(ca) = Ca::from_pem(&format!("{chain}\n{root_pem}"), key) {
                    return Ok(ca);
                }
            }
            Err(identity::Error::NoRoot { subject })
        }
        other => other,
    }
}

fn identity_root_pem(ca: &Ca) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", ca.root().to_vec()))
}

/// The bundle must hold the CA's own root, or nothing the CA signs would be trusted.
fn check_bundle_has(ca: &Ca, bundle: &str) -> anyhow::Result<()> {
    let roots: Vec<_> = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .collect::<Result<_, _>>()
        .context("the root bundle (root-cert.pem) is not PEM certificates")?;
    if !roots.iter().any(|root| root == ca.root()) {
        bail!(
            "the root bundle (root-cert.pem) does not hold the root of the CA's chain ({}): \
             agents would trust none of the certificates it signs",
            ca.subject()
        );
    }
    if roots.len() > 1 {
        warn!(
            roots = roots.len(),
            "the trust bundle holds several roots (a root rotation in progress?)"
        );
    }
    Ok(())
}

/// Writes `bundle` into the ConfigMap `namespace/name` (key `root-cert.pem`), creating it or
/// replacing what it held.
pub async fn publish(
    client: &Client,
    namespace: &str,
    name: &str,
    bundle: &str,
) -> anyhow::Result<()> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let context = || format!("publish the trust bundle in the ConfigMap {namespace}/{name}");
    for _ in 0..3 {
        let existing = api.get_opt(name).await.with_context(context)?;
        let wanted = BTreeMap::from([(ROOT_CERT.to_owned(), bundle.to_owned())]);
        let result = match existing {
            Some(current) if current.data.as_ref() == Some(&wanted) => return Ok(()),
            Some(mut current) => {
                current.data = Some(wanted);
                api.replace(name, &PostParams::default(), &current).await
            }
            None => {
                let map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        ..Default::default()
                    },
                    data: Some(wanted),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &map).await
            }
        };
        match result {
            Ok(_) => {
                info!(configmap = %format!("{namespace}/{name}"), "published the trust bundle");
                return Ok(());
            }
            // Another replica wrote it meanwhile: look again.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => return Err(err).with_context(context),
        }
    }
    bail!("{}: it kept changing under us", context())
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    use super::*;

    /// A scratch `cacerts` directory.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("meshlet-cacerts-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> &Self {
            std::fs::write(self.0.join(name), text).unwrap();
            self
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An intermediate CA signed by the root `(cert, key)`: (cert PEM, key PEM).
    fn intermediate(root_cert: &str, root_key: &str) -> (String, String) {
        let root_key = KeyPair::from_pem(root_key).unwrap();
        let issuer = Issuer::from_ca_cert_pem(root_cert, root_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_root_alone_and_an_intermediate_completed_from_a_rotation_bundle() {
        let (root, root_key) = identity::generate_root_pem("cluster.local").unwrap();
        let (other_root, _) = identity::generate_root_pem("cluster.local").unwrap();

        let dir = Dir::new("root");
        dir.write(CA_CERT, &root)
            .write(CA_KEY, &root_key)
            .write(ROOT_CERT, &root);
        let loaded = from_cacerts(&dir.0).unwrap();
        assert_eq!(loaded.bundle, root);

        let (cert, key) = intermediate(&root, &root_key);
        let dir = Dir::new("intermediate");
        let bundle = format!("{other_root}{root}");
        dir.write(CA_CERT, &cert)
            .write(CA_KEY, &key)
            .write(ROOT_CERT, &bundle);
        let loaded = from_cacerts(&dir.0).unwrap();
        assert_eq!(loaded.bundle, bundle, "both roots are published");
        assert_eq!(
            pem::encode(&pem::Pem::new("CERTIFICATE", loaded.ca.root().to_vec())),
            pem::encode(&pem::parse(&root).unwrap())
        );
    }

    #[test]
    fn bad_cacerts_say_what_is_wrong() {
        let (root, root_key) = identity::generate_root_pem("cluster.local").unwrap();
        let (other_root, other_key) = identity::generate_root_pem("cluster.local").unwrap();
        let (cert, key) = intermediate(&root, &root_key);

        let err = |dir: &Dir| format!("{:#}", from_cacerts(&dir.0).unwrap_err());

        let missing = Dir::new("missing");
        missing.write(CA_KEY, &key);
        assert!(
            err(&missing).contains("no ca-cert.pem"),
            "{}",
            err(&missing)
        );

        // The bundle lacks the root the intermediate chains to.
        let foreign = Dir::new("foreign");
        foreign
            .write(CA_CERT, &cert)
            .write(CA_KEY, &key)
            .write(ROOT_CERT, &other_root);
        assert!(
            err(&foreign).contains("not a self-signed root"),
            "{}",
            err(&foreign)
        );

        // A root CA whose bundle does not hold it.
        let unpublished = Dir::new("unpublished");
        unpublished
            .write(CA_CERT, &root)
            .write(CA_KEY, &root_key)
            .write(ROOT_CERT, &other_root);
        assert!(
            err(&unpublished).contains("does not hold the root"),
            "{}",
            err(&unpublished)
        );

        // The key of another CA.
        let mismatch = Dir::new("mismatch");
        mismatch
            .write(CA_CERT, &root)
            .write(CA_KEY, &other_key)
            .write(ROOT_CERT, &root);
        assert!(
            err(&mismatch).contains("does not match"),
            "{}",
            err(&mismatch)
        );

        let garbage = Dir::new("garbage");
        garbage
            .write(CA_CERT, &root)
            .write(CA_KEY, "not a key")
            .write(ROOT_CERT, &root);
        assert!(err(&garbage).contains("CA key"), "{}", err(&garbage));
    }

    #[test]
    fn a_secret_without_its_keys_is_refused() {
        let secret = Secret {
            data: Some(BTreeMap::from([(
                CA_CERT.to_owned(),
                ByteString(b"x".to_vec()),
            )])),
            ..Default::default()
        };
        let err = from_secret(&secret, "meshlet-system", "meshlet-ca").unwrap_err();
        assert!(format!("{err:#}").contains("has no ca-key.pem"), "{err:#}");
    }
}
