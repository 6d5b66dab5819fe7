//! Certificates made at test time (rcgen): a CA, a server certificate it signs, and CAs that sign
//! nothing, for the TLS tests. Nothing is committed to the repository and nothing outlives a test.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A throwaway CA (PEM), with the key to sign server certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("generate a CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-sign the CA"),
        }
    }

    /// The CA certificate, PEM: what a client's `sslrootcert` names.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// A server certificate for `names` (host names or IP addresses) and its private key (PEM).
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "testbed server");
        let key = KeyPair::generate().expect("generate a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the server certificate");
        (cert.pem(), key.serialize_pem())
    }
}
