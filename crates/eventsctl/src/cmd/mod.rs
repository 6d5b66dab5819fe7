//! One module per subcommand: its clap `Args` (options, `--help` text with an example) and its
//! `run`. Adding a subcommand is a new module here plus one line in [`crate::cli::Command`] and
//! one in [`run`].

pub mod append;
pub mod backfill;
pub mod capture;
pub mod dead_letters;
pub mod group;
pub mod lag;
pub mod reset;
pub mod status;
pub mod tail;
pub mod verify;

use crate::cli::{Cli, Command};
use crate::exit::Code;

/// Runs the chosen subcommand; `Ok` carries the exit code of a command that ran to its end
/// (`lag` exits 1 when over a threshold).
pub async fn run(cli: Cli) -> anyhow::Result<Code> {
    match &cli.command {
        Command::Status(args) => status::run(&cli, args).await,
        Command::Lag(args) => lag::run(&cli, args).await,
        Command::Reset(args) => reset::run(&cli, args).await,
        Command::Tail(args) => tail::run(&cli, args).await,
        Command::Append(args) => append::run(&cli, args).await,
        Command::DeadLetters(args) => dead_letters::run(&cli, args).await,
        Command::Capture(args) => capture::run(&cli, args).await,
        Command::Group(args) => group::run(&cli, args).await,
    }
}
