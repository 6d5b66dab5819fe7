//! The dedicated PostgreSQL connection: it LISTENs for wake-ups and runs the position queries.
//!
//! This is the one place that owns that connection. Its `Connection` half is driven here, by a
//! task of our own that polls [`Connection::poll_message`], because notifications only surface
//! that way (a connection that is merely spawned drops them). Every notification, whatever its
//! payload — garbage included, since anyone who can connect may NOTIFY — does one thing: it stores
//! a wake-up permit in a shared [`Notify`]. A burst of notifications therefore becomes a single
//! permit and a single fetch. Nothing ever trusts or parses a payload.
//!
//! LISTEN runs on the same connection as the fetches and completes before [`Listener::connect`]
//! returns, so the first catch-up fetch can never miss an event that commits in between: either
//! the fetch sees it, or its notification arrives afterwards.
//!
//! TCP keepalives come from [`crate::db::config`], so a silently dead peer (a server host
//! that vanished) is noticed by the socket, not only by the next query.

use std::sync::Arc;

use crate::db;
use crate::db::Database;
use futures_util::future::poll_fn;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// A live LISTEN connection. Dropping it closes the connection.
pub struct Listener {
    client: Client,
    closed: CancellationToken,
    driver: JoinHandle<()>,
}

impl Listener {
    /// Connects, starts driving the connection, and LISTENs on `channel`. Notifications wake
    /// `wake`; so does the connection's end, so a waiting loop notices it at once.
    pub async fn connect(config: &Database, channel: &str, wake: Arc<Notify>) -> Result<Listener> {
        let (client, mut connection) = db::connect(config).await?;
        let closed = CancellationToken::new();
        let driver = tokio::spawn({
            let closed = closed.clone();
            async move {
                loop {
                    match poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                        Some(Ok(AsyncMessage::Notice(notice))) => {
                            tracing::debug!(notice = %notice, "PostgreSQL notice.");
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            tracing::warn!(%error, "The LISTEN connection to PostgreSQL broke.");
                            break;
                        }
                        None => {
                            tracing::warn!("The LISTEN connection to PostgreSQL closed.");
                            break;
                        }
                    }
                }
                closed.cancel();
                wake.notify_one();
            }
        });
        let listener = Listener {
            client,
            closed,
            driver,
        };
        listener
            .client
            .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
            .await
            .map_err(|e| crate::Error::database(format!("LISTEN on channel {channel:?}"), e))?;
        Ok(listener)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Has the connection ended (server gone, backend terminated, network failure)?
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.client.is_closed()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A channel name as a quoted identifier (LISTEN takes no bind parameters).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn channel_names_are_quoted() {
        assert_eq!(super::quote_ident("events"), "\"events\"");
        assert_eq!(super::quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
