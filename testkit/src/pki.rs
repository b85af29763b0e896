//! Certificates made at test time: a CA the broker and the agents trust, and the broker's
//! certificate. Everything goes into the test's own temporary directory.

use std::path::Path;

use tempfile::TempDir;

pub use texture_agent::sim::pki::{Ca, CertFiles};

/// The name on the broker's certificate.
pub const BROKER_NAME: &str = "broker.texture.test";

/// Everything one test needs: a directory, the trusted CA, and the broker's certificate.
pub struct Pki {
    pub dir: TempDir,
    pub ca: Ca,
    pub server: CertFiles,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "trusted");
        let server = ca.server("broker", &[BROKER_NAME, "localhost", "127.0.0.1"]);
        Pki { dir, ca, server }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}
