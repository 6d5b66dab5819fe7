//! The harness itself: real servers that start, keep their data across restarts and crashes, and
//! do not clash when several test processes run at once.

use mongodb::bson::{doc, Document};
use testbed::{Mongo, Postgres};

async fn pg_client(pg: &Postgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the throwaway PostgreSQL");
    tokio::spawn(connection);
    client
}

async fn mongo_count(mongo: &Mongo, db: &str) -> u64 {
    let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    client
        .database(db)
        .collection::<Document>("things")
        .count_documents(doc! {})
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_keeps_data_across_stop_and_crash() {
    let mut pg = Postgres::start();
    let client = pg_client(&pg).await;
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    drop(client);

    let port = pg.port();
    pg.restart();
    assert_eq!(
        pg.port(),
        port,
        "a restart keeps the port clients were given"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "2");

    pg.psql("INSERT INTO t VALUES (3)");
    pg.kill();
    assert!(!pg.is_running());
    let err = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .err();
    assert!(err.is_some(), "a killed server must refuse connections");
    pg.restart();
    assert_eq!(
        pg.psql("SELECT count(*) FROM t"),
        "3",
        "committed rows survive a crash"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mongo_keeps_data_across_stop_and_crash() {
    let mut mongo = Mongo::start();
    if mongo.kind() == testbed::MongoKind::External {
        eprintln!("TEST_MONGODB_URI is set: the harness cannot restart an external server");
        return;
    }
    let db = mongo.unique_database("harness");
    {
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let things = client.database(&db).collection::<Document>("things");
        things
            .insert_many(vec![doc! {"_id": 1}, doc! {"_id": 2}])
            .await
            .unwrap();
        let back = things.find_one(doc! {"_id": 2}).await.unwrap();
        assert_eq!(back, Some(doc! {"_id": 2}), "read back what was written");
    }
    mongo.restart();
    assert_eq!(mongo_count(&mongo, &db).await, 2);

    {
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let things = client.database(&db).collection::<Document>("things");
        things.insert_one(doc! {"_id": 3}).await.unwrap();
    }
    mongo.kill();
    mongo.restart();
    assert_eq!(
        mongo_count(&mongo, &db).await,
        3,
        "acknowledged writes survive kill -9"
    );
}

/// Run by `parallel_processes_get_their_own_servers` in two child processes at once.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run as a child of parallel_processes_get_their_own_servers"]
async fn child_uses_its_own_servers() {
    let pg = Postgres::start();
    let mongo = Mongo::start();
    let client = pg_client(&pg).await;
    client
        .batch_execute("CREATE TABLE mine (v int); INSERT INTO mine VALUES (42)")
        .await
        .unwrap();
    let db = mongo.unique_database("child");
    let m = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    m.database(&db)
        .collection::<Document>("things")
        .insert_one(doc! {"v": 42})
        .await
        .unwrap();
    assert_eq!(mongo_count(&mongo, &db).await, 1);
    println!("PORTS {} {}", pg.port(), mongo.uri());
}

#[test]
fn parallel_processes_get_their_own_servers() {
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_uses_its_own_servers",
                "--ignored",
                "--nocapture",
            ])
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap(), b.join().unwrap())
    });
    let ports = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "child failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with("PORTS"))
            .expect("child printed its ports")
            .to_string()
    };
    let (pa, pb) = (ports(&a), ports(&b));
    if std::env::var_os("TEST_MONGODB_URI").is_none() {
        assert_ne!(pa, pb, "two processes must not share servers");
    }
}

#[test]
fn dropping_a_server_removes_its_process() {
    let pg = Postgres::start();
    let port = pg.port();
    drop(pg);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a dropped server must not keep listening"
    );
}

/// Run by `a_panicking_test_leaves_no_server_behind` in a child process.
#[test]
#[ignore = "run as a child of a_panicking_test_leaves_no_server_behind"]
fn child_panics_while_servers_run() {
    let pg = Postgres::start();
    let mongo = Mongo::start();
    println!("PG {} {}", pg.port(), pg.root_dir().display());
    if let Some(dir) = mongo.root_dir() {
        println!("MONGO {} {}", mongo.uri(), dir.display());
    }
    panic!("deliberate panic with both servers running");
}

#[test]
fn a_panicking_test_leaves_no_server_behind() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_panics_while_servers_run",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child test must fail");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let pg_line = stdout
        .lines()
        .find(|l| l.starts_with("PG "))
        .expect("child printed PG");
    let mut parts = pg_line.split_whitespace().skip(1);
    let port: u16 = parts.next().unwrap().parse().unwrap();
    let dir = parts.next().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "postgres still listens"
    );
    assert!(!std::path::Path::new(dir).exists(), "{dir} was left behind");
    if let Some(line) = stdout.lines().find(|l| l.starts_with("MONGO ")) {
        let dir = line.split_whitespace().nth(2).unwrap();
        assert!(!std::path::Path::new(dir).exists(), "{dir} was left behind");
    }
}
