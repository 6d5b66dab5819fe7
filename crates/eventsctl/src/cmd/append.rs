//! `eventsctl append`: one event from the shell, through the producer library — the same
//! validation, the same statement and the same wake-up as an application's append.

use std::io::Read;
use std::path::PathBuf;

use event_store::migrations::Role;
use event_store::{NewEvent, Topic};
use producer::Producer;
use serde::Serialize;
use services::config::ChannelArgs;
use uuid::Uuid;

use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::{connect, output};

/// Append one event. The payload is JSON: given inline, read from a file, or from stdin (`-`).
/// Consumers are woken on the NOTIFY channel in the appending transaction.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl append --topic orders --key 42 --type created --payload '{\"total\": 9.5}'
  eventsctl append --topic orders --payload-file order.json
  echo '{\"n\": 1}' | eventsctl append --topic orders -
  eventsctl append --topic orders --event-id 5f0c…  --payload '{}'   # idempotent retries")]
#[command(group(clap::ArgGroup::new("source").required(true).args(["payload", "payload_file", "stdin"])))]
pub struct Args {
    /// The event's topic (letters, digits, '_', '.', '-')
    #[arg(long = "topic")]
    pub topic: String,

    /// The event's key (e.g. the entity it is about)
    #[arg(long = "key")]
    pub key: Option<String>,

    /// The event's type
    #[arg(long = "type")]
    pub event_type: Option<String>,

    /// The payload as JSON text
    #[arg(long = "payload", value_name = "JSON")]
    pub payload: Option<String>,

    /// Read the payload (JSON) from this file
    #[arg(long = "payload-file", value_name = "FILE")]
    pub payload_file: Option<PathBuf>,

    /// `-`: read the payload (JSON) from stdin
    #[arg(value_name = "-", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    pub stdin: Option<String>,

    /// Headers as a JSON object
    #[arg(long = "headers", value_name = "JSON")]
    pub headers: Option<String>,

    /// The event's unique id (a UUID): appending the same one again appends nothing (idempotent)
    #[arg(long = "event-id")]
    pub event_id: Option<Uuid>,

    #[command(flatten)]
    pub channel: ChannelArgs,
}

#[derive(Debug, Serialize)]
struct Appended {
    id: i64,
    event_id: Uuid,
    topic: String,
    /// False when an event with this event_id was stored already (nothing was appended).
    appended: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    let event = event(args)?;
    let channel = args.channel.notify_channel.clone();
    let client = connect::postgres(cli, Role::Producer).await?;
    let producer = Producer::in_transaction(channel);
    let result = match producer.append(&client, std::slice::from_ref(&event)).await {
        Ok(receipts) => Appended {
            id: receipts[0].id,
            event_id: receipts[0].event_id,
            topic: event.topic.to_string(),
            appended: true,
        },
        Err(e) if e.is_duplicate() => {
            let event_id = event
                .event_id
                .expect("a duplicate has a caller-given event_id");
            let row = client
                .query_one("SELECT id FROM events WHERE event_id = $1", &[&event_id])
                .await?;
            Appended {
                id: row.get(0),
                event_id,
                topic: event.topic.to_string(),
                appended: false,
            }
        }
        Err(e) if e.is_invalid() => return Err(exit::usage(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    if cli.json {
        output::json(&result)?;
    } else if result.appended {
        println!(
            "appended event {} to topic {} (id {})",
            result.event_id, result.topic, result.id
        );
    } else {
        println!(
            "event {} is already stored (id {}): nothing appended",
            result.event_id, result.id
        );
    }
    Ok(Code::Ok)
}

/// The event to append, validated before any connection is made.
fn event(args: &Args) -> anyhow::Result<NewEvent> {
    let topic = Topic::new(args.topic.as_str()).map_err(|e| exit::usage(e.to_string()))?;
    let text = match (&args.payload, &args.payload_file, &args.stdin) {
        (Some(text), _, _) => text.clone(),
        (_, Some(path), _) if path.as_os_str() == "-" => read_stdin()?,
        (_, Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
            exit::usage(format!(
                "cannot read --payload-file {}: {e}",
                path.display()
            ))
        })?,
        _ => read_stdin()?,
    };
    let mut event =
        NewEvent::from_json_text(topic, &text).map_err(|e| exit::usage(e.to_string()))?;
    if let Some(key) = &args.key {
        event = event.with_key(key.as_str());
    }
    if let Some(t) = &args.event_type {
        event = event.with_type(t.as_str());
    }
    if let Some(headers) = &args.headers {
        let headers: serde_json::Value = serde_json::from_str(headers)
            .map_err(|e| exit::usage(format!("--headers is not valid JSON: {e}")))?;
        if !headers.is_object() {
            return Err(exit::usage("--headers must be a JSON object"));
        }
        event = event.with_headers(headers);
    }
    if let Some(id) = args.event_id {
        event = event.with_event_id(id);
    }
    Ok(event)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| exit::usage(format!("cannot read the payload from stdin: {e}")))?;
    Ok(text)
}
