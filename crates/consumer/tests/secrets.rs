//! `consumer` never prints a password from its connection strings: URL and key=value forms, passwords
//! with `/ ? @ # % +` raw and percent-encoded, a `password` parameter, against a server that
//! accepts the connection, one that is not there, and a string that does not parse.

use std::process::Command;
use std::time::Duration;

use testbed::secrets::{self, Hostile};
use testbed::Postgres;

const BIN: &str = env!("CARGO_BIN_EXE_consumer");

fn migrated() -> Postgres {
    let pg = Postgres::start();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let config = event_store::db::config(&pg.url(), "test").unwrap();
            let mut admin = event_store::db::connect_spawned(&config).await.unwrap();
            event_store::migrations::run(&mut admin).await.unwrap();
        });
    pg
}

/// Every hostile URL for the running server (trust authentication: the password is ignored, so
/// the binary starts for real), and the first five again for a port where nothing listens.
fn urls(pg: &Postgres) -> Vec<Hostile> {
    let mut all = secrets::postgres_urls(pg.port(), "postgres", "postgres");
    all.extend(
        secrets::postgres_urls(secrets::closed_port(), "postgres", "postgres")
            .into_iter()
            .take(5),
    );
    all
}

fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1");
    cmd
}

#[test]
fn no_password_is_ever_printed() {
    let pg = migrated();
    let mongo = testbed::Mongo::start();
    let mongo_host = mongo
        .uri()
        .split("://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    for hostile in urls(&pg) {
        let output = secrets::run_for(
            command()
                .env("DATABASE_URL", &hostile.url)
                .env("MONGODB_URI", mongo.uri())
                .env("LOG_LEVEL", "debug"),
            Duration::from_secs(3),
        );
        secrets::assert_clean(&hostile.url, &output, &hostile.secrets);
    }
    let good = secrets::postgres_urls(pg.port(), "postgres", "postgres").remove(0);
    for hostile in secrets::mongodb_uris(&mongo_host) {
        let output = secrets::run_for(
            command()
                .env("DATABASE_URL", &good.url)
                .env("MONGODB_URI", &hostile.url)
                .env("LOG_LEVEL", "debug"),
            Duration::from_secs(4),
        );
        let mut all = hostile.secrets.clone();
        all.extend(good.secrets.iter().cloned());
        secrets::assert_clean(&hostile.url, &output, &all);
    }
}
