//! `consumer`: see `consumer --help` and the crate documentation.

use std::process::ExitCode;

use clap::Parser;
use event_store::config::exit_code;
use event_store::{shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = consumer::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    exit_code(
        consumer::run(config, shutdown::on_signals())
            .await
            .map_err(Into::into),
    )
}
