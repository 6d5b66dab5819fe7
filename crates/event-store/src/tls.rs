//! TLS for PostgreSQL connections, with libpq's `sslmode` and `sslrootcert` meanings, on rustls.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and refuses any other
//! `sslmode` or an `sslrootcert` in a connection string. Managed databases hand out URLs with
//! `sslmode=verify-full&sslrootcert=…`, so [`split`] takes both parameters out of `DATABASE_URL`
//! (URL or key=value form) before tokio-postgres parses the rest, and [`Tls`] carries them:
//!
//! | `sslmode` | TLS | certificate checked against `sslrootcert` | host name checked |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | when the server offers it | no | no |
//! | `require` | always | only when `sslrootcert` is given (as libpq does) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! `sslrootcert` names a PEM file of CA certificates (default `~/.postgresql/root.crt`, as libpq);
//! `sslrootcert=system` uses the Mozilla root set compiled into the binary (webpki-roots) and then
//! defaults `sslmode` to `verify-full`. Without verification TLS still encrypts, but anyone on the
//! path can pose as the server: use `verify-full` wherever a CA certificate can be had.
//!
//! rustls uses the ring crypto provider explicitly (no OpenSSL, no process-wide default), and the
//! connector supports SCRAM channel binding through tokio-postgres-rustls.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// libpq's `sslmode` values (`allow` is not supported: it prefers plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "sslmode={other:?} in DATABASE_URL is not supported; use one of disable, \
                     prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS half of a `DATABASE_URL`: the mode, and the connector that enforces it.
#[derive(Clone)]
pub struct Tls {
    mode: SslMode,
    /// What the server's certificate is checked against, for logs (`file …`, `system roots`).
    roots: Option<String>,
    connector: MakeRustlsConnect,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Builds the policy from the `sslmode` and `sslrootcert` values of a connection string
    /// (`None` when absent), reading the root certificates now, so that a missing or unreadable
    /// file is a start-up error rather than a failure on every connection.
    pub fn new(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Result<Tls> {
        let system = sslrootcert == Some("system");
        let mode = match sslmode {
            Some(value) => SslMode::parse(value)?,
            // libpq: sslrootcert=system makes verify-full the default.
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system && mode != SslMode::VerifyFull {
            return Err(Error::Config(format!(
                "weak sslmode={mode} may not be used with sslrootcert=system (as in libpq): use \
                 sslmode=verify-full, or name a CA file in sslrootcert"
            )));
        }
        // libpq: require with a root certificate behaves like verify-ca.
        let verify = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => sslrootcert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (verifier, roots): (Arc<dyn ServerCertVerifier>, Option<String>) = if verify {
            let (store, described) = if system {
                let store = RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                (store, "the system roots (webpki-roots)".to_string())
            } else {
                let path = match sslrootcert {
                    Some(path) => PathBuf::from(path),
                    None => default_root_cert(),
                };
                (load_roots(&path)?, format!("{}", path.display()))
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| {
                        Error::Config(format!("cannot use sslrootcert {described}: {e}"))
                    })?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { webpki })
            };
            (verifier, Some(described))
        } else {
            (
                Arc::new(Unverified {
                    provider: provider.clone(),
                }),
                None,
            )
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("cannot set up TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Tls {
            mode,
            roots,
            connector: MakeRustlsConnect::new(config),
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// What tokio-postgres should do at connection time (`verify-*` need TLS like `require`; the
    /// connector does the checking).
    pub(crate) fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }

    pub(crate) fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    /// `sslmode=verify-full (roots: /etc/ca.pem)`, for start-up logs.
    pub fn describe(&self) -> String {
        match &self.roots {
            Some(roots) => format!("sslmode={} (CA: {roots})", self.mode),
            None => format!("sslmode={}", self.mode),
        }
    }
}

/// libpq's default `sslrootcert`.
fn default_root_cert() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".postgresql").join("root.crt")
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let shown = path.display();
    if !path.exists() {
        return Err(Error::Config(format!(
            "root certificate file {shown:?} does not exist: the server's certificate cannot be \
             verified; set sslrootcert in DATABASE_URL to the CA certificate (PEM) that signed it, \
             or sslrootcert=system for a public CA"
        )));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            Error::Config(format!(
                "cannot read root certificates from sslrootcert {shown:?}: {e} (expected PEM \
                 certificates)"
            ))
        })?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::Config(format!(
            "sslrootcert {shown:?} holds no usable CA certificate (expected PEM \
             \"-----BEGIN CERTIFICATE-----\" blocks)"
        )));
    }
    Ok(store)
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to a trusted root, but
/// the name in the certificate need not match the host (libpq's meaning: useful behind a load
/// balancer or when connecting by IP address).
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last, so a name mismatch means the chain
        // itself was good.
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, not authenticated (libpq's
/// meaning). The handshake signatures are still checked, so the session key belongs to whoever
/// holds the presented certificate's key.
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connection string without its `sslmode` and `sslrootcert`, and their values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string in URL form
/// (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or key=value form
/// (`host=db sslmode=verify-full sslrootcert='/my ca.pem'`), leaving the rest as written.
pub fn split(url: &str) -> Split {
    let mut out = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => out.sslmode = Some(value),
            "sslrootcert" => out.sslrootcert = Some(value),
            _ => return false,
        }
        true
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Split {
                rest: url.to_string(),
                ..out
            };
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(&percent_decode(key), percent_decode(value))
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Split { rest, ..out };
    }
    // key=value form: cut out the spans of the pairs we take, keep every other byte as written.
    let mut rest = String::with_capacity(url.len());
    let mut kept_from = 0;
    for (start, end, key, value) in key_value_pairs(url) {
        if take(&key, value) {
            rest.push_str(&url[kept_from..start]);
            kept_from = end;
        }
    }
    rest.push_str(&url[kept_from..]);
    Split {
        rest: rest.trim().to_string(),
        ..out
    }
}

/// `(start, end, key, value)` of each `key = value` pair, with libpq's quoting (`'…'`, `\'`).
pub fn key_value_pairs(text: &str) -> Vec<(usize, usize, String, String)> {
    let bytes = text.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= bytes.len() {
            return pairs;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = text[start..i].to_string();
        skip_space(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return pairs; // malformed: tokio-postgres will say so
        }
        i += 1;
        skip_space(&mut i);
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            let mut chars = text[i..].char_indices();
            let mut closed = false;
            while let Some((offset, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            value.push(next);
                        }
                    }
                    '\'' => {
                        i += offset + 1;
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return pairs;
            }
        } else {
            let mut chars = text[i..].char_indices();
            let mut end = text.len();
            while let Some((offset, c)) = chars.next() {
                match c {
                    c if c.is_whitespace() => {
                        end = i + offset;
                        break;
                    }
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            value.push(next);
                        }
                    }
                    c => value.push(c),
                }
            }
            i = end;
        }
        pairs.push((start, i, key, value));
    }
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let s = split("postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem");
        assert_eq!(s.rest, "postgres://u:p@h:5432/db?application_name=x");
        assert_eq!(s.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(s.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        let s = split("postgresql://h/db?sslmode=require");
        assert_eq!(s.rest, "postgresql://h/db");
        let s = split("postgres://h/db");
        assert_eq!((s.rest.as_str(), s.sslmode), ("postgres://h/db", None));
    }

    #[test]
    fn key_value_parameters_are_taken_out_with_quoting() {
        let s = split("host=h sslmode = verify-ca sslrootcert='/my ca\\'s.pem' dbname=db");
        assert_eq!(s.rest, "host=h   dbname=db");
        assert_eq!(s.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(s.sslrootcert.as_deref(), Some("/my ca's.pem"));
        let s = split("host=h user=u");
        assert_eq!(s.rest, "host=h user=u");
        assert_eq!(s.sslmode, None);
    }

    #[test]
    fn modes_follow_libpq() {
        assert_eq!(Tls::new(None, None).unwrap().mode(), SslMode::Prefer);
        assert_eq!(
            Tls::new(Some("disable"), None).unwrap().pg_mode(),
            PgSslMode::Disable
        );
        assert_eq!(
            Tls::new(None, Some("system")).unwrap().mode(),
            SslMode::VerifyFull
        );
        let err = Tls::new(Some("require"), Some("system"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("weak sslmode=require"), "{err}");
        let err = Tls::new(Some("allow"), None).unwrap_err().to_string();
        assert!(err.contains("verify-full"), "{err}");
        let err = Tls::new(Some("verify-full"), Some("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("sslrootcert"),
            "{err}"
        );
        let garbage = tempfile_with("not a certificate");
        let err = Tls::new(Some("verify-ca"), Some(garbage.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable CA certificate"), "{err}");
        std::fs::remove_file(garbage).unwrap();
    }

    fn tempfile_with(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("tls-test-{}.pem", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }
}
