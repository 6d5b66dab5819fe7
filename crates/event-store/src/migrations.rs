//! The schema, embedded from `migrations/` at the repository root, and the start-up check each
//! service runs before doing any work.

use refinery::Target;
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

/// The role prefix `migrate` uses unless told otherwise: roles `events_producer`,
/// `events_consumer`, `events_purger`.
pub const DEFAULT_ROLE_PREFIX: &str = "events";

/// [`run_with`] with the [default prefix](DEFAULT_ROLE_PREFIX).
pub async fn run(client: &mut Client) -> Result<Applied> {
    run_with(client, DEFAULT_ROLE_PREFIX).await
}

/// Applies every pending migration, then (re)grants this database's group roles
/// `<role_prefix>_producer`, `_consumer` and `_purger` exactly (migration V4's
/// `events_grant_roles`). Idempotent: a second run applies nothing and grants the same. Run it as
/// the database owner (it creates tables and roles), never as a service role.
///
/// Fails when roles of that prefix already hold privileges in another database of the cluster:
/// each database's stream needs roles of its own (see docs/security.md).
pub async fn run_with(client: &mut Client, role_prefix: &str) -> Result<Applied> {
    // V5 and V6 hand functions to the role events_capture (ALTER FUNCTION … OWNER TO), which
    // PostgreSQL allows a migrator that is not a superuser only when the new owner may create in
    // the functions' schema. So: up to V4, then (if V5 or V6 is still to come) that role may
    // create in the schema of `events` for the rest of this run. events_grant_roles (V7) takes it
    // back, with the migrator's membership in the role (V5 grants it); so does a failed run.
    // Before anything else (the grants would quietly restore an owner or an ACL someone
    // changed), and after the grants, which must leave everything as V9 describes it.
    check_capture_functions(client).await?;
    let mut applied = migrate_to(client, Target::Version(4)).await?;
    prepare_capture_handover(client).await?;
    let rest = async {
        applied.extend(migrate_to(client, Target::Latest).await?);
        client
            .execute("SELECT events_grant_roles($1)", &[&role_prefix])
            .await
            .map_err(|e| {
                Error::database(format!("grant the roles of prefix {role_prefix:?}"), e)
            })?;
        check_capture_functions(client).await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(error) = rest {
        undo_capture_handover(client).await;
        return Err(error);
    }
    let version = embedded::migrations::runner()
        .get_last_applied_migration_async(client)
        .await?
        .map(|m| m.version());
    Ok(Applied { applied, version })
}

/// Applies the pending migrations up to `target`; their names.
async fn migrate_to(client: &mut Client, target: Target) -> Result<Vec<String>> {
    let report = embedded::migrations::runner()
        .set_target(target)
        .run_async(client)
        .await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// After a failed run: takes back what [`prepare_capture_handover`] and V5 gave (best effort; a
/// successful run's events_grant_roles does the same).
async fn undo_capture_handover(client: &Client) {
    let undone = client
        .batch_execute(
            "DO $$
             DECLARE
                 s name;
             BEGIN
                 IF to_regclass('events') IS NULL
                    OR NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'events_capture') THEN
                     RETURN;
                 END IF;
                 SELECT n.nspname INTO s
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = 'events'::regclass;
                 EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA %I FROM events_capture', s);
                 IF pg_catalog.pg_has_role(current_user, 'events_capture', 'MEMBER')
                    AND NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                     REVOKE events_capture FROM CURRENT_USER;
                 END IF;
             END
             $$",
        )
        .await;
    if let Err(error) = undone {
        tracing::warn!(error = %crate::error::pg_report(&error),
                       "Could not take back the capture role's CREATE on the events schema after the failed migration.");
    }
}

/// Lets the role that V5 and V6 make the owner of their functions create in the schema of
/// `events`, when either is still to be applied (see [`run_with`]).
async fn prepare_capture_handover(client: &Client) -> Result<()> {
    client
        .batch_execute(
            "DO $$
             DECLARE
                 s name;
             BEGIN
                 IF to_regclass('events') IS NULL
                    OR (SELECT max(version) FROM refinery_schema_history) >= 6 THEN
                     RETURN;
                 END IF;
                 IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'events_capture') THEN
                     CREATE ROLE events_capture NOLOGIN;
                 END IF;
                 SELECT n.nspname INTO s
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = 'events'::regclass;
                 IF NOT pg_catalog.has_schema_privilege('events_capture', s, 'CREATE') THEN
                     EXECUTE pg_catalog.format('GRANT CREATE ON SCHEMA %I TO events_capture', s);
                 END IF;
             END
             $$",
        )
        .await
        .map_err(|e| Error::database("prepare the capture functions' owner", e))
}

/// Fails when a capture function (the SECURITY DEFINER triggers and the helpers they call) or
/// the capture role differs from what the migrations made it (V9's `capture_check()`): another
/// owner, SECURITY INVOKER, other settings, more roles allowed to execute it, a changed trigger
/// body, or an object the capture role owns or a grant it holds beyond its functions. Any of these
/// means someone changed them outside `migrate`; nothing is repaired, the error names each one.
/// A schema older than V9 has nothing to check.
pub async fn check_capture_functions(client: &Client) -> Result<()> {
    let present: bool = client
        .query_one("SELECT to_regprocedure('capture_check()') IS NOT NULL", &[])
        .await
        .map_err(|e| Error::database("look for the capture functions' check", e))?
        .get(0);
    if !present {
        return Ok(());
    }
    let rows = client
        .query("SELECT object, problem FROM capture_check()", &[])
        .await
        .map_err(|e| Error::database("check the capture functions", e))?;
    if rows.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = rows
        .iter()
        .map(|row| format!("{} {}", row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect();
    Err(Error::Schema(format!(
        "the capture functions were changed outside `migrate`: {}; someone with the capture \
         role's or a superuser's rights did this, so treat the database as tampered with (see the \
         README, Security: capture), restore the functions as a superuser and run `migrate` again",
        problems.join("; ")
    )))
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

/// What a role must be able to do: `(kind, object, privilege)`. Tables are checked per column
/// where the privilege allows column-level grants (producers and the purger hold those).
const TABLE: &str = "table";
const FUNCTION: &str = "function";

impl Role {
    fn needs(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Role::Producer => &[(TABLE, "events", "INSERT")],
            Role::Consumer => &[
                (TABLE, "events", "SELECT"),
                (TABLE, "consumer_positions", "INSERT"),
                (TABLE, "consumer_positions", "UPDATE"),
                (TABLE, "purge_watermark", "SELECT"),
                (FUNCTION, "events_horizon_blocker()", "EXECUTE"),
                (TABLE, "consumer_groups", "INSERT"),
                (TABLE, "consumer_group_members", "INSERT"),
                (TABLE, "consumer_group_partitions", "UPDATE"),
            ],
            Role::Gateway => &[
                (TABLE, "events", "SELECT"),
                (TABLE, "purge_watermark", "SELECT"),
            ],
            Role::Purger => &[
                (TABLE, "events", "DELETE"),
                (TABLE, "events", "SELECT"),
                (TABLE, "consumer_positions", "SELECT"),
                (TABLE, "purge_watermark", "INSERT"),
                (TABLE, "purge_watermark", "UPDATE"),
            ],
        }
    }

    /// `producer`, `consumer`, `purger`: the job's name in `event_stream_roles` and in messages.
    pub fn job(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            // The gateway reads like a consumer (and needs less): it runs as a consumer login.
            Role::Consumer | Role::Gateway => "consumer",
            Role::Purger => "purger",
        }
    }
}

/// This database's group role for `role` (from `event_stream_roles`; V2's `events_<job>` on an
/// older schema).
pub async fn group_role(client: &Client, role: Role) -> Result<String> {
    let row = client
        .query_one(
            "SELECT CASE WHEN to_regclass('event_stream_roles') IS NOT NULL
                         THEN (SELECT r.role::text FROM event_stream_roles r WHERE r.job = $1) END",
            &[&role.job()],
        )
        .await
        .map_err(|e| Error::database("look up the group roles", e))?;
    Ok(row
        .get::<_, Option<String>>(0)
        .unwrap_or_else(|| format!("{DEFAULT_ROLE_PREFIX}_{}", role.job())))
}

/// The schema version recorded by refinery, as far as this login may read it.
async fn schema_version(client: &Client) -> Result<Option<i32>> {
    let row = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL,
                    to_regclass('refinery_schema_history') IS NOT NULL
                      AND has_table_privilege(current_user, 'refinery_schema_history', 'SELECT')",
            &[],
        )
        .await
        .map_err(|e| Error::database("check the schema version", e))?;
    let (exists, readable): (bool, bool) = (row.get(0), row.get(1));
    if !exists {
        return Ok(None);
    }
    if !readable {
        // V4 lets everyone read the history: the schema is older than that.
        return Ok(Some(0));
    }
    let row = client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .map_err(|e| Error::database("read the schema version", e))?;
    Ok(Some(row.get::<_, Option<i32>>(0).unwrap_or(0)))
}

/// Fails with an actionable message when the schema is missing or older than this binary, or the
/// connected login lacks a privilege `role` needs. Services call it at start-up: bad configuration
/// is reported once, clearly, instead of as a retry loop of permission errors.
pub async fn check(client: &Client, role: Role) -> Result<()> {
    let needed = latest_version();
    let job = role.job();
    match schema_version(client).await? {
        None => {
            return Err(Error::Schema(format!(
                "the schema is not migrated; run `migrate` with DATABASE_URL pointing at the same \
                 database (as its owner): this {job} needs V{needed}"
            )))
        }
        Some(0) => {
            return Err(Error::Schema(format!(
                "schema older than V4 (its version is not readable by this login), this {job} \
                 needs V{needed}: run `migrate` with DATABASE_URL pointing at the same database \
                 (as its owner)"
            )));
        }
        Some(version) if version < needed => {
            return Err(Error::Schema(format!(
                "schema at V{version}, this {job} needs V{needed}: run `migrate` with DATABASE_URL \
                 pointing at the same database (as its owner)"
            )))
        }
        Some(_) => {}
    }
    check_capture_functions(client).await?;
    for (kind, object, privilege) in role.needs() {
        let sql = if *kind == FUNCTION {
            "SELECT to_regprocedure($1) IS NOT NULL,
                    to_regprocedure($1) IS NOT NULL
                      AND has_function_privilege(current_user, to_regprocedure($1), $2),
                    current_user::text"
        } else {
            "SELECT to_regclass($1) IS NOT NULL,
                    to_regclass($1) IS NOT NULL
                      AND CASE WHEN $2 = 'DELETE'
                               THEN has_table_privilege(current_user, to_regclass($1), $2)
                               ELSE has_any_column_privilege(current_user, to_regclass($1), $2)
                          END,
                    current_user::text"
        };
        let row = client
            .query_one(sql, &[object, privilege])
            .await
            .map_err(|e| Error::database("check the schema and privileges", e))?;
        let (exists, allowed, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
        if !exists {
            return Err(Error::Schema(format!(
                "{kind} {object:?} does not exist: the schema is not migrated; run `migrate` with \
                 DATABASE_URL pointing at the same database (as its owner)"
            )));
        }
        if !allowed {
            let group = group_role(client, role).await?;
            return Err(Error::Privilege(format!(
                "role {user:?} lacks {privilege} on {object:?}; grant it this database's {job} \
                 group role: GRANT {group} TO \"{user}\""
            )));
        }
    }
    Ok(())
}
