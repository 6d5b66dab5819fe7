//! Why a certificate check failed, in words that name the fix. Apart from [`crate::tls`] (which
//! builds the checks) because the error report needs it too, and the error module is what every
//! other module builds on.

use rustls::CertificateError;

/// Why a TLS handshake failed, when it was the certificate check: walks the error's causes to the
/// rustls error (tokio-rustls wraps it in an `io::Error`).
pub fn verification_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return match tls {
                rustls::Error::InvalidCertificate(reason) => Some(describe_certificate(reason)),
                _ => None,
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    if let rustls::Error::InvalidCertificate(reason) = tls {
                        return Some(describe_certificate(reason));
                    }
                    return None;
                }
            }
        }
        cause = e.source();
    }
    None
}

fn describe_certificate(reason: &CertificateError) -> String {
    match reason {
        CertificateError::UnknownIssuer => "the server's certificate is not signed by a CA in \
             sslrootcert (unknown issuer): set sslrootcert to the CA that signed it"
            .into(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "the server's certificate is not valid for the host name in DATABASE_URL \
                 ({reason:?}): connect by a name the certificate lists, or use sslmode=verify-ca \
                 to check the CA only"
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the server's certificate has expired: renew it on the server".into()
        }
        other => format!("the server's certificate was refused ({other:?})"),
    }
}
