//! Ephemeral certificates for the simulator, the demo and the tests: a CA, a broker
//! certificate and client certificates, written as PEM files into a directory at run time.
//! Nothing here is ever committed; every run makes its own keys.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Paths of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that writes PEM files into a directory.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).expect("write CA");
        Ca {
            issuer,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate valid for `names` (DNS names or IP addresses).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> CertFiles {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("names");
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file_stem, params)
    }

    /// A client certificate whose CN is `common_name` (brokers use it as the username).
    pub fn client(&self, common_name: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name.to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&format!("{}-client-{common_name}", self.name), params)
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        crate::storage::write_atomic(&files.key, key.serialize_pem().as_bytes(), 0o600)
            .expect("write key");
        files
    }
}
