//! `eventsctl lag`: how far behind each consumer is, as a check for cron jobs and health probes —
//! exit 1 when a consumer is over a threshold.

use std::time::Duration;

use event_store::event::validate_name;
use event_store::migrations::Role;
use serde::Serialize;
use services::config::parse_duration;

use crate::cli::Cli;
use crate::consumers::{self, Standing, COUNT_CAP};
use crate::exit::{self, Code};
use crate::{connect, output};

/// Show how far behind consumers are; exit 1 when one is over --fail-above-events or
/// --fail-above-seconds.
///
/// Lag is measured from the position each consumer publishes to PostgreSQL after every batch:
/// events past it (counted along the position index) and the age of the oldest of them.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl lag
  eventsctl lag orders-to-mongo --fail-above-events 10000 --fail-above-seconds 5m || page-someone

Exit codes: 0 within the thresholds, 1 over one, 2 unknown consumer or bad option, 4 failed.")]
pub struct Args {
    /// Only this consumer (default: every consumer that has published a position)
    pub consumer: Option<String>,

    /// Exit 1 when a consumer has more than this many events to deliver
    #[arg(long = "fail-above-events")]
    pub fail_above_events: Option<u64>,

    /// Exit 1 when a consumer's oldest undelivered event is older than this (e.g. 30s, 5m)
    #[arg(long = "fail-above-seconds", value_parser = parse_duration)]
    pub fail_above_seconds: Option<Duration>,
}

#[derive(Debug, Serialize)]
struct Report {
    consumers: Vec<Line>,
    /// True when any consumer is over a threshold (the exit code is then 1).
    over: bool,
}

#[derive(Debug, Serialize)]
struct Line {
    #[serde(flatten)]
    standing: Standing,
    /// Which thresholds it is over.
    over: Vec<String>,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    if let Some(name) = &args.consumer {
        validate_name(name)
            .map_err(|why| exit::usage(format!("bad consumer name {name:?}: {why}")))?;
    }
    // Every consumer's position: the owner, or a purger login (consumer logins see only their own).
    let client = connect::postgres(cli, Role::Purger).await?;
    // Count at least one past the event threshold, so "over" is exact however large it is.
    let cap = args.fail_above_events.map_or(COUNT_CAP, |n| {
        i64::try_from(n.saturating_add(1))
            .unwrap_or(i64::MAX)
            .max(COUNT_CAP)
    });
    let standings = consumers::standings(&client, args.consumer.as_deref(), cap).await?;
    if let Some(name) = &args.consumer {
        if standings.is_empty() {
            return Err(exit::usage(format!(
                "no consumer named {name:?} has published a position (it has never run against \
                 this database); `eventsctl status` lists the consumers"
            )));
        }
    }
    let lines: Vec<Line> = standings
        .into_iter()
        .map(|standing| {
            let mut over = Vec::new();
            if let Some(n) = args.fail_above_events {
                if standing.lag_events > 0 && standing.lag_events as u64 > n {
                    over.push(format!("events {} > {n}", standing.lag_text()));
                }
            }
            if let Some(limit) = args.fail_above_seconds {
                if standing.lag_seconds > limit.as_secs_f64() {
                    over.push(format!(
                        "age {} > {}",
                        consumers::seconds(standing.lag_seconds),
                        output::age(limit)
                    ));
                }
            }
            Line { standing, over }
        })
        .collect();
    let over = lines.iter().any(|l| !l.over.is_empty());
    let report = Report {
        consumers: lines,
        over,
    };
    if cli.json {
        output::json(&report)?;
    } else {
        let rows: Vec<Vec<String>> = report
            .consumers
            .iter()
            .map(|l| {
                vec![
                    l.standing.consumer.clone(),
                    l.standing.lag_text(),
                    consumers::seconds(l.standing.lag_seconds),
                    l.standing.position.to_string(),
                    if l.over.is_empty() {
                        "ok".into()
                    } else {
                        format!("OVER: {}", l.over.join(", "))
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(&["CONSUMER", "EVENTS", "AGE", "POSITION", "CHECK"], &rows)
        );
    }
    Ok(if over { Code::OverThreshold } else { Code::Ok })
}
