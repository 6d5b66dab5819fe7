//! The `producer` binary; everything it does lives in the library (`producer::service`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = producer::Args::parse();
    services::config::exit_code(producer::service::main(args).await)
}
