//! `gateway`: see `gateway --help` and the crate documentation.

use std::process::ExitCode;

use clap::Parser;
use services::config::exit_code;
use services::{shutdown, telemetry};

// Every event the gateway sends is allocated on a reader task and freed on the connection task
// that sent it; glibc's allocator pays for each such cross-thread free (10–15 % of the gateway's
// CPU in a catch-up profile). mimalloc frees them into the owning thread's heap cheaply.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = gateway::Config::parse();
    if let Err(e) = telemetry::init(&config.log.log_level) {
        return exit_code(Err(e));
    }
    exit_code(gateway::run(config, shutdown::on_signals()).await)
}
