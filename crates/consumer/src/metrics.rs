//! The consumer's Prometheus metrics, every series labelled with the consumer's name (several
//! named consumers may share a process in tests, and a dashboard in production).

use std::time::Duration;

use event_store::Position;
use metrics::{describe_counter, describe_gauge, Counter, Gauge, Unit};

/// Handles to every series (created once; recording is then a cheap atomic update).
#[derive(Clone)]
pub struct Metrics {
    consumer: String,
    pub delivered: Counter,
    pub redelivered: Counter,
    pub batches: Counter,
    pub wakeups: Counter,
    pub gaps: Counter,
    pub rewinds: Counter,
    pub reconnects_postgres: Counter,
    pub reconnects_mongodb: Counter,
    pub lag_events: Gauge,
    pub lag_seconds: Gauge,
    pub position_tx_id: Gauge,
    pub position_id: Gauge,
    pub held_back_seconds: Gauge,
}

impl Metrics {
    pub fn new(consumer: &str) -> Metrics {
        // Handles made before the recorder exists would record nothing.
        services::ops::metrics();
        describe();
        let name = consumer.to_string();
        let counter = |key: &'static str| metrics::counter!(key, "consumer" => name.clone());
        let gauge = |key: &'static str| metrics::gauge!(key, "consumer" => name.clone());
        Metrics {
            consumer: name.clone(),
            delivered: counter("consumer_events_delivered_total"),
            redelivered: counter("consumer_events_redelivered_total"),
            batches: counter("consumer_batches_total"),
            wakeups: counter("consumer_wakeups_total"),
            gaps: counter("consumer_gaps_total"),
            rewinds: counter("consumer_checkpoint_rewinds_total"),
            reconnects_postgres: metrics::counter!("consumer_reconnects_total",
                "consumer" => name.clone(), "database" => "postgres"),
            reconnects_mongodb: metrics::counter!("consumer_reconnects_total",
                "consumer" => name.clone(), "database" => "mongodb"),
            lag_events: gauge("consumer_lag_events"),
            lag_seconds: gauge("consumer_lag_seconds"),
            position_tx_id: gauge("consumer_position_tx_id"),
            position_id: gauge("consumer_position_id"),
            held_back_seconds: gauge("consumer_held_back_seconds"),
        }
    }

    pub fn position(&self, position: Position) {
        self.position_tx_id.set(position.tx_id as f64);
        self.position_id.set(position.id as f64);
    }

    /// One dead letter recorded, by reason (a handful of fixed codes, so the label stays small).
    pub fn dead_letter(&self, reason: &'static str) {
        metrics::counter!("consumer_dead_letters_total",
            "consumer" => self.consumer.clone(), "reason" => reason)
        .increment(1);
    }

    pub fn held_back(&self, for_: Duration) {
        self.held_back_seconds.set(for_.as_secs_f64());
    }
}

fn describe() {
    describe_counter!(
        "consumer_events_delivered_total",
        Unit::Count,
        "Events written to the sink (re-deliveries included)."
    );
    describe_counter!(
        "consumer_events_redelivered_total",
        Unit::Count,
        "Events found already stored when written again (after a crash or a lost acknowledgement)."
    );
    describe_counter!(
        "consumer_batches_total",
        Unit::Count,
        "Batches committed to the sink, checkpoint included."
    );
    describe_counter!(
        "consumer_wakeups_total",
        Unit::Count,
        "Fetches started by a NOTIFY wake-up (bursts count once)."
    );
    describe_counter!(
        "consumer_dead_letters_total",
        Unit::Count,
        "Events that cannot be stored, recorded in the deadLetters collection instead, by reason."
    );
    describe_counter!(
        "consumer_checkpoint_rewinds_total",
        Unit::Count,
        "Times the sink's checkpoint was not where the last write left it (lost acknowledged \
         writes, or moved by an operator) and delivery went on from the checkpoint."
    );
    describe_counter!(
        "consumer_gaps_total",
        Unit::Count,
        "Purge gaps detected: events past this consumer's position were purged before delivery."
    );
    describe_counter!(
        "consumer_reconnects_total",
        Unit::Count,
        "Recoveries after a database became unreachable, by database."
    );
    describe_gauge!(
        "consumer_lag_events",
        Unit::Count,
        "Committed events past the delivered position (counted up to 100000)."
    );
    describe_gauge!(
        "consumer_lag_seconds",
        Unit::Seconds,
        "Age of the oldest committed event not yet delivered (0 when caught up)."
    );
    describe_gauge!(
        "consumer_position_tx_id",
        "The delivered position: transaction id."
    );
    describe_gauge!("consumer_position_id", "The delivered position: event id.");
    describe_gauge!(
        "consumer_held_back_seconds",
        Unit::Seconds,
        "How long committed events have waited behind an open transaction (0 when not held back)."
    );
}
