//! `gateway`: see `gateway --help` and the crate documentation.

use std::process::ExitCode;

use clap::Parser;
use services::config::exit_code;
use services::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = gateway::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    exit_code(gateway::run(config, shutdown::on_signals()).await)
}
