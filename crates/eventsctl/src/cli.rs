//! The command line. Every option has a doc comment (it becomes `--help`) and the connection
//! options have the same environment variables as the services, so `eventsctl` runs with a
//! consumer's environment as it is.

use clap::{Parser, Subcommand};
use services::config::PostgresArgs;

use crate::cmd;

/// The operator's tool for the event stream: consumer status and lag, resets, tail and append,
/// and table-change capture.
///
/// It reads DATABASE_URL and MONGODB_URI like the services. Read commands print a table, or JSON
/// with --json. Logins: the database owner may do everything; otherwise status and lag need one
/// that reads every consumer's position (the purger's group role), reset the consumer's own login,
/// tail a consumer login and append a producer login; capture add/remove the table's owner, a
/// member of the capture admin role (events_capture_admin with the default role prefix).
#[derive(Debug, Parser)]
#[command(name = "eventsctl", version, after_help = crate::exit::HELP)]
pub struct Cli {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// MongoDB connection string of the consumers' sink, e.g. mongodb://mongo:27017/?replicaSet=rs0.
    /// Needed by reset (it moves the checkpoint); status uses it for checkpoints and dead letters
    #[arg(
        long = "mongodb-uri",
        env = "MONGODB_URI",
        hide_env_values = true,
        global = true
    )]
    pub mongodb_uri: Option<String>,

    /// MongoDB database holding the consumers' `checkpoints` collection (the consumers' --mongodb-database)
    #[arg(
        long = "mongodb-database",
        env = "MONGODB_DATABASE",
        default_value = "consumer",
        global = true
    )]
    pub mongodb_database: String,

    /// Print JSON instead of a table (one document; `tail` always prints JSON lines)
    #[arg(long = "json", global = true)]
    pub json: bool,

    /// Log filter for diagnostics on stderr: a level (error, warn, info, debug, trace) or directives
    #[arg(
        long = "log-level",
        env = "EVENTSCTL_LOG_LEVEL",
        default_value = "warn",
        global = true
    )]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Status(cmd::status::Args),
    Lag(cmd::lag::Args),
    Reset(cmd::reset::Args),
    Tail(cmd::tail::Args),
    Append(cmd::append::Args),
    #[command(name = "dead-letters")]
    DeadLetters(cmd::dead_letters::Args),
    Capture(cmd::capture::Args),
    Group(cmd::group::Args),
}
