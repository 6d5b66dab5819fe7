//! `gateway`: see `gateway --help` and the crate documentation.

use std::process::ExitCode;

use clap::Parser;
use event_store::config::exit_code;
use event_store::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = gateway::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    exit_code(gateway::run(config, shutdown::on_signals()).await)
}
