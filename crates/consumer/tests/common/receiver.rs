//! A real webhook receiver on loopback (hyper, optionally TLS), written the way the docs tell
//! receivers to be written: it checks every signature itself (HMAC-SHA256 over "<t>.<body>"),
//! records what it accepted with the request's idempotency key, and misbehaves on request
//! (server errors, stalls past the sender's timeout, 429 with Retry-After, 422 for marked events).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use sha2::Sha256;

/// How the receiver misbehaves (each a share of requests, 0.0–1.0).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer 500/502/503.
    pub server_errors: f64,
    /// Sleep this long before answering 200 (past the sender's timeout: the sender gives up,
    /// the receiver still counts the request as accepted — like a real slow receiver).
    pub stalls: f64,
    pub stall_for: Duration,
    /// Answer 429 with `Retry-After: 1`.
    pub throttles: f64,
    /// Refuse (422) any request that holds an event whose payload has `"refuse": true`.
    pub refuse_marked: bool,
    /// Answer this status to everything (e.g. 401).
    pub always: Option<u16>,
}

/// One accepted request.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub key: String,
    /// The events' ids, in the body's order.
    pub ids: Vec<i64>,
    /// Their positions as sent ("tx/id").
    pub positions: Vec<String>,
}

#[derive(Default)]
struct State {
    accepted: Vec<Accepted>,
    /// Requests whose signature did not verify (must stay 0).
    bad_signatures: usize,
    refused: usize,
    requests: usize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    faults: Arc<Mutex<Faults>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Plain HTTP on a free loopback port.
    pub async fn start(secret: &str, faults: Faults) -> Receiver {
        Receiver::start_with(secret, faults, None).await
    }

    /// HTTPS with a certificate for 127.0.0.1 and localhost from `ca`.
    pub async fn start_tls(secret: &str, faults: Faults, ca: &testbed::Ca) -> Receiver {
        let (cert, key) = ca.server_cert(&["127.0.0.1", "localhost"]);
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Receiver::start_with(
            secret,
            faults,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(
        secret: &str,
        faults: Faults,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let faults = Arc::new(Mutex::new(faults));
        let secret: Arc<[u8]> = secret.as_bytes().into();
        let task = {
            let (state, faults) = (state.clone(), faults.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (state, faults, secret, tls) =
                        (state.clone(), faults.clone(), secret.clone(), tls.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            handle(request, state.clone(), faults.clone(), secret.clone())
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                            Some(tls) => {
                                if let Ok(stream) = tls.accept(stream).await {
                                    let _ =
                                        http.serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                        }
                    });
                }
            })
        };
        Receiver {
            addr,
            state,
            faults,
            task,
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/hooks/events", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.state.lock().unwrap().accepted.clone()
    }

    pub fn bad_signatures(&self) -> usize {
        self.state.lock().unwrap().bad_signatures
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    pub fn refused(&self) -> usize {
        self.state.lock().unwrap().refused
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    faults: Arc<Mutex<Faults>>,
    secret: Arc<[u8]>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (signature, key) = (header("pgevents-signature"), header("idempotency-key"));
    let body = request.into_body().collect().await.unwrap().to_bytes();
    state.lock().unwrap().requests += 1;
    let answer = |status: u16, text: &str| {
        let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok(response)
    };
    // The documented check: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>.
    if !verify(&secret, &signature, &body) {
        state.lock().unwrap().bad_signatures += 1;
        return answer(401, "bad signature");
    }
    let faults = faults.lock().unwrap().clone();
    if let Some(status) = faults.always {
        return answer(status, "configured answer");
    }
    let parsed: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
    let events = parsed["events"]
        .as_array()
        .expect("an events array")
        .clone();
    if faults.refuse_marked && events.iter().any(|e| e["payload"]["refuse"] == true) {
        state.lock().unwrap().refused += 1;
        return answer(422, "{\"error\":\"this event is not acceptable\"}");
    }
    let roll: f64 = rand::rng().random();
    if roll < faults.server_errors {
        let status = [500, 502, 503][rand::rng().random_range(0..3)];
        return answer(status, "try again later");
    }
    if roll < faults.server_errors + faults.throttles {
        let mut response = Response::new(Full::new(Bytes::from_static(b"slow down")));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
            .headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        return Ok(response);
    }
    let accepted = Accepted {
        key,
        ids: events.iter().map(|e| e["id"].as_i64().unwrap()).collect(),
        positions: events
            .iter()
            .map(|e| e["position"].as_str().unwrap().to_string())
            .collect(),
    };
    if roll < faults.server_errors + faults.throttles + faults.stalls {
        // Accepted, but answered too late: the sender times out and sends it again.
        state.lock().unwrap().accepted.push(accepted);
        tokio::time::sleep(faults.stall_for).await;
        return answer(200, "ok, eventually");
    }
    state.lock().unwrap().accepted.push(accepted);
    answer(204, "")
}

fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(sent) = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sent).is_ok()
}
