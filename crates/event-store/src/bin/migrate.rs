//! `migrate`: applies the embedded schema to `DATABASE_URL` and exits. Idempotent.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use event_store::config::{exit_code, LogArgs, PostgresArgs};
use event_store::{db, migrations, telemetry};

/// Applies the event stream's schema (tables, indexes, group roles) to the database in
/// DATABASE_URL. Run it as the database owner; running it again is a no-op.
#[derive(Debug, Parser)]
#[command(name = "migrate", version)]
struct Args {
    #[command(flatten)]
    postgres: PostgresArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    exit_code(run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    telemetry::init(&args.log.log_level)?;
    let config = db::config(&args.postgres.database_url, "events-migrate")?;
    let mut client = db::connect_spawned(&config).await?;
    let outcome = migrations::run(&mut client)
        .await
        .with_context(|| format!("migrating {}", db::describe(&config)))?;
    let version = outcome.version.unwrap_or(0);
    if outcome.applied.is_empty() {
        println!("schema already up to date (version {version})");
    } else {
        println!(
            "applied {} (schema now at version {version})",
            outcome.applied.join(", ")
        );
    }
    Ok(())
}
