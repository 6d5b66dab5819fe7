//! `eventsctl`: the operator's tool for the event stream.
//!
//! Operators ask the same questions of every stream — how far behind is a consumer, what holds
//! purging back, replay the last hour into a consumer, what is flowing right now, put one event in
//! by hand — and without a tool they answer them with hand-written SQL and mongosh, which gets
//! the out-of-order-commit rules subtly wrong. This binary is glue: the positions, the no-skip
//! reading, the lease and the append all come from the library crates (`event_store`, `producer`,
//! `consumer`), so the tool reads and writes exactly as the services do.
//!
//! - [`cli`]: the command line (clap derive; each subcommand's options live in its module).
//! - [`cmd`]: one module per subcommand (`status`, `lag`, `reset`, `tail`, `append`,
//!   `dead-letters`).
//! - [`target`]: `earliest | latest | <tx_id>/<id> | <RFC 3339 time>`, shared by `reset --to` and
//!   `tail --from`.
//! - [`exit`]: the exit codes, documented in `--help` and docs/eventsctl.md.
//! - `consumers`: a consumer's standing (position, lag, heartbeat, running), for `status` and `lag`.
//! - `connect` and `output`: connections configured like the services', tables, JSON and
//!   progress bars.

pub mod cli;
pub mod cmd;
mod connect;
mod consumers;
pub mod exit;
mod output;
pub mod target;

use std::process::ExitCode;

/// Runs a parsed command line to its exit code: errors are printed once, as `error: what: cause`.
pub fn main(cli: cli::Cli) -> ExitCode {
    let _ = services::telemetry::init(&cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::Code::Error.into();
        }
    };
    let outcome = runtime.block_on(cmd::run(cli));
    match outcome {
        Ok(code) => code.into(),
        Err(error) => {
            if exit::is_broken_pipe(&error) {
                // `eventsctl tail | head`: the reader has all it wanted.
                return exit::Code::Ok.into();
            }
            eprintln!("error: {error:#}");
            exit::code_of(&error).into()
        }
    }
}
