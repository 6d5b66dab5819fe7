//! `purger`: see the crate documentation and `purger --help`.

use std::process::ExitCode;

use clap::Parser;
use services::config::exit_code;
use services::{shutdown, telemetry};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = purger::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    let summary = purger::run(config, shutdown::on_signals()).await;
    exit_code(summary.map(|summary| println!("{summary}")))
}
