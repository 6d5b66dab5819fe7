//! `eventsctl status` names what matters: each consumer's position, lag, heartbeat and state, the
//! table's size and ends, the purge watermark, and the sessions, prepared transactions that hold
//! the horizon back — as the owner, and as a purger login (which reads every position).

mod common;

use common::{assert_exit, json, produce, setup_with, stdout};
use event_store::position::{self, Position};
use mongo_format::checkpoint::update as checkpoint_update;
use mongodb::bson::{doc, DateTime, Document};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_consumers_the_table_and_what_holds_the_horizon() {
    let env = setup_with(true, &["max_prepared_transactions=4"]).await;
    produce(&env.admin, "orders", 10).await;
    // A table never analysed has no estimate: the rows are counted (up to a cap), and labelled so.
    let fresh = json(&env.keeper(&["status", "--json"]).await);
    assert!(fresh["events"]["estimated_rows"].is_null(), "{fresh}");
    assert_eq!(fresh["events"]["counted_rows"], 10);
    env.admin.batch_execute("ANALYZE events").await.unwrap();
    let last = position::latest(&env.admin).await.unwrap();
    position::register(&env.admin, "fast", last).await.unwrap();
    position::register(&env.admin, "slow", Position::START)
        .await
        .unwrap();
    env.admin
        .execute(
            "UPDATE consumer_positions SET updated_at = now() - interval '1 hour' WHERE consumer = 'slow'",
            &[],
        )
        .await
        .unwrap();
    let db = env.mongo_db().await;
    db.collection::<Document>("checkpoints")
        .update_one(
            doc! {"_id": "fast"},
            checkpoint_update(last, DateTime::now()),
        )
        .upsert(true)
        .await
        .unwrap();
    db.collection::<Document>("deadLetters")
        .insert_one(doc! {"_id": 1_i64, "reason": "test", "consumer": "slow"})
        .await
        .unwrap();

    // A report holding a writing transaction open, and a forgotten prepared transaction.
    let report =
        common::connect(&format!("{}?application_name=nightly-report", env.pg.url())).await;
    let report_pid: i32 = report
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    report
        .batch_execute("BEGIN; INSERT INTO events (topic, payload) VALUES ('orders', '{}')")
        .await
        .unwrap();
    let prepared = common::connect(&env.pg.url()).await;
    prepared
        .batch_execute(
            "BEGIN; INSERT INTO events (topic, payload) VALUES ('orders', '{}');
             PREPARE TRANSACTION 'forgotten-2pc'",
        )
        .await
        .unwrap();

    // As the owner: it sees every session's query text.
    let out = env
        .ctl_as(
            "postgres",
            &[
                "status",
                "--json",
                "--stale-after",
                "30m",
                "--consumer-expiry",
                "2h",
            ],
            None,
        )
        .await;
    assert_exit(&out, 0, "status");
    let s = json(&out);
    let consumer = |name: &str| {
        s["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["consumer"] == name)
            .unwrap_or_else(|| panic!("{name} in {s}"))
            .clone()
    };
    let slow = consumer("slow");
    assert_eq!(slow["lag_events"], 10);
    assert_eq!(slow["state"], "stale", "{slow}");
    assert!(slow["heartbeat_age_seconds"].as_f64().unwrap() >= 3600.0);
    assert!(slow["checkpoint"].is_null(), "no checkpoint in MongoDB");
    let fast = consumer("fast");
    assert_eq!(fast["lag_events"], 0);
    assert_eq!(fast["state"], "idle", "caught up, heartbeat recent");
    assert_eq!(fast["checkpoint"]["id"], last.id);
    assert!(s["purging_held_back_by"]
        .as_str()
        .unwrap()
        .contains("\"slow\""));
    assert_eq!(s["dead_letters"], 1);
    assert_eq!(slow["dead_letters"], 1);
    assert_eq!(fast["dead_letters"], 0);

    let events = &s["events"];
    assert_eq!(events["estimated_rows"], 10);
    assert!(events["counted_rows"].is_null());
    assert!(events["total_bytes"].as_i64().unwrap() > 0);
    assert_eq!(events["newest"]["position"]["id"], last.id);
    assert!(events["oldest"]["position"]["id"].as_i64().unwrap() <= last.id);
    assert!(s["purge_watermark"].is_null());

    let backends = s["horizon"]["backends"].as_array().unwrap();
    let holder = backends
        .iter()
        .find(|b| b["pid"] == report_pid)
        .unwrap_or_else(|| panic!("the report's backend in {backends:?}"));
    assert_eq!(holder["holds"], "delivery and purging");
    assert_eq!(holder["role"], "postgres");
    assert_eq!(holder["application"], "nightly-report");
    assert!(
        holder["query"]
            .as_str()
            .unwrap()
            .contains("INSERT INTO events"),
        "{holder}"
    );
    assert_eq!(
        s["horizon"]["prepared_transactions"][0]["gid"],
        "forgotten-2pc"
    );

    // Past the purger's expiry the slow consumer no longer holds purging back. As a purger
    // login: every consumer is there, but not other sessions' query text.
    let expired = json(
        &env.keeper(&["status", "--json", "--consumer-expiry", "30m"])
            .await,
    );
    let report_backend = expired["horizon"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["pid"] == report_pid)
        .unwrap()
        .clone();
    assert!(report_backend["query"].is_null(), "{report_backend}");
    let slow = expired["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(slow["state"], "expired");
    assert!(expired["purging_held_back_by"]
        .as_str()
        .unwrap()
        .contains("\"fast\""));

    // The table for people names the same things.
    let text = env.ctl_as("postgres", &["status"], None).await;
    assert_exit(&text, 0, "status as text");
    let text = stdout(&text);
    for needle in [
        "CONSUMER",
        "slow",
        "stale",
        "planner estimate",
        "forgotten-2pc",
        &report_pid.to_string(),
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    prepared
        .batch_execute("ROLLBACK PREPARED 'forgotten-2pc'")
        .await
        .unwrap();
    report.batch_execute("ROLLBACK").await.unwrap();
}

/// A webhook or JetStream consumer keeps its checkpoint and dead letters in PostgreSQL: status
/// shows them without MONGODB_URI (as the owner), says "-" where the login may not read them (a
/// purger login), and lag lists the consumer like any other.
#[tokio::test(flavor = "multi_thread")]
async fn status_and_lag_show_consumers_whose_sink_keeps_its_state_in_postgres() {
    use event_store::sink_state::{begin_request, commit_request, DeadLetterRow};
    let env = common::setup(false).await;
    produce(&env.admin, "orders", 5).await;
    let last = position::latest(&env.admin).await.unwrap();
    let mut hooks = common::connect(&env.pg.url_for("ops", None)).await;
    position::register(&hooks, "hooks", last).await.unwrap();
    begin_request(&hooks, "hooks", "http", Position::START, last)
        .await
        .unwrap()
        .unwrap();
    let letter = DeadLetterRow {
        position: last,
        event_id: None,
        topic: Some("orders"),
        key: None,
        event_type: None,
        payload: "{}",
        reason: "refused_by_receiver",
        detail: "the receiver answered 422",
    };
    commit_request(
        &mut hooks,
        "hooks",
        Position::START,
        last,
        None,
        None,
        &[letter],
    )
    .await
    .unwrap()
    .unwrap();

    let out = env.ctl_as("postgres", &["status", "--json"], None).await;
    assert_exit(&out, 0, "status as the owner");
    let report = json(&out);
    let hooks_row = &report["consumers"][0];
    assert_eq!(hooks_row["consumer"], "hooks", "{report}");
    assert_eq!(hooks_row["sink"], "http", "{report}");
    assert_eq!(hooks_row["checkpoint"], json!(last), "{report}");
    assert_eq!(hooks_row["dead_letters"], 1, "{report}");
    assert_eq!(report["dead_letters"], 1, "{report}");
    let text = stdout(&env.ctl_as("postgres", &["status"], None).await);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("hooks"))
        .unwrap_or_else(|| panic!("a line for hooks: {text}"));
    assert_eq!(
        line.matches(&last.to_string()).count(),
        2,
        "position and checkpoint: {line}"
    );
    assert!(text.contains("Dead letters: 1"), "{text}");

    // A purger login reads every position but no sink's state: shown as unknown, not an error.
    let out = env.keeper(&["status", "--json"]).await;
    assert_exit(&out, 0, "status as a purger login");
    let report = json(&out);
    assert!(report["consumers"][0]["checkpoint"].is_null(), "{report}");
    assert!(report["consumers"][0]["dead_letters"].is_null(), "{report}");

    let out = env.keeper(&["lag", "--json"]).await;
    assert_exit(&out, 0, "lag");
    assert!(stdout(&out).contains("\"hooks\""), "{}", stdout(&out));
}
