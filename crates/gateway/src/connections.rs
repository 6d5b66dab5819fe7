//! TCP connections before they are requests: the accept loop, caps on connections (in total,
//! `--max-connections`, and per client IP address, `--max-connections-per-address`), the
//! header-read timeout (`--header-read-timeout`, also the idle keep-alive timeout), and the
//! open-file limit they need.
//!
//! Why not `axum::serve`: it keeps every accepted connection for as long as the client likes, so a
//! few hundred idle or half-sent connections use up the process's file descriptors, and then
//! `/healthz` and real streams time out. Here a connection past a cap is closed as soon as it is
//! accepted, and one that has not sent a complete request head within the timeout is closed by
//! hyper (the timer runs from the connection's start and again from the end of each response,
//! while the connection waits for its next request; a stream being answered is not affected).
//!
//! A connection holds a [`Held`] place for as long as it is open. A WebSocket leaves hyper when it
//! is upgraded, so the handler keeps the place (it is in the request's extensions) for as long as
//! the socket lives: every open file of a client counts against the caps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Files the process needs besides client connections: the listener, database connections,
/// standard streams, the runtime's own. Generous, so the estimate errs on the safe side.
pub const RESERVED_FILES: u64 = 64;

/// The connection caps.
pub struct Caps {
    total: usize,
    per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    Address,
}

/// One open connection's place (a clone per request, so an upgraded WebSocket keeps it).
#[derive(Clone)]
pub struct Held(#[allow(dead_code)] Arc<Place>);

pub struct Place {
    caps: Arc<Caps>,
    ip: IpAddr,
}

impl Caps {
    pub fn new(total: usize, per_address: usize) -> Arc<Caps> {
        Arc::new(Caps {
            total: total.max(1),
            per_address: per_address.max(1),
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for one more connection from `ip`.
    pub fn admit(self: &Arc<Caps>, ip: IpAddr) -> Result<Held, Refused> {
        let mut open = self.open.lock().unwrap();
        if open.0 >= self.total {
            return Err(Refused::Total);
        }
        let mine = open.1.entry(ip).or_insert(0);
        if *mine >= self.per_address {
            return Err(Refused::Address);
        }
        *mine += 1;
        open.0 += 1;
        Ok(Held(Arc::new(Place {
            caps: self.clone(),
            ip,
        })))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap().0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().unwrap();
        open.0 = open.0.saturating_sub(1);
        if let Some(mine) = open.1.get_mut(&self.ip) {
            *mine -= 1;
            if *mine == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Makes room for `max_connections` in the open-file limit (RLIMIT_NOFILE): raises the soft limit
/// towards the hard one when it is too low, and returns the connection cap that fits (lower than
/// asked, with a warning, when even the hard limit is too low).
pub fn fit_file_limit(max_connections: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let needed = max_connections.saturating_add(RESERVED_FILES);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    if soft == RLIM_INFINITY || soft >= needed {
        return max_connections;
    }
    let target = if hard == RLIM_INFINITY {
        needed
    } else {
        needed.min(hard)
    };
    let soft = match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(error) => {
            warn!(%error, soft, hard, "Cannot raise the open-file limit.");
            soft
        }
    };
    if soft >= needed {
        debug!(soft, "Raised the open-file limit to fit --max-connections.");
        return max_connections;
    }
    let fits = soft.saturating_sub(RESERVED_FILES).max(1);
    warn!(
        max_connections,
        open_file_limit = soft,
        using = fits,
        "The open-file limit (ulimit -n, RLIMIT_NOFILE) cannot hold --max-connections; lowering the \
         cap to fit. Raise the hard limit (e.g. `ulimit -Hn`, LimitNOFILE=, docker --ulimit nofile=) \
         or lower GATEWAY_MAX_CONNECTIONS."
    );
    fits
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, asks every connection to
/// finish its current response, and returns when they have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    caps: Arc<Caps>,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of files (EMFILE) or a connection reset before accept: wait a little
                    // instead of spinning, and keep serving what is open.
                    warn!(%error, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let held = match caps.admit(peer.ip()) {
            Ok(held) => held,
            Err(refused) => {
                debug!(peer = %peer.ip(), ?refused, "Closing a connection past a cap.");
                drop(stream);
                continue;
            }
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let place = held.clone();
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(place.clone());
                    let mut router = router.clone();
                    async move {
                        tower_service::Service::call(&mut router, request.map(Body::new)).await
                    }
                });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        debug!(%error, "A connection ended with an error.");
                    }
                    return;
                }
                _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
            drop(held);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_free_on_drop() {
        let caps = Caps::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = caps.admit(a).unwrap();
        let second = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).err(), Some(Refused::Address));
        let third = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).err(), Some(Refused::Total));
        let clone = first.clone();
        drop(first);
        assert_eq!(
            caps.open(),
            3,
            "a clone (an upgraded WebSocket) keeps the place"
        );
        drop(clone);
        assert_eq!(caps.open(), 2);
        caps.admit(a).unwrap();
        drop((second, third));
    }

    #[test]
    fn the_file_limit_fits_the_cap() {
        use nix::sys::resource::{getrlimit, Resource};
        let fits = fit_file_limit(100);
        assert_eq!(fits, 100);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(soft >= 100 + RESERVED_FILES);
        let huge = fit_file_limit(u64::MAX / 2);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(huge <= soft, "lowered to what the hard limit allows");
    }
}
