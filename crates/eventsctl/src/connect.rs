//! Connections, configured exactly as the services configure theirs (`event_store::db`:
//! keepalives, timeouts, errors that never echo a password), plus the start-up check that the
//! schema is there and the role may do what the command needs.

use std::time::Duration;

use anyhow::Context;
use event_store::db;
use event_store::migrations::{self, Role};
use mongodb::options::ClientOptions;
use tokio_postgres::Client;

use crate::cli::Cli;

/// A PostgreSQL connection for `role`'s work, checked like a service checks at start-up.
pub async fn postgres(cli: &Cli, role: Role) -> anyhow::Result<Client> {
    let config = db::config(&cli.postgres.database_url, "eventsctl")?;
    let client = db::connect_spawned(&config).await?;
    migrations::check(&client, role).await?;
    Ok(client)
}

/// The consumers' MongoDB database, when MONGODB_URI is set.
pub async fn mongo(cli: &Cli) -> anyhow::Result<Option<mongodb::Database>> {
    let Some(uri) = cli.mongodb_uri.as_deref() else {
        return Ok(None);
    };
    Ok(Some(mongo_database(uri, &cli.mongodb_database).await?))
}

/// The consumers' MongoDB database; an error naming MONGODB_URI when it is not set.
pub async fn mongo_required(cli: &Cli, why: &str) -> anyhow::Result<mongodb::Database> {
    match cli.mongodb_uri.as_deref() {
        Some(uri) => mongo_database(uri, &cli.mongodb_database).await,
        None => Err(crate::exit::usage(format!(
            "{why}: set MONGODB_URI (or --mongodb-uri) to the consumers' MongoDB"
        ))),
    }
}

async fn mongo_database(uri: &str, database: &str) -> anyhow::Result<mongodb::Database> {
    let mut options = ClientOptions::parse(uri).await.map_err(|e| {
        crate::exit::usage(format!(
            "MONGODB_URI is not a valid MongoDB connection string ({}); expected e.g. \
             mongodb://host:27017/?replicaSet=rs0",
            event_store::redact::scrub(&e.to_string(), uri)
        ))
    })?;
    if options.app_name.is_none() {
        options.app_name = Some("eventsctl".into());
    }
    // An operator waits for an answer: a server that cannot be reached is an error in seconds,
    // not after the driver's 30 s default.
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(Duration::from_secs(5));
    }
    if options.connect_timeout.is_none() {
        options.connect_timeout = Some(Duration::from_secs(5));
    }
    let hosts: Vec<String> = options.hosts.iter().map(|h| h.to_string()).collect();
    let client = mongodb::Client::with_options(options).context("MONGODB_URI cannot be used")?;
    let db = client.database(database);
    db.run_command(mongodb::bson::doc! {"ping": 1})
        .await
        .with_context(|| {
            format!(
                "cannot reach MongoDB at {} — is it running? check MONGODB_URI",
                hosts.join(",")
            )
        })?;
    Ok(db)
}
