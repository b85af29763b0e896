//! OCPP security profile 2: the central system's port speaks TLS (`wss://`), with the
//! certificate and key from the driver's entry, and rustls on the agent's one crypto provider
//! (*ring*). Chargers authenticate as in profile 1, with HTTP Basic inside the TLS session.
//! Loading is separate from serving so `check-config` finds a bad file before a charger does.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::settings::OcppSettings;

/// The TLS acceptor of a driver with `tls_cert_file` and `tls_key_file`, or none for plain
/// `ws://`. The message names the driver and the file (never the key's path, which like the
/// broker's key path is kept out of messages).
pub(crate) fn acceptor(settings: &OcppSettings) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) else {
        return Ok(None);
    };
    let name = &settings.name;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("driver {name}: tls_cert_file {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "driver {name}: tls_cert_file {}: contains no PEM certificates",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key.expose())
        .map_err(|e| format!("driver {name}: tls_key_file: no usable PEM private key ({e})"))?;
    let config = ServerConfig::builder_with_provider(crate::link::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("driver {name}: TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "driver {name}: tls_key_file does not match tls_cert_file or is unsupported: {e}"
            )
        })?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::drivers::ocpp::settings::tests::settings;

    #[test]
    fn bad_files_are_named_and_a_mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::sim::pki::Ca::new(dir.path(), "ocpp");
        let good = ca.server("hub", &["localhost"]);
        let other = ca.server("other", &["localhost"]);
        let with = |cert: &std::path::Path, key: &std::path::Path| OcppSettings {
            tls_cert_file: Some(cert.to_owned()),
            tls_key_file: Some(Secret::new(key.to_owned())),
            ..settings()
        };
        assert!(
            acceptor(&settings()).unwrap().is_none(),
            "no TLS configured"
        );
        assert!(acceptor(&with(&good.cert, &good.key)).unwrap().is_some());
        let missing = dir.path().join("missing.pem");
        let e = acceptor(&with(&missing, &good.key)).err().unwrap();
        assert!(
            e.starts_with(&format!(
                "driver garage: tls_cert_file {}",
                missing.display()
            )),
            "{e}"
        );
        let e = acceptor(&with(&good.key, &good.key)).err().unwrap();
        assert!(e.contains("contains no PEM certificates"), "{e}");
        let e = acceptor(&with(&good.cert, &good.cert)).err().unwrap();
        assert!(e.contains("tls_key_file: no usable PEM private key"), "{e}");
        assert!(
            !e.contains(&good.cert.display().to_string()),
            "the key's path stays out: {e}"
        );
        let e = acceptor(&with(&good.cert, &other.key)).err().unwrap();
        assert!(e.contains("does not match"), "{e}");
    }
}
