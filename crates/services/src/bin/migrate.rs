//! `migrate`: applies the embedded schema to `DATABASE_URL` and exits. Idempotent.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use event_store::{db, migrations};
use services::config::{exit_code, LogArgs, PostgresArgs};
use services::telemetry;

/// Applies the event stream's schema (tables, indexes, group roles) to the database in
/// DATABASE_URL, and grants this database's group roles <prefix>_producer, <prefix>_consumer,
/// <prefix>_purger, <prefix>_capture and <prefix>_capture_admin exactly what each job needs. Run it as the database owner; running it again
/// changes nothing.
#[derive(Debug, Parser)]
#[command(name = "migrate", version)]
struct Args {
    #[command(flatten)]
    postgres: PostgresArgs,
    /// Prefix of this database's group roles (<prefix>_producer, _consumer, _purger, _capture,
    /// _capture_admin). Roles are
    /// cluster-wide, so every database of a cluster that holds an event stream needs its own
    /// prefix (e.g. the database name); migrate refuses roles that already hold privileges in
    /// another database. Lower-case letters, digits and _.
    #[arg(long, env = "EVENTS_ROLE_PREFIX", default_value = migrations::DEFAULT_ROLE_PREFIX)]
    role_prefix: String,

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
    let outcome = migrations::run_with(&mut client, &args.role_prefix)
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
    println!(
        "group roles: {0}_producer, {0}_consumer, {0}_purger; table-change capture: \
         {0}_capture_admin (grant it to the owners of tables to capture)",
        args.role_prefix
    );
    Ok(())
}
