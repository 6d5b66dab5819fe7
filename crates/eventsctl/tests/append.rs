//! `eventsctl append` goes through the producer library: validated before the database is
//! touched, idempotent with --event-id, and refused for a role without the producer's grants.

mod common;

use common::{assert_exit, json, setup, stderr};

#[tokio::test(flavor = "multi_thread")]
async fn append_stores_one_event_from_an_argument_a_file_or_stdin() {
    let env = setup(false).await;
    let inline = env
        .ctl_as(
            "app",
            &[
                "append",
                "--topic",
                "orders",
                "--key",
                "k1",
                "--type",
                "created",
                "--payload",
                r#"{"total": 9.5, "items": [1, 2]}"#,
                "--headers",
                r#"{"trace": "t1"}"#,
                "--json",
            ],
            None,
        )
        .await;
    assert_exit(&inline, 0, "inline payload");
    let receipt = json(&inline);
    assert_eq!(receipt["appended"], true);
    let row = env
        .admin
        .query_one(
            "SELECT topic, key, type, payload::text, headers::text, event_id::text FROM events WHERE id = $1",
            &[&receipt["id"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "orders");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("k1"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("created"));
    assert_eq!(
        row.get::<_, String>(3),
        r#"{"items": [1, 2], "total": 9.5}"#
    );
    assert_eq!(row.get::<_, String>(4), r#"{"trace": "t1"}"#);
    assert_eq!(
        row.get::<_, String>(5),
        receipt["event_id"].as_str().unwrap()
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(&file, r#"{"from": "file"}"#).unwrap();
    let from_file = env
        .ctl_as(
            "app",
            &[
                "append",
                "--topic",
                "orders",
                "--payload-file",
                file.to_str().unwrap(),
            ],
            None,
        )
        .await;
    assert_exit(&from_file, 0, "payload from a file");
    let from_stdin = env
        .ctl_as(
            "app",
            &["append", "--topic", "orders", "-"],
            Some(r#"{"from": "stdin"}"#),
        )
        .await;
    assert_exit(&from_stdin, 0, "payload from stdin");
    let payloads: Vec<String> = env
        .admin
        .query(
            "SELECT payload->>'from' FROM events WHERE payload ? 'from' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(payloads, ["file", "stdin"]);

    // The same event_id twice: stored once, the second call says so and succeeds.
    let id = "7d9f3c1e-0b6a-4c2e-9d4f-2a1b3c4d5e6f";
    let first = env
        .ctl_as(
            "app",
            &[
                "append",
                "--topic",
                "payments",
                "--event-id",
                id,
                "--payload",
                "{}",
                "--json",
            ],
            None,
        )
        .await;
    assert_exit(&first, 0, "first append with an event id");
    let again = env
        .ctl_as(
            "app",
            &[
                "append",
                "--topic",
                "payments",
                "--event-id",
                id,
                "--payload",
                "{}",
                "--json",
            ],
            None,
        )
        .await;
    assert_exit(&again, 0, "the same event id again");
    assert_eq!(json(&again)["appended"], false);
    assert_eq!(json(&again)["id"], json(&first)["id"]);
    assert_eq!(env.pg_ids().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_missing_grants_are_refused_before_anything_is_stored() {
    let env = setup(false).await;
    for (args, what) in [
        (
            vec!["append", "--topic", "orders", "--payload", "{not json"],
            "payload is not valid JSON",
        ),
        (
            vec!["append", "--topic", "no spaces", "--payload", "{}"],
            "bad topic",
        ),
        (
            vec![
                "append",
                "--topic",
                "orders",
                "--payload",
                "{}",
                "--headers",
                "[1]",
            ],
            "must be a JSON object",
        ),
        (
            vec![
                "append",
                "--topic",
                "orders",
                "--payload-file",
                "/nonexistent/p.json",
            ],
            "cannot read --payload-file",
        ),
    ] {
        let out = env.ctl_as("app", &args, None).await;
        assert_exit(&out, 2, what);
        assert!(stderr(&out).contains(what), "{what}: {}", stderr(&out));
    }
    // No payload source at all: a usage error from the command line.
    assert_exit(
        &env.ctl_as("app", &["append", "--topic", "orders"], None)
            .await,
        2,
        "no payload",
    );
    // The consumer's role may not append: the message names the grant.
    let denied = env
        .ctl_as(
            "ops",
            &["append", "--topic", "orders", "--payload", "{}"],
            None,
        )
        .await;
    assert_exit(&denied, 4, "a role without events_producer");
    assert!(
        stderr(&denied).contains("events_producer"),
        "{}",
        stderr(&denied)
    );
    assert!(env.pg_ids().await.is_empty(), "nothing was stored");
}
