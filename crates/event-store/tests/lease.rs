//! A consumer's lease against a real PostgreSQL: one holder at a time, visible to others (with the
//! holder's backend pid), per consumer name, and gone when the holding session ends — a crashed
//! consumer never leaves a stale lease.

use std::time::{Duration, Instant};

use event_store::{db, lease, migrations};
use testbed::Postgres;
use tokio_postgres::Client;

async fn connect(url: &str, app: &str) -> Client {
    db::connect_spawned(&db::config(url, app).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_session_holds_a_consumers_lease_until_it_ends() {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url(), "lease-admin").await;
    migrations::run(&mut admin).await.unwrap();
    // The consumer role may take and see leases: nothing beyond events_consumer is needed.
    admin
        .batch_execute("CREATE ROLE sink LOGIN IN ROLE events_consumer")
        .await
        .unwrap();
    let consumer = connect(&pg.url_for("sink", None), "events-consumer:orders").await;
    let operator = connect(&pg.url(), "eventsctl").await;
    let consumer_pid: i32 = consumer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    assert!(!lease::is_held(&operator, "orders").await.unwrap());
    assert!(lease::try_acquire(&consumer, "orders").await.unwrap());

    let holder = lease::holder(&operator, "orders")
        .await
        .unwrap()
        .expect("held");
    assert_eq!(holder.pid, consumer_pid);
    assert_eq!(holder.user.as_deref(), Some("sink"));
    assert_eq!(
        holder.application_name.as_deref(),
        Some("events-consumer:orders")
    );
    assert!(holder
        .to_string()
        .contains(&format!("backend pid {consumer_pid}")));
    assert!(
        !lease::try_acquire(&operator, "orders").await.unwrap(),
        "a second session must not get a held lease"
    );
    // Other names, and names that only look alike, are other leases.
    assert!(!lease::is_held(&operator, "orders2").await.unwrap());
    assert!(!lease::is_held(&operator, "Orders").await.unwrap());
    assert!(lease::try_acquire(&operator, "orders2").await.unwrap());
    assert!(lease::release(&operator, "orders2").await.unwrap());
    assert!(
        !lease::release(&operator, "orders").await.unwrap(),
        "not ours to release"
    );

    // Released explicitly: free for the next session.
    assert!(lease::release(&consumer, "orders").await.unwrap());
    assert!(!lease::is_held(&operator, "orders").await.unwrap());

    // Held again, then the session dies without releasing (a crash): the lease goes with it.
    assert!(lease::try_acquire(&consumer, "orders").await.unwrap());
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&consumer_pid])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease::is_held(&operator, "orders").await.unwrap() {
        assert!(Instant::now() < deadline, "the lease outlived its session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lease::try_acquire(&operator, "orders").await.unwrap());
}
