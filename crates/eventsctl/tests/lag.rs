//! `eventsctl lag` as a health check: exit 1 exactly when a consumer is over a threshold, 2 for
//! an unknown consumer or bad input, 4 when the database cannot be reached. Run as a purger login,
//! which reads every consumer's position.

mod common;

use common::{assert_exit, json, produce, setup, stdout};
use event_store::position::{self, Position};

#[tokio::test(flavor = "multi_thread")]
async fn lag_exits_1_exactly_when_a_consumer_is_over_a_threshold() {
    let env = setup(false).await;
    position::register(&env.admin, "behind", Position::START)
        .await
        .unwrap();
    produce(&env.admin, "orders", 5).await;
    let last = position::latest(&env.admin).await.unwrap();
    position::register(&env.admin, "caught-up", last)
        .await
        .unwrap();

    let at_limit = env
        .keeper(&["lag", "behind", "--fail-above-events", "5"])
        .await;
    assert_exit(&at_limit, 0, "5 events behind, limit 5");
    let over = env
        .keeper(&["lag", "behind", "--fail-above-events", "4"])
        .await;
    assert_exit(&over, 1, "5 events behind, limit 4");
    assert!(
        stdout(&over).contains("OVER: events 5 > 4"),
        "{}",
        stdout(&over)
    );

    // Every consumer by default; the caught-up one is never over, even with a limit of 0.
    let all = env
        .keeper(&["lag", "--json", "--fail-above-events", "0"])
        .await;
    assert_exit(&all, 1, "one of two consumers is behind");
    let report = json(&all);
    let consumers = report["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 2);
    let behind = consumers
        .iter()
        .find(|c| c["consumer"] == "behind")
        .unwrap();
    assert_eq!(behind["lag_events"], 5);
    assert!(behind["lag_events_capped_at"].is_null());
    let caught_up = consumers
        .iter()
        .find(|c| c["consumer"] == "caught-up")
        .unwrap();
    assert_eq!(caught_up["lag_events"], 0);
    assert_eq!(caught_up["over"].as_array().unwrap().len(), 0);
    assert_exit(
        &env.keeper(&[
            "lag",
            "caught-up",
            "--fail-above-events",
            "0",
            "--fail-above-seconds",
            "1s",
        ])
        .await,
        0,
        "a caught-up consumer",
    );

    // Age: the oldest undelivered event is two hours old.
    env.admin
        .execute(
            "UPDATE events SET created_at = now() - interval '2 hours'",
            &[],
        )
        .await
        .unwrap();
    assert_exit(
        &env.keeper(&["lag", "behind", "--fail-above-seconds", "3h"])
            .await,
        0,
        "2 h old, limit 3 h",
    );
    let old = env
        .keeper(&["lag", "behind", "--fail-above-seconds", "1h"])
        .await;
    assert_exit(&old, 1, "2 h old, limit 1 h");
    assert!(stdout(&old).contains("OVER: age 2h"), "{}", stdout(&old));

    // Bad input and failures have codes of their own, so a probe can tell them from "over".
    let unknown = env
        .keeper(&["lag", "nobody", "--fail-above-events", "1"])
        .await;
    assert_exit(&unknown, 2, "an unknown consumer");
    assert!(common::stderr(&unknown).contains("no consumer named \"nobody\""));
    assert_exit(
        &env.keeper(&["lag", "bad name"]).await,
        2,
        "a malformed consumer name",
    );
    assert_exit(
        &env.keeper(&["lag", "--fail-above-seconds", "soon"]).await,
        2,
        "a malformed duration",
    );
    let down = env
        .keeper(&[
            "--database-url",
            "postgres://keeper@127.0.0.1:1/events",
            "lag",
        ])
        .await;
    assert_exit(&down, 4, "PostgreSQL unreachable");
    assert!(
        common::stderr(&down).contains("cannot connect to PostgreSQL"),
        "{}",
        common::stderr(&down)
    );
}
