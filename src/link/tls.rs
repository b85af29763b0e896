//! The TLS client configuration: a pinned CA, optional mutual TLS, optional ALPN.
//!
//! Trust comes only from the configured CA bundle; the system store is never used, so a
//! certificate from any public CA cannot impersonate the platform's broker. The certificate's
//! name is checked against `tls_server_name` (or `host`) by [`PinnedNameVerifier`], which lets a
//! gateway dial an IP address or a load balancer while still demanding the broker's real name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::BrokerSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("broker.ca_file {path}: {problem}")]
    CaFile { path: PathBuf, problem: String },
    #[error("broker.client_cert_file {path}: {problem}")]
    ClientCert { path: PathBuf, problem: String },
    /// Deliberately without the path: the key file's location is a secret.
    #[error("broker.client_key_file: {problem}")]
    ClientKey { problem: String },
    #[error("broker.tls_server_name {name:?} is not a valid DNS name or IP address")]
    ServerName { name: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The process-wide crypto provider: *ring*, so ARM cross-builds need only a C cross compiler.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs *ring* as the process default, for any rustls user that does not take a provider
/// explicitly. Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the client configuration from the broker settings.
pub fn client_config(b: &BrokerSettings) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let ca_path = b.ca_file.as_deref().ok_or_else(|| TlsSetupError::CaFile {
        path: PathBuf::new(),
        problem: "not configured".into(),
    })?;
    let roots = load_roots(ca_path)?;
    let name = ServerName::try_from(b.server_name().to_owned()).map_err(|_| {
        TlsSetupError::ServerName {
            name: b.server_name().to_owned(),
        }
    })?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsSetupError::CaFile {
            path: ca_path.to_owned(),
            problem: e.to_string(),
        })?;
    let verifier = Arc::new(PinnedNameVerifier {
        inner: webpki,
        name,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&b.client_cert_file, &b.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = load_chain(cert)?;
            let key = PrivateKeyDer::from_pem_file(key.expose()).map_err(|e| {
                TlsSetupError::ClientKey {
                    problem: format!("no usable PEM private key ({e})"),
                }
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsSetupError::ClientKey {
                    problem: format!(
                        "does not match the client certificate or is unsupported: {e}"
                    ),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = b.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // rustls keeps tickets in memory by default; one config serves every reconnect, so the
    // cache outlives a connection.
    if !b.tls_resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let err = |problem: String| TlsSetupError::CaFile {
        path: path.to_owned(),
        problem,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("contains no PEM certificates".into()));
    }
    Ok(roots)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let err = |problem: String| TlsSetupError::ClientCert {
        path: path.to_owned(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if chain.is_empty() {
        return Err(err("contains no PEM certificates".into()));
    }
    Ok(chain)
}

/// Standard WebPKI verification against the pinned roots, but always for the configured name
/// rather than whatever address the socket was opened to.
#[derive(Debug)]
struct PinnedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for PinnedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
