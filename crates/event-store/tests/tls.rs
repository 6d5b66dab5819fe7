//! TLS against a real server that takes TCP connections over TLS only, with certificates made at
//! test time: what each `sslmode` accepts and refuses, and that refusals say why and what to do.

use event_store::db;
use testbed::{Ca, Postgres};

struct Cluster {
    pg: Postgres,
    ca: String,
}

fn cluster() -> Cluster {
    let pg = Postgres::start_tls();
    pg.psql("CREATE ROLE app LOGIN PASSWORD 'app-secret'");
    let ca = pg.tls_ca().display().to_string();
    Cluster { pg, ca }
}

impl Cluster {
    /// A URL for the `app` login at `host` (the port is the server's) with extra parameters.
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://app:app-secret@{host}:{}/postgres?{params}",
            self.pg.port()
        )
    }
}

/// Connects and reports whether the session is encrypted, or the error's full text.
async fn try_connect(url: &str) -> Result<bool, (String, bool)> {
    let config = db::config(url, "tls-test").map_err(|e| (e.to_string(), e.is_permanent()))?;
    let client = db::connect_spawned(&config)
        .await
        .map_err(|e| (e.to_string(), e.is_permanent()))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_connects_pool_and_listen_connections_over_tls() {
    let c = cluster();
    for host in ["localhost", "127.0.0.1"] {
        let url = c.url(host, &format!("sslmode=verify-full&sslrootcert={}", c.ca));
        assert_eq!(try_connect(&url).await, Ok(true), "{host}");
    }
    // The pool and a dedicated LISTEN connection go through the same policy.
    let config = db::config(
        &c.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", c.ca),
        ),
        "tls-test",
    )
    .unwrap();
    let pool = db::pool(config.clone(), 2).unwrap();
    let pooled = pool.get().await.unwrap();
    let ssl: bool = pooled
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "pooled connections are encrypted");
    let (listen, connection) = db::connect(&config).await.unwrap();
    tokio::spawn(connection);
    listen.batch_execute("LISTEN events").await.unwrap();
    let ssl: bool = listen
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the LISTEN connection is encrypted");

    // key=value form, and the modes that encrypt without checking the certificate.
    let kv = format!(
        "host=localhost port={} user=app password=app-secret dbname=postgres sslmode=verify-full sslrootcert='{}'",
        c.pg.port(),
        c.ca
    );
    assert_eq!(try_connect(&kv).await, Ok(true));
    assert_eq!(
        try_connect(&c.url("localhost", "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        try_connect(&c.url("localhost", "sslmode=prefer")).await,
        Ok(true)
    );
    assert_eq!(
        try_connect(&c.url("localhost", "")).await,
        Ok(true),
        "prefer is the default"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_name_the_cause_and_the_fix() {
    let c = cluster();

    // A host name the certificate does not list (reached at the right address).
    let wrong_host = c.url(
        "wrong.invalid",
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            c.ca
        ),
    );
    let (error, permanent) = try_connect(&wrong_host).await.unwrap_err();
    assert!(
        error.contains("TLS verification failed")
            && error.contains("not valid for the host name")
            && error.contains("verify-ca"),
        "{error}"
    );
    assert!(
        permanent,
        "a certificate that does not match is not retried: {error}"
    );
    // verify-ca checks the chain only, as in libpq.
    let chain_only = c.url(
        "wrong.invalid",
        &format!("hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={}", c.ca),
    );
    assert_eq!(try_connect(&chain_only).await, Ok(true));

    // A CA that did not sign the server's certificate.
    let other = tempfile::NamedTempFile::new().unwrap();
    Ca::new("some other CA").write(other.path());
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = c.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", other.path().display()),
        );
        let (error, permanent) = try_connect(&url).await.unwrap_err();
        assert!(
            error.contains("TLS verification failed") && error.contains("unknown issuer"),
            "{mode}: {error}"
        );
        assert!(
            error.contains("set sslrootcert to the CA that signed it"),
            "{error}"
        );
        assert!(permanent);
    }

    // Plaintext where the server takes TLS only.
    let (error, permanent) = try_connect(&c.url("localhost", "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        error.contains("no pg_hba.conf entry")
            && error.contains("SQLSTATE 28000")
            && error.contains("only over TLS")
            && error.contains("sslmode=verify-full"),
        "{error}"
    );
    assert!(permanent);

    // A wrong password, over TLS.
    let url = format!(
        "postgres://app:Nope-7781@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        c.pg.port(),
        c.ca
    );
    let (error, permanent) = try_connect(&url).await.unwrap_err();
    assert!(
        error.contains("password authentication failed")
            && error.contains("SQLSTATE 28P01")
            && error.contains("fix the password in DATABASE_URL")
            && !error.contains("Nope-7781"),
        "{error}"
    );
    assert!(permanent);

    // A CA file that is not there is a configuration error before any connection.
    let (error, permanent) = try_connect(&c.url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
    ))
    .await
    .unwrap_err();
    assert!(error.contains("does not exist"), "{error}");
    assert!(permanent);
}

#[tokio::test(flavor = "multi_thread")]
async fn require_against_a_server_without_tls_is_refused() {
    let pg = Postgres::start();
    let url = format!("{}?sslmode=require", pg.url());
    let (error, permanent) = try_connect(&url).await.unwrap_err();
    assert!(
        error.contains("server does not support TLS") && error.contains("enable ssl"),
        "{error}"
    );
    assert!(permanent);
    // The default (prefer) falls back to plaintext there.
    assert_eq!(try_connect(&pg.url()).await, Ok(false));
}
