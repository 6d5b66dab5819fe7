//! Positions across a digit-count boundary of the transaction id (999 → 1000): every query that
//! returns `tx_id::text` and sorts must sort by the `xid8` column, not by its text form.

use event_store::position::{self, Position, Reader};
use event_store::{db, migrations};
use testbed::Postgres;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "xid-boundary-test").unwrap())
        .await
        .unwrap()
}

/// Burns transaction ids (one per autocommit `pg_current_xact_id()`) until the next one is `next`.
async fn advance_xid_to(client: &Client, next: u64) {
    loop {
        let current: String = client
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .unwrap()
            .get(0);
        let current: u64 = current.parse().unwrap();
        assert!(current < next, "the cluster is already past xid {next}");
        if current + 1 == next {
            return;
        }
    }
}

#[tokio::test]
async fn reads_and_lookups_sort_positions_by_number_across_999_to_1000() {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    advance_xid_to(&admin, 996).await;
    // Ten events in ten transactions: xids 996..=1005.
    let mut positions = Vec::new();
    for n in 0..10 {
        let row = admin
            .query_one(
                "INSERT INTO events (topic, payload) VALUES ('t', to_jsonb($1::int))
                 RETURNING tx_id::text, id",
                &[&n],
            )
            .await
            .unwrap();
        positions.push(Position::new(
            row.get::<_, &str>(0).parse().unwrap(),
            row.get(1),
        ));
    }
    assert_eq!(positions[0].tx_id, 996);
    assert_eq!(positions[9].tx_id, 1005);

    let reader = Reader::prepare(&admin).await.unwrap();
    let batch = reader
        .fetch(&admin, Position::START, 100, None)
        .await
        .unwrap();
    let read: Vec<Position> = batch.events.iter().map(|e| e.position).collect();
    assert_eq!(read, positions, "numeric order");
    assert_eq!(
        batch.end,
        Some(positions[9]),
        "the reader ends on the last row"
    );
    // Page by page, the position only ever moves forward and every event comes exactly once.
    let mut at = Position::START;
    let mut paged = Vec::new();
    loop {
        let batch = reader.fetch(&admin, at, 3, None).await.unwrap();
        let Some(end) = batch.end else { break };
        assert!(end > at, "{end} after {at}");
        paged.extend(batch.events.iter().map(|e| e.position));
        at = end;
    }
    assert_eq!(paged, positions);

    assert_eq!(
        position::oldest(&admin).await.unwrap().map(|(p, _)| p),
        Some(positions[0])
    );
    position::publish(&admin, "slow", positions[1])
        .await
        .unwrap();
    position::publish(&admin, "fast", positions[5])
        .await
        .unwrap();
    let published: Vec<String> = position::published_positions(&admin)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.consumer)
        .collect();
    assert_eq!(published, ["slow", "fast"], "slowest first");
}
