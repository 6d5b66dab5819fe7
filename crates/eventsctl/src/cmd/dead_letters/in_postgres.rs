//! Dead letters kept in PostgreSQL (`sink_dead_letters`), by consumers whose sink has no store of
//! its own (webhooks).
//!
//! Replay cannot be done from here: only the consumer holds the receiver's URL and signing
//! secret. `replay` marks the rows; the consumer sends each marked event again (read anew from
//! `events`, alone in a request) and removes the row once the receiver took it, or records the
//! new refusal. `replay --wait` waits for that and reports each outcome.

use std::time::{Duration, Instant};

use event_store::migrations::Role;
use event_store::sink_state::{self, DeadLetterFilter, StoredDeadLetter};
use serde::Serialize;

use super::{report, Action, Outcome, Selection};
use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::{connect, output};

#[derive(Debug, Serialize)]
struct Listed<'a> {
    id: i64,
    position: String,
    consumer: &'a str,
    topic: Option<&'a str>,
    reason: &'a str,
    detail: &'a str,
    payload_bytes: i64,
    first_seen_at: String,
    replay_requested: bool,
}

fn listed(l: &StoredDeadLetter) -> Listed<'_> {
    Listed {
        id: l.position.id,
        position: l.position.to_string(),
        consumer: &l.consumer,
        topic: l.topic.as_deref(),
        reason: &l.reason,
        detail: &l.detail,
        payload_bytes: l.payload_bytes,
        first_seen_at: output::time(l.first_seen_at),
        replay_requested: l.replay_requested,
    }
}

pub async fn run(cli: &Cli, action: &Action) -> anyhow::Result<Code> {
    let client = connect::postgres(cli, Role::Consumer).await?;
    match action {
        Action::List(filter) => {
            let letters = sink_state::dead_letters(
                &client,
                &DeadLetterFilter {
                    consumer: filter.consumer.as_deref(),
                    reason: filter.reason.as_deref(),
                    limit: filter.limit.max(1),
                    ..DeadLetterFilter::default()
                },
            )
            .await?;
            if cli.json {
                output::json(&letters.iter().map(listed).collect::<Vec<_>>())?;
                return Ok(Code::Ok);
            }
            if letters.is_empty() {
                println!("no dead letters in PostgreSQL (set MONGODB_URI for the MongoDB sink's)");
                return Ok(Code::Ok);
            }
            let rows: Vec<Vec<String>> = letters
                .iter()
                .map(|l| {
                    vec![
                        l.position.id.to_string(),
                        l.position.to_string(),
                        l.consumer.clone(),
                        l.topic.clone().unwrap_or_else(|| "-".into()),
                        l.reason.clone(),
                        output::bytes(l.payload_bytes),
                        output::time(l.first_seen_at),
                        if l.replay_requested { "requested" } else { "-" }.into(),
                    ]
                })
                .collect();
            let headers = [
                "ID",
                "POSITION",
                "CONSUMER",
                "TOPIC",
                "REASON",
                "PAYLOAD",
                "FIRST SEEN",
                "REPLAY",
            ];
            print!("{}", output::table(&headers, &rows));
            Ok(Code::Ok)
        }
        Action::Show { id } => {
            let letters = select_ids(&client, None, &[*id]).await?;
            if cli.json {
                output::json(&letters.iter().map(listed).collect::<Vec<_>>())?;
                return Ok(Code::Ok);
            }
            for l in &letters {
                println!(
                    "event {} at {} (consumer {})",
                    l.position.id, l.position, l.consumer
                );
                println!(
                    "  event_id: {}",
                    l.event_id.map_or("-".into(), |u| u.to_string())
                );
                println!("  topic:    {}", l.topic.as_deref().unwrap_or("-"));
                println!("  key:      {}", l.key.as_deref().unwrap_or("-"));
                println!("  reason:   {}", l.reason);
                println!("  detail:   {}", l.detail);
                println!("  first seen: {}", output::time(l.first_seen_at));
                let cut = if l.payload_truncated {
                    " (truncated)"
                } else {
                    ""
                };
                println!("  payload ({}{cut}):", output::bytes(l.payload_bytes));
                println!("{}", l.payload_text);
            }
            Ok(Code::Ok)
        }
        Action::Replay(selection) => replay(cli, &client, selection).await,
        Action::Discard(selection) => {
            let letters = selected(&client, selection).await?;
            let mut outcomes = Vec::new();
            for l in &letters {
                let result = if selection.dry_run {
                    "would discard"
                } else if sink_state::remove_dead_letter(&client, &l.consumer, l.position.id)
                    .await?
                {
                    "discarded"
                } else {
                    "no dead letter"
                };
                outcomes.push(Outcome {
                    id: l.position.id,
                    result: result.into(),
                    detail: Some(format!("consumer {}", l.consumer)),
                });
            }
            report(cli, &outcomes)
        }
    }
}

async fn replay(
    cli: &Cli,
    client: &tokio_postgres::Client,
    selection: &Selection,
) -> anyhow::Result<Code> {
    let letters = selected(client, selection).await?;
    let mut outcomes = Vec::new();
    for l in &letters {
        if !selection.dry_run {
            sink_state::request_replay(client, &l.consumer, l.position.id).await?;
        }
        outcomes.push(Outcome {
            id: l.position.id,
            result: if selection.dry_run {
                "would request replay"
            } else {
                "replay requested"
            }
            .into(),
            detail: Some(format!("consumer {} sends it again", l.consumer)),
        });
    }
    if selection.dry_run || selection.wait.is_none() {
        return report(cli, &outcomes);
    }
    // --wait: the consumer removes the row once the receiver took the event, or records a new
    // refusal (which clears the request).
    let limit = selection.wait.unwrap_or_default();
    let deadline = Instant::now() + limit;
    loop {
        let mut pending = 0;
        for (l, outcome) in letters.iter().zip(outcomes.iter_mut()) {
            let now = sink_state::dead_letters(
                client,
                &DeadLetterFilter {
                    consumer: Some(&l.consumer),
                    ids: &[l.position.id],
                    limit: 1,
                    ..DeadLetterFilter::default()
                },
            )
            .await?;
            match now.first() {
                None => {
                    outcome.result = "replayed".into();
                    outcome.detail = None;
                }
                Some(row) if row.replay_requested => pending += 1,
                Some(row) => {
                    outcome.result = "still refused".into();
                    outcome.detail = Some(row.detail.clone());
                }
            }
        }
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            for (l, outcome) in letters.iter().zip(outcomes.iter_mut()) {
                if outcome.result == "replay requested" {
                    outcome.result = "no answer yet".into();
                    outcome.detail = Some(format!(
                        "consumer {} has not sent it within {}; is it running? The request \
                         stays",
                        l.consumer,
                        humantime::format_duration(limit)
                    ));
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report(cli, &outcomes)
}

async fn selected(
    client: &tokio_postgres::Client,
    selection: &Selection,
) -> anyhow::Result<Vec<StoredDeadLetter>> {
    if selection.all {
        return Ok(sink_state::dead_letters(
            client,
            &DeadLetterFilter {
                consumer: selection.consumer.as_deref(),
                limit: i64::MAX,
                ..DeadLetterFilter::default()
            },
        )
        .await?);
    }
    select_ids(client, selection.consumer.as_deref(), &selection.ids).await
}

/// The dead letters of `ids` (of every consumer, or of `consumer`); each id must have one.
async fn select_ids(
    client: &tokio_postgres::Client,
    consumer: Option<&str>,
    ids: &[i64],
) -> anyhow::Result<Vec<StoredDeadLetter>> {
    let found = sink_state::dead_letters(
        client,
        &DeadLetterFilter {
            consumer,
            ids,
            limit: i64::MAX,
            ..DeadLetterFilter::default()
        },
    )
    .await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.iter().any(|l| l.position.id == **id))
        .map(|id| id.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(exit::usage(format!(
            "no dead letter in PostgreSQL for event(s) {}; `eventsctl dead-letters list` shows \
             them (set MONGODB_URI for the MongoDB sink's)",
            missing.join(", ")
        )));
    }
    Ok(found)
}
