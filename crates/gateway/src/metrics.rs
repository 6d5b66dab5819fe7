//! The gateway's Prometheus metrics (served at `/metrics`).

use std::time::SystemTime;

use event_store::Position;
use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

/// Handles to every series (created once; recording is then a cheap atomic update).
#[derive(Clone)]
pub struct Metrics {
    pub clients: Gauge,
    events_sent: Counter,
    dropped_slow: Counter,
    closed_shutdown: Counter,
    closed_age: Counter,
    live_fetches: Counter,
    catch_up_fetches: Counter,
    wakeups: Counter,
    refused_limit: Counter,
    refused_auth: Counter,
    gaps: Counter,
    head_tx_id: Gauge,
    head_id: Gauge,
    commit_to_send: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        // Handles made before the recorder exists would record nothing.
        services::ops::metrics();
        describe();
        Metrics {
            clients: metrics::gauge!("gateway_clients"),
            events_sent: metrics::counter!("gateway_events_sent_total"),
            dropped_slow: metrics::counter!("gateway_clients_closed_total", "reason" => "slow_client"),
            closed_shutdown: metrics::counter!("gateway_clients_closed_total", "reason" => "shutdown"),
            closed_age: metrics::counter!("gateway_clients_closed_total", "reason" => "max_age"),
            live_fetches: metrics::counter!("gateway_fetches_total", "reader" => "live"),
            catch_up_fetches: metrics::counter!("gateway_fetches_total", "reader" => "catch_up"),
            wakeups: metrics::counter!("gateway_wakeups_total"),
            refused_limit: metrics::counter!("gateway_refused_total", "reason" => "limit"),
            refused_auth: metrics::counter!("gateway_refused_total", "reason" => "auth"),
            gaps: metrics::counter!("gateway_gaps_total"),
            head_tx_id: metrics::gauge!("gateway_head_tx_id"),
            head_id: metrics::gauge!("gateway_head_id"),
            commit_to_send: metrics::histogram!("gateway_commit_to_send_seconds"),
        }
    }

    pub fn fetch(&self, live: bool) {
        if live {
            self.live_fetches.increment(1)
        } else {
            self.catch_up_fetches.increment(1)
        }
    }

    pub fn wakeup(&self) {
        self.wakeups.increment(1)
    }

    pub fn head(&self, head: Position) {
        self.head_tx_id.set(head.tx_id as f64);
        self.head_id.set(head.id as f64);
    }

    /// An event handed to a client's connection.
    pub fn sent(&self, created_at: SystemTime) {
        self.events_sent.increment(1);
        if let Ok(lag) = SystemTime::now().duration_since(created_at) {
            self.commit_to_send.record(lag.as_secs_f64());
        }
    }

    /// Stored events handed to a catching-up client's connection (counted; their age is not
    /// the stream's latency, so they stay out of the commit-to-send summary).
    pub fn sent_stored(&self) {
        self.events_sent.increment(1);
    }

    pub fn closed(&self, reason: &str) {
        match reason {
            "slow_client" => self.dropped_slow.increment(1),
            "shutdown" => self.closed_shutdown.increment(1),
            "max_age" => self.closed_age.increment(1),
            _ => {}
        }
    }

    pub fn refused(&self, limit: bool) {
        if limit {
            self.refused_limit.increment(1)
        } else {
            self.refused_auth.increment(1)
        }
    }

    pub fn gap(&self) {
        self.gaps.increment(1)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn describe() {
    describe_gauge!(
        "gateway_clients",
        Unit::Count,
        "Streams open now (SSE and WebSocket)."
    );
    describe_counter!(
        "gateway_events_sent_total",
        Unit::Count,
        "Events handed to client connections (each client counts)."
    );
    describe_counter!(
        "gateway_clients_closed_total",
        Unit::Count,
        "Streams the gateway closed with a goodbye, by reason (slow_client, shutdown, max_age)."
    );
    describe_counter!(
        "gateway_fetches_total",
        Unit::Count,
        "Database fetches: `live` by the one shared reader, `catch_up` for clients reading stored events."
    );
    describe_counter!(
        "gateway_wakeups_total",
        Unit::Count,
        "Live fetches started by a NOTIFY wake-up (bursts count once)."
    );
    describe_counter!(
        "gateway_refused_total",
        Unit::Count,
        "Streams refused: `auth` (401/403) or `limit` (503, --max-clients or per token)."
    );
    describe_counter!(
        "gateway_gaps_total",
        Unit::Count,
        "Gap messages sent: a client's events were purged before it got them."
    );
    describe_gauge!(
        "gateway_head_tx_id",
        "The live reader's position: transaction id."
    );
    describe_gauge!("gateway_head_id", "The live reader's position: event id.");
    describe_histogram!(
        "gateway_commit_to_send_seconds",
        Unit::Seconds,
        "From an event's created_at (its transaction's start) to its hand-over to a client connection."
    );
}
