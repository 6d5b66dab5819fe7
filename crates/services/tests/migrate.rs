//! The `migrate` binary against a real PostgreSQL: it applies the schema once, says so, and
//! explains a connection failure without printing the password.

use testbed::Postgres;

#[tokio::test]
async fn the_migrate_binary_is_idempotent_and_explains_connection_failures() {
    let pg = Postgres::start();
    let migrate = env!("CARGO_BIN_EXE_migrate");
    let run = |url: &str| {
        std::process::Command::new(migrate)
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    };
    let first = run(&pg.url());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied V1__events, V2__roles"));
    let again = run(&pg.url());
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already up to date"));

    let unreachable = run("postgres://postgres:s3cret@127.0.0.1:1/postgres");
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret"),
        "the password must never be printed: {stderr}"
    );

    let garbage = run("not a url at all ://");
    assert!(!garbage.status.success());
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("DATABASE_URL is not a valid"));
}
