//! The schema, embedded from `migrations/` at the repository root, and the start-up check each
//! service runs before doing any work.

use tokio_postgres::Client;

use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Names of the migrations applied now (`V1__events`, …); empty when already up to date.
    pub applied: Vec<String>,
    /// The schema version afterwards.
    pub version: Option<i32>,
}

/// Applies every pending migration. Idempotent: a second run applies nothing. Run it as the
/// database owner (it creates tables and roles), never as a service role.
pub async fn run(client: &mut Client) -> Result<Applied> {
    let report = embedded::migrations::runner().run_async(client).await?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    let version = embedded::migrations::runner()
        .get_last_applied_migration_async(client)
        .await?
        .map(|m| m.version());
    Ok(Applied { applied, version })
}

/// The newest migration this binary knows.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// The job a service does, and therefore the privileges it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
    Purger,
    /// Reads events and the purge watermark, writes nothing (the live-push gateway).
    Gateway,
}

impl Role {
    /// `(table, privilege)` pairs, checked per column where the privilege allows
    /// column-level grants (producers hold those).
    fn needs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Role::Producer => &[("events", "INSERT")],
            Role::Consumer => &[
                ("events", "SELECT"),
                ("consumer_positions", "INSERT"),
                ("consumer_positions", "UPDATE"),
                ("purge_watermark", "SELECT"),
            ],
            Role::Gateway => &[("events", "SELECT"), ("purge_watermark", "SELECT")],
            Role::Purger => &[
                ("events", "DELETE"),
                ("consumer_positions", "SELECT"),
                ("purge_watermark", "INSERT"),
                ("purge_watermark", "UPDATE"),
            ],
        }
    }

    fn group(self) -> &'static str {
        match self {
            Role::Producer => "events_producer",
            Role::Consumer | Role::Gateway => "events_consumer",
            Role::Purger => "events_purger",
        }
    }
}

/// Fails with an actionable message when the schema is missing or the connected role lacks a
/// privilege `role` needs. Services call it at start-up: bad configuration is reported once,
/// clearly, instead of as a retry loop of permission errors.
pub async fn check(client: &Client, role: Role) -> Result<()> {
    for (table, privilege) in role.needs() {
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL,
                        to_regclass($1) IS NOT NULL
                          AND CASE WHEN $2 = 'DELETE'
                                   THEN has_table_privilege(current_user, to_regclass($1), $2)
                                   ELSE has_any_column_privilege(current_user, to_regclass($1), $2)
                              END,
                        current_user::text",
                &[table, privilege],
            )
            .await
            .map_err(|e| Error::database("check the schema and privileges", e))?;
        let (exists, allowed, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
        if !exists {
            return Err(Error::Schema(format!(
                "table {table:?} does not exist: the schema is not migrated; run `migrate` with \
                 DATABASE_URL pointing at the same database (as its owner)"
            )));
        }
        if !allowed {
            return Err(Error::Privilege(format!(
                "role {user:?} lacks {privilege} on {table:?}; grant it the group role: \
                 GRANT {} TO \"{user}\"",
                role.group()
            )));
        }
    }
    Ok(())
}
