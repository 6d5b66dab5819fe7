//! Table-change capture: row changes of your own tables become events, in the same transaction.
//!
//! The work happens in PostgreSQL (migration `V5__capture.sql`): `capture_add` attaches
//! statement-level triggers with transition tables to a table, and every INSERT, UPDATE, DELETE or
//! TRUNCATE statement then appends one event per changed row with a single `INSERT … SELECT`. The
//! SQL functions are the interface (call them from your own migrations); this module wraps them for
//! programs and `eventsctl capture`, validating input before anything is sent and turning the
//! database's refusals into errors that say what to do.
//!
//! ```no_run
//! # async fn demo(client: &tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use event_store::capture::{self, CaptureSpec, Op};
//! use event_store::Topic;
//!
//! let spec = CaptureSpec::new("sales.\"Order Items\"", Topic::new("order-items")?)
//!     .ops(&[Op::Insert, Op::Update, Op::Delete])
//!     .exclude_columns(["card_number"])?;
//! capture::add(client, &spec).await?;
//! for captured in capture::list(client).await? {
//!     println!("{} → {}", captured.table, captured.topic);
//! }
//! # Ok(()) }
//! ```
//!
//! Names travel as bound parameters, never spliced into SQL; PostgreSQL resolves the table name
//! as it would in your own SQL (`orders`, `sales.orders`, `"Order Items"`) and quotes every
//! identifier it puts into the trigger definitions with `format('%I')`.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use crate::event::Topic;

/// PostgreSQL's identifier limit (NAMEDATALEN − 1 bytes); longer names are silently truncated by
/// the server, which would make a column name match a different column than the user meant.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A row operation that can be captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = CaptureError;
    fn from_str(s: &str) -> Result<Op, CaptureError> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                CaptureError::Invalid(format!(
                    "unknown operation {s:?}: use insert, update, delete or truncate"
                ))
            })
    }
}

/// What to capture, validated on construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    table: String,
    topic: Topic,
    ops: Vec<Op>,
    exclude_columns: Vec<String>,
    key_columns: Vec<String>,
    full_old: bool,
}

impl CaptureSpec {
    /// `table` as you would write it in SQL: `orders`, `sales.orders`, `"Order Items"`. All four
    /// operations, the primary key as the key, no excluded columns, no full old row.
    pub fn new(table: impl Into<String>, topic: Topic) -> CaptureSpec {
        CaptureSpec {
            table: table.into(),
            topic,
            ops: Op::ALL.to_vec(),
            exclude_columns: Vec::new(),
            key_columns: Vec::new(),
            full_old: false,
        }
    }

    pub fn ops(mut self, ops: &[Op]) -> CaptureSpec {
        let mut ops = ops.to_vec();
        ops.sort();
        ops.dedup();
        self.ops = ops;
        self
    }

    /// Columns that never appear in any event (by column, not by name: a later rename keeps them
    /// out). Names are exact, case included, as in `pg_attribute` (unquoted).
    pub fn exclude_columns<S: Into<String>>(
        mut self,
        columns: impl IntoIterator<Item = S>,
    ) -> Result<CaptureSpec, CaptureError> {
        self.exclude_columns = column_list(columns, "excluded")?;
        Ok(self)
    }

    /// The columns that identify a row; required when the table has no primary key.
    pub fn key_columns<S: Into<String>>(
        mut self,
        columns: impl IntoIterator<Item = S>,
    ) -> Result<CaptureSpec, CaptureError> {
        self.key_columns = column_list(columns, "key")?;
        Ok(self)
    }

    /// Updates also carry the whole row as it was, under `old`.
    pub fn full_old(mut self, full_old: bool) -> CaptureSpec {
        self.full_old = full_old;
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    fn validate(&self) -> Result<(), CaptureError> {
        validate_table_name(&self.table)?;
        if self.ops.is_empty() {
            return Err(CaptureError::Invalid(
                "capture needs at least one operation (insert, update, delete, truncate)".into(),
            ));
        }
        if let Some(both) = self
            .key_columns
            .iter()
            .find(|c| self.exclude_columns.contains(c))
        {
            return Err(CaptureError::Invalid(format!(
                "column {both:?} is both a key column and excluded: every event carries its key"
            )));
        }
        Ok(())
    }
}

fn column_list<S: Into<String>>(
    columns: impl IntoIterator<Item = S>,
    what: &str,
) -> Result<Vec<String>, CaptureError> {
    let mut out: Vec<String> = Vec::new();
    for column in columns {
        let column = column.into();
        if column.is_empty() {
            return Err(CaptureError::Invalid(format!(
                "an empty {what} column name was given"
            )));
        }
        if column.len() > MAX_IDENTIFIER_BYTES || column.contains('\0') {
            return Err(CaptureError::Invalid(format!(
                "{what} column {column:?} is not a PostgreSQL identifier (at most {MAX_IDENTIFIER_BYTES} bytes, no NUL)"
            )));
        }
        if out.contains(&column) {
            return Err(CaptureError::Invalid(format!(
                "{what} column {column:?} is named twice"
            )));
        }
        out.push(column);
    }
    Ok(out)
}

/// A table name as SQL text: non-empty, no NUL, not absurdly long (schema + table, quoted).
/// PostgreSQL does the real parsing (`to_regclass`), from a bound parameter.
pub(crate) fn validate_table_name(table: &str) -> Result<(), CaptureError> {
    if table.trim().is_empty() {
        return Err(CaptureError::Invalid("the table name is empty".into()));
    }
    if table.contains('\0') || table.len() > 2 * (MAX_IDENTIFIER_BYTES * 2 + 2) + 1 {
        return Err(CaptureError::Invalid(format!(
            "{table:?} is not a table name: write it as in SQL, e.g. orders, sales.orders or \"Order Items\""
        )));
    }
    Ok(())
}

/// A captured table, as the triggers on it say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub schema: String,
    pub table: String,
    pub topic: String,
    pub ops: Vec<Op>,
    pub key_columns: Vec<String>,
    pub exclude_columns: Vec<String>,
    pub full_old: bool,
}

impl Captured {
    /// `schema.table`, each part quoted when SQL needs it.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

/// Quotes an identifier the way PostgreSQL's `quote_ident` does for display (lower-case ASCII
/// letters, digits and `_`, not starting with a digit, stay bare; keywords are not recognised).
/// Display only: SQL sent to the server never splices names.
pub fn quote_ident(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Why capture could not be set up, listed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The input was refused before anything was sent.
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL refused, for a reason the caller can fix (`hint` says how).
    #[error("{message}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Refused {
        code: SqlState,
        message: String,
        hint: Option<String>,
    },
    /// Anything else: connection trouble, an unexpected server error.
    #[error(transparent)]
    Store(#[from] crate::Error),
}

impl CaptureError {
    /// The SQLSTATE PostgreSQL answered with, if it refused.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            CaptureError::Refused { code, .. } => Some(code),
            CaptureError::Store(e) => e.code(),
            CaptureError::Invalid(_) => None,
        }
    }

    /// `admin`: this database's capture admin role, for hints.
    pub(crate) fn from_db(what: &str, error: tokio_postgres::Error, admin: &str) -> CaptureError {
        let Some(db) = error.as_db_error() else {
            return crate::Error::database(what, error).into();
        };
        let code = db.code().clone();
        if code == SqlState::UNDEFINED_FUNCTION && db.message().contains("capture_") {
            return crate::Error::Schema(format!(
                "{what}: the capture functions are missing: the schema predates capture; run \
                 `migrate` (as the database owner) against this database"
            ))
            .into();
        }
        if code == SqlState::INSUFFICIENT_PRIVILEGE && db.message().contains("function capture_") {
            return CaptureError::Refused {
                code,
                message: format!("{what}: {}", db.message()),
                hint: Some(format!(
                    "capture is managed by members of {admin}: GRANT {admin} TO <the table's \
                     owner>, and connect as that owner"
                )),
            };
        }
        let fixable = [
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_COLUMN,
            SqlState::DUPLICATE_OBJECT,
            SqlState::INVALID_PARAMETER_VALUE,
            SqlState::WRONG_OBJECT_TYPE,
            SqlState::INVALID_NAME,
            SqlState::SYNTAX_ERROR,
            // Backfills: NULL keys, an unfinished backfill with another condition, a table that
            // is not captured, a bad --where.
            SqlState::NULL_VALUE_NOT_ALLOWED,
            SqlState::OBJECT_IN_USE,
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::DATATYPE_MISMATCH,
            SqlState::INVALID_TEXT_REPRESENTATION,
            SqlState::NO_DATA_FOUND,
        ];
        if fixable.contains(&code) {
            CaptureError::Refused {
                code,
                message: format!("{what}: {}", db.message()),
                // V5's own hints name the default prefix's admin role.
                hint: db
                    .hint()
                    .map(|hint| hint.replace("events_capture_admin", admin)),
            }
        } else {
            crate::Error::database(what, error).into()
        }
    }
}

/// This database's capture admin role (`<prefix>_capture_admin`, recorded by `migrate`), for
/// hints; `events_capture_admin` (the default prefix's) when it cannot be read. Looked up before
/// the capture call, because a failed call aborts the caller's transaction.
pub(crate) async fn capture_admin(client: &impl GenericClient) -> String {
    client
        .query_one(
            "SELECT CASE WHEN to_regclass('event_stream_roles') IS NOT NULL
                         THEN (SELECT r.role::text FROM event_stream_roles r WHERE r.job = 'capture_admin') END",
            &[],
        )
        .await
        .ok()
        .and_then(|row| row.get::<_, Option<String>>(0))
        .unwrap_or_else(|| "events_capture_admin".into())
}

/// Starts capturing `spec.table`. Run it as the table's owner, a member of this database's
/// capture admin role (`<prefix>_capture_admin`, `events_capture_admin` by default). Capturing a table that is already captured is an error
/// ([`SqlState::DUPLICATE_OBJECT`]); [`remove`] it first to change its settings.
pub async fn add(client: &impl GenericClient, spec: &CaptureSpec) -> Result<(), CaptureError> {
    spec.validate()?;
    let ops: Vec<&str> = spec.ops.iter().map(|op| op.as_str()).collect();
    let keys: Option<&Vec<String>> = (!spec.key_columns.is_empty()).then_some(&spec.key_columns);
    let admin = capture_admin(client).await;
    client
        .execute(
            "SELECT capture_add($1::text, $2::text, $3::text[], $4::text[], $5::text[], $6::bool)",
            &[
                &spec.table,
                &spec.topic.as_str(),
                &ops,
                &spec.exclude_columns,
                &keys,
                &spec.full_old,
            ],
        )
        .await
        .map_err(|e| CaptureError::from_db(&format!("capture {}", spec.table), e, &admin))?;
    Ok(())
}

/// Stops capturing `table` (its capture triggers are dropped; the table and its data are not
/// touched). Returns whether it was captured.
pub async fn remove(client: &impl GenericClient, table: &str) -> Result<bool, CaptureError> {
    validate_table_name(table)?;
    let admin = capture_admin(client).await;
    let row = client
        .query_one("SELECT capture_remove($1::text)", &[&table])
        .await
        .map_err(|e| CaptureError::from_db(&format!("stop capturing {table}"), e, &admin))?;
    Ok(row.get(0))
}

/// Every captured table of this database, by schema and name.
pub async fn list(client: &impl GenericClient) -> Result<Vec<Captured>, CaptureError> {
    let admin = capture_admin(client).await;
    let rows = client
        .query(
            "SELECT schema_name, table_name, topic, ops, key_columns, exclude_columns, full_old
               FROM capture_list()",
            &[],
        )
        .await
        .map_err(|e| CaptureError::from_db("list captured tables", e, &admin))?;
    rows.iter()
        .map(|row| {
            let ops: Vec<String> = row.get(3);
            Ok(Captured {
                schema: row.get(0),
                table: row.get(1),
                topic: row.get(2),
                ops: ops
                    .iter()
                    .map(|op| op.parse())
                    .collect::<Result<_, CaptureError>>()?,
                key_columns: row.get::<_, Option<Vec<String>>>(4).unwrap_or_default(),
                exclude_columns: row.get(5),
                full_old: row.get(6),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> Topic {
        Topic::new("t").unwrap()
    }

    #[test]
    fn ops_parse_case_insensitively_and_refuse_unknown_ones() {
        assert_eq!("INSERT".parse::<Op>().unwrap(), Op::Insert);
        assert_eq!(" truncate".parse::<Op>().unwrap(), Op::Truncate);
        assert!(matches!(
            "upsert".parse::<Op>(),
            Err(CaptureError::Invalid(_))
        ));
    }

    #[test]
    fn column_lists_are_validated() {
        let spec = CaptureSpec::new("orders", topic());
        assert!(spec.clone().exclude_columns(["a", "B c"]).is_ok());
        for bad in [
            vec![""],
            vec!["a", "a"],
            vec![&*"x".repeat(64)],
            vec!["a\0b"],
        ] {
            assert!(
                matches!(
                    spec.clone().key_columns(bad.clone()),
                    Err(CaptureError::Invalid(_))
                ),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn a_key_column_cannot_be_excluded() {
        let spec = CaptureSpec::new("orders", topic())
            .key_columns(["id"])
            .unwrap()
            .exclude_columns(["id"])
            .unwrap();
        assert!(matches!(spec.validate(), Err(CaptureError::Invalid(_))));
    }

    #[test]
    fn table_names_must_be_plausible() {
        for bad in ["", "  ", "a\0b"] {
            assert!(validate_table_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["orders", "sales.\"Order Items\"", "\"select\""] {
            assert!(validate_table_name(ok).is_ok(), "{ok:?}");
        }
        assert!(CaptureSpec::new("t", topic()).ops(&[]).validate().is_err());
    }

    #[test]
    fn identifiers_are_quoted_for_display_like_postgres_does() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("Order Items"), "\"Order Items\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("9x"), "\"9x\"");
    }
}
