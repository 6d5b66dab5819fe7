//! `eventsctl`: see the crate documentation (`src/lib.rs`) and `eventsctl --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    eventsctl::main(eventsctl::cli::Cli::parse())
}
