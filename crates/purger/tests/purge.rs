//! Purge passes against a real PostgreSQL, run as the least-privilege purger role.

mod common;

use std::time::Duration;

use common::{connect, Db, DAY, WEEK};
use event_store::position::Position;
use purger::{HeldBack, Purger, Settings};
use tokio_util::sync::CancellationToken;

fn purger(db: &Db, settings: Settings) -> Purger {
    Purger::connect(&db.purger_url(), settings).unwrap()
}

async fn pass(db: &Db, settings: Settings) -> purger::PassReport {
    let mut purger = purger(db, settings);
    purger.check().await.expect("the purger role may purge");
    purger.pass(&CancellationToken::new()).await.unwrap()
}

fn ids(range: std::ops::RangeInclusive<usize>, all: &[i64]) -> Vec<i64> {
    all[range.start() - 1..*range.end()].to_vec()
}

#[tokio::test]
async fn age_alone_deletes_exactly_the_events_older_than_the_retention() {
    let db = Db::start().await;
    let all = db.append(20).await;
    db.backdate(&ids(1..=8, &all), WEEK + DAY).await;
    db.backdate(&ids(9..=10, &all), WEEK - DAY).await;
    let last_old = db.position_of(all[7]).await;

    let report = pass(
        &db,
        Settings {
            batch_size: 3,
            ..Settings::with_retention(WEEK)
        },
    )
    .await;

    assert_eq!(db.remaining().await, ids(9..=20, &all));
    assert_eq!(report.deleted, 8);
    assert_eq!(report.batches, 3, "3 + 3 + 2");
    assert_eq!(report.deleted_past_consumers, 0);
    assert_eq!(report.held_back, None);
    let oldest = report.oldest.expect("events remain");
    assert_eq!(oldest.position, db.position_of(all[8]).await);
    assert!(oldest.age > WEEK - DAY - Duration::from_secs(60) && oldest.age < WEEK);
    let watermark = db
        .watermark()
        .await
        .expect("a watermark once something went");
    assert_eq!(watermark.position, last_old);
    assert!(!watermark.forced);

    let again = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(again.deleted, 0, "a second pass finds nothing more");
    assert_eq!(db.remaining().await.len(), 12);
}

#[tokio::test]
async fn a_lagging_consumers_unread_events_are_kept() {
    let db = Db::start().await;
    let all = db.append(10).await;
    db.backdate(&all, 10 * DAY).await;
    let (read, slow_at) = db.consume("slow", Position::START, 4).await;
    assert_eq!(read, ids(1..=4, &all));

    let report = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(report.deleted, 4, "only what the consumer has read");
    assert_eq!(db.remaining().await, ids(5..=10, &all));
    match report.held_back {
        Some(HeldBack::Consumer {
            consumer,
            first_kept,
            ..
        }) => {
            assert_eq!(consumer.consumer, "slow");
            assert_eq!(consumer.position, slow_at);
            assert_eq!(first_kept, db.position_of(all[4]).await);
        }
        other => panic!("held back by the slow consumer, not {other:?}"),
    }
    let watermark = db.watermark().await.unwrap();
    assert!(watermark.position <= slow_at, "no gap for the consumer");

    // While it stays put, later passes do not even scan the old events kept for it.
    let idle = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!((idle.deleted, idle.batches), (0, 0));
    assert!(matches!(idle.held_back, Some(HeldBack::Consumer { .. })));

    // The consumer gets every event it had not read, then purging catches up.
    let (read, _) = db.consume("slow", slow_at, 100).await;
    assert_eq!(read, ids(5..=10, &all));
    let report = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(report.deleted, 6);
    assert_eq!(report.held_back, None);
    assert!(db.remaining().await.is_empty());
    assert_eq!(report.oldest, None);
}

#[tokio::test]
async fn an_expired_consumer_stops_holding_purging_back() {
    let db = Db::start().await;
    let all = db.append(10).await;
    db.backdate(&all, 10 * DAY).await;
    let (_, gone_at) = db.consume("gone", Position::START, 2).await;
    let (_, live_at) = db.consume("live", Position::START, 6).await;
    db.idle("gone", Duration::from_secs(2 * 3600)).await;

    // Without an expiry the idle consumer still holds everything after its position.
    let report = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(report.deleted, 2);
    assert!(
        matches!(&report.held_back, Some(HeldBack::Consumer { consumer, .. }) if consumer.consumer == "gone")
    );

    let expiring = Settings {
        consumer_expiry: Some(Duration::from_secs(3600)),
        ..Settings::with_retention(WEEK)
    };
    let report = pass(&db, expiring).await;
    assert_eq!(report.deleted, 4, "up to the live consumer");
    assert_eq!(db.remaining().await, ids(7..=10, &all));
    assert_eq!(report.expired.len(), 1);
    assert_eq!(report.expired[0].consumer.consumer, "gone");
    assert_eq!(report.expired[0].events, 4, "what it loses is named");
    assert!(report.expired[0].idle >= Duration::from_secs(2 * 3600));
    assert!(
        matches!(&report.held_back, Some(HeldBack::Consumer { consumer, .. }) if consumer.consumer == "live")
    );
    let watermark = db.watermark().await.unwrap();
    assert!(
        watermark.position > gone_at,
        "the expired consumer will see a gap"
    );
    assert!(watermark.position <= live_at, "the live one will not");
    assert!(!watermark.forced);
}

#[tokio::test]
async fn force_purges_past_active_consumers_and_records_a_forced_watermark() {
    let db = Db::start().await;
    let all = db.append(10).await;
    db.backdate(&all, 10 * DAY).await;
    let (_, lagging_at) = db.consume("lagging", Position::START, 3).await;
    let last = db.position_of(all[9]).await;
    let forced = Settings {
        force: true,
        batch_size: 4,
        ..Settings::with_retention(WEEK)
    };

    let report = pass(&db, forced.clone()).await;
    assert!(db.remaining().await.is_empty());
    assert_eq!(report.deleted, 10);
    assert_eq!(report.deleted_past_consumers, 7, "the safe part went first");
    assert_eq!(report.overridden.len(), 1);
    assert_eq!(report.overridden[0].consumer.consumer, "lagging");
    assert_eq!(report.overridden[0].events, 7);
    let watermark = db.watermark().await.unwrap();
    assert!(watermark.forced);
    assert_eq!(watermark.position, last);
    assert!(
        watermark.position > lagging_at,
        "the consumer's next watermark check reports the gap"
    );

    // When nobody is passed, a forced pass records nothing as forced.
    let more = db.append(3).await;
    db.backdate(&more, 10 * DAY).await;
    let last = db.position_of(more[2]).await;
    db.consume("lagging", lagging_at, 100).await;
    let report = pass(&db, forced).await;
    assert_eq!(report.deleted, 3);
    assert_eq!(report.deleted_past_consumers, 0);
    assert!(report.overridden.is_empty());
    let watermark = db.watermark().await.unwrap();
    assert!(!watermark.forced);
    assert_eq!(watermark.position, last);
}

#[tokio::test]
async fn a_dry_run_counts_and_deletes_nothing() {
    let db = Db::start().await;
    let all = db.append(10).await;
    db.backdate(&all[..7], 10 * DAY).await;
    db.consume("reader", Position::START, 5).await;

    let safe = pass(
        &db,
        Settings {
            dry_run: true,
            ..Settings::with_retention(WEEK)
        },
    )
    .await;
    assert_eq!(safe.would_delete, Some(5));
    assert_eq!(safe.deleted, 0);
    assert!(matches!(safe.held_back, Some(HeldBack::Consumer { .. })));

    let forced = pass(
        &db,
        Settings {
            dry_run: true,
            force: true,
            ..Settings::with_retention(WEEK)
        },
    )
    .await;
    assert_eq!(forced.would_delete, Some(7));
    assert_eq!(forced.overridden.len(), 1);
    assert_eq!(forced.overridden[0].events, 2);

    assert_eq!(db.remaining().await, all, "nothing deleted");
    assert_eq!(db.watermark().await, None, "no watermark either");
}

#[tokio::test]
async fn events_above_the_visibility_horizon_are_never_deleted() {
    let db = Db::start().await;
    let before = db.append(3).await;
    // An open transaction holds the horizon: everything committed after it is invisible to
    // consumers until it ends.
    let mut open = connect(&db.pg.url()).await;
    let tx = open.transaction().await.unwrap();
    let open_id: i64 = tx
        .query_one(
            "INSERT INTO events (topic, payload) VALUES ('slow', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let after = db.append(5).await;
    db.backdate(&before, 10 * DAY).await;
    db.backdate(&after, 10 * DAY).await;

    let report = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(report.deleted, 3, "only what precedes the open transaction");
    assert_eq!(db.remaining().await, after);
    match report.held_back {
        Some(HeldBack::OpenTransaction { first_kept }) => {
            assert_eq!(first_kept, db.position_of(after[0]).await)
        }
        other => panic!("held back by the horizon, not {other:?}"),
    }

    tx.commit().await.unwrap();
    db.backdate(&[open_id], 10 * DAY).await;
    let report = pass(&db, Settings::with_retention(WEEK)).await;
    assert_eq!(report.deleted, 6);
    assert!(db.remaining().await.is_empty());
    assert_eq!(report.held_back, None);
}

#[tokio::test]
async fn a_shutdown_request_stops_the_pass_between_batches() {
    let db = Db::start().await;
    let all = db.append(50).await;
    db.backdate(&all, 10 * DAY).await;
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let mut purger = purger(
        &db,
        Settings {
            batch_size: 10,
            ..Settings::with_retention(WEEK)
        },
    );
    let report = purger.pass(&shutdown).await.unwrap();
    assert!(report.interrupted);
    assert_eq!(
        report.batches, 1,
        "the batch under way finishes, no other starts"
    );
    assert_eq!(report.deleted, 10);
    assert_eq!(db.remaining().await.len(), 40);
}

#[tokio::test]
async fn the_purger_role_cannot_do_more_than_purge() {
    let db = Db::start().await;
    let mut purger = Purger::connect(
        &db.pg.url_for("app_consumer", None),
        Settings::with_retention(WEEK),
    )
    .unwrap();
    let err = purger.check().await.unwrap_err().to_string();
    assert!(
        err.contains("lacks DELETE") && err.contains("events_purger"),
        "{err}"
    );
    // And a pass as the wrong role fails rather than pretending.
    assert!(purger.pass(&CancellationToken::new()).await.is_err());
}
