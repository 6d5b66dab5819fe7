//! `purger`: see the crate documentation and `purger --help`.

use std::process::ExitCode;

use clap::Parser;
use event_store::config::exit_code;
use event_store::{shutdown, telemetry};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = purger::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    let summary = purger::run(config, shutdown::on_signals()).await;
    exit_code(summary.map(|summary| println!("{summary}")))
}
