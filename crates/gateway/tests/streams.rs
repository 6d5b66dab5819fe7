//! The endpoint contract against real PostgreSQL and real HTTP clients: resume, order, gaps,
//! filters, and both transports.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_restart_by_last_event_id_and_by_from_gets_every_event_once_in_order() {
    let env = setup().await;
    let gw = start(env.config()).await;
    let addr = gw.addr;

    // Events keep committing (two per transaction) through the restart.
    let writer = connect(&env.pg.url()).await;
    let producing = tokio::spawn(async move {
        for _ in 0..250 {
            produce(&writer, "courses", 2, 3).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let path = "/v1/topics/courses/events";
    let mut a = Sse::open(addr, &format!("{path}?from=earliest"), &[]).await;
    let mut b = Sse::open(addr, &format!("{path}?from=earliest"), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let mut got_a = event_ids(&a.events(40).await);
    let mut got_b = event_ids(&b.events(20).await);

    // Stop the gateway: each stream ends with a goodbye naming where to resume.
    gw.shutdown.cancel();
    let mut resume = Vec::new();
    for (sse, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
        let rest = sse.rest().await;
        got.extend(event_ids(&rest));
        let goodbye = rest.last().expect("a goodbye before the end");
        assert_eq!(goodbye.event, "goodbye", "{rest:?}");
        assert_eq!(goodbye.json()["reason"], "shutdown");
        let at = goodbye.id.clone().expect("the goodbye sets the resume id");
        assert_eq!(goodbye.json()["resume"], at.as_str());
        assert!(
            got.last()
                .is_none_or(|last| position(last) <= position(&at)),
            "resume {at} is before the last event sent"
        );
        resume.push(at);
    }
    tokio::time::timeout(PATIENCE, gw.handle)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();

    // While it is down, more events commit; then it comes back on the same address.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut config = env.config();
    config.http_addr = addr;
    let gw = start(config).await;
    let mut a = Sse::open(addr, path, &[("last-event-id", &resume[0])]).await;
    let mut b = Sse::open(addr, &format!("{path}?from={}", resume[1]), &[]).await;
    producing.await.unwrap();

    let expected = env.positions("WHERE topic = 'courses'");
    assert_eq!(expected.len(), 500);
    for (sse, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
        let missing = expected.len() - got.len().min(expected.len());
        got.extend(event_ids(&sse.events(missing).await));
        assert_eq!(
            *got, expected,
            "every event exactly once, in position order"
        );
    }
    gw.stop().await;
}

fn position(text: &str) -> (u64, i64) {
    let (tx, id) = text.split_once('/').unwrap();
    (tx.parse().unwrap(), id.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_commits_late_is_sent_in_position_order_not_skipped() {
    let env = setup().await;
    let gw = start(env.config()).await;
    let mut live = Sse::open(gw.addr, "/v1/topics/courses/events", &[]).await;

    // T1 takes the lower id and transaction id but commits last.
    let t1 = connect(&env.pg.url()).await;
    t1.batch_execute(
        "BEGIN; INSERT INTO events (topic, payload) VALUES ('courses', '{\"n\": \"late\"}')",
    )
    .await
    .unwrap();
    let writer = connect(&env.pg.url()).await;
    produce(&writer, "courses", 1, 1).await;
    // The later commit is held back while T1 is open (nothing may be sent past T1's place).
    let early = tokio::time::timeout(Duration::from_millis(1500), live.next()).await;
    assert!(early.is_err(), "sent past an open transaction: {early:?}");
    t1.batch_execute("COMMIT; SELECT pg_notify('events', '')")
        .await
        .unwrap();

    let messages = live.events(2).await;
    let ids = event_ids(&messages);
    assert_eq!(ids, env.positions(""));
    let first = messages[0].json();
    assert_eq!(first["payload"]["n"], "late");
    assert!(first["id"].as_i64() < messages[1].json()["id"].as_i64());

    // A client catching up from the start sees the same order.
    let mut stored = Sse::open(gw.addr, "/v1/topics/courses/events?from=earliest", &[]).await;
    assert_eq!(event_ids(&stored.events(2).await), ids);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_behind_a_forced_purge_gets_a_gap_message_first() {
    let env = setup().await;
    produce(&env.admin, "courses", 10, 1).await;
    let before = env.positions("");
    let resume_at = before[2].clone();
    let purged = event_store::position::purge_batch(
        &env.admin,
        SystemTime::now() + Duration::from_secs(3600),
        None,
        1000,
        true,
    )
    .await
    .unwrap();
    assert_eq!(purged.deleted, 10);
    produce(&env.admin, "courses", 5, 1).await;
    let after = env.positions("");
    let gw = start(env.config()).await;

    let mut sse = Sse::open(
        gw.addr,
        "/v1/topics/courses/events",
        &[("last-event-id", &resume_at)],
    )
    .await;
    let gap = sse.expect().await;
    assert_eq!(gap.event, "gap", "{gap:?}");
    let body = gap.json();
    assert_eq!(body["missing_after"], resume_at.as_str());
    assert_eq!(body["missing_up_to"], before[9].as_str());
    assert_eq!(body["resumed_at"], after[0].as_str());
    assert_eq!(event_ids(&sse.events(5).await), after);

    // `earliest` means "whatever is stored": no gap.
    let mut sse = Sse::open(gw.addr, "/v1/topics/courses/events?from=earliest", &[]).await;
    let messages = sse.events(5).await;
    assert!(messages.iter().all(|m| m.is_event()), "{messages:?}");
    assert_eq!(event_ids(&messages), after);

    // Over WebSocket the gap is a control object.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/topics/courses/ws?from={resume_at}",
        gw.addr
    ))
    .await
    .unwrap();
    let first: serde_json::Value = serde_json::from_str(
        tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .to_text()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["control"], "gap");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_and_key_filters_in_catch_up_and_live() {
    let env = setup().await;
    // Stored before anyone connects.
    produce(&env.admin, "a", 6, 3).await;
    produce(&env.admin, "b", 6, 3).await;
    produce(&env.admin, "c", 6, 3).await;
    let gw = start(env.config()).await;
    let mut only_a = Sse::open(gw.addr, "/v1/topics/a/events?from=earliest", &[]).await;
    let mut a_b_k1 = Sse::open(
        gw.addr,
        "/v1/events?topic=a&topic=b&key=k1&from=earliest",
        &[],
    )
    .await;
    let mut all = Sse::open(gw.addr, "/v1/events?from=earliest", &[]).await;
    assert_eq!(event_ids(&only_a.events(6).await).len(), 6);
    // Then live ones.
    produce(&env.admin, "c", 3, 3).await;
    produce(&env.admin, "a", 3, 3).await;
    produce(&env.admin, "b", 3, 3).await;

    let want_a = env.positions("WHERE topic = 'a'");
    let want_a_b_k1 = env.positions("WHERE topic IN ('a', 'b') AND key = 'k1'");
    assert_eq!(want_a.len(), 9);
    assert_eq!(want_a_b_k1.len(), 6);
    let mut got_a = want_a[..6].to_vec();
    got_a.extend(event_ids(&only_a.events(3).await));
    assert_eq!(got_a, want_a);
    let messages = a_b_k1.events(6).await;
    assert_eq!(event_ids(&messages), want_a_b_k1);
    for m in &messages {
        assert_eq!(m.json()["key"], "k1");
    }
    assert_eq!(event_ids(&all.events(27).await), env.positions(""));
    // Nothing else arrives for the filtered streams.
    let extra = tokio::time::timeout(Duration::from_millis(500), a_b_k1.next()).await;
    assert!(extra.is_err(), "unexpected: {extra:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_deliver_the_same_events() {
    let env = setup().await;
    produce(&env.admin, "courses", 5, 2).await;
    let gw = start(env.config()).await;
    let mut sse = Sse::open(gw.addr, "/v1/topics/courses/events?from=earliest", &[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/topics/courses/ws?from=earliest",
        gw.addr
    ))
    .await
    .expect("WebSocket handshake");
    produce(&env.admin, "courses", 5, 2).await;

    let sse_objects: Vec<serde_json::Value> =
        sse.events(10).await.iter().map(|m| m.json()).collect();
    let mut ws_objects = Vec::new();
    while ws_objects.len() < 10 {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("no error");
        if message.is_text() {
            ws_objects.push(
                serde_json::from_str::<serde_json::Value>(message.to_text().unwrap()).unwrap(),
            );
        }
    }
    assert_eq!(ws_objects, sse_objects);
    let positions: Vec<String> = sse_objects
        .iter()
        .map(|o| o["position"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(positions, env.positions(""));
    let first = &sse_objects[0];
    for field in [
        "position",
        "id",
        "event_id",
        "topic",
        "key",
        "type",
        "created_at",
        "payload",
        "headers",
    ] {
        assert!(first.get(field).is_some(), "{field} missing from {first}");
    }
    assert_eq!(first["type"], "created");
    assert_eq!(first["payload"]["n"], 1);

    // On shutdown the WebSocket also gets a goodbye with its resume position, then a close.
    gw.shutdown.cancel();
    let mut last = None;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(PATIENCE, ws.next()).await {
        if message.is_text() {
            last = Some(
                serde_json::from_str::<serde_json::Value>(message.to_text().unwrap()).unwrap(),
            );
        }
        if message.is_close() {
            break;
        }
    }
    let goodbye = last.expect("a goodbye");
    assert_eq!(goodbye["control"], "goodbye");
    assert_eq!(goodbye["resume"], positions[9].as_str());
    tokio::time::timeout(PATIENCE, gw.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_clients_share_one_fetch_per_wake_up() {
    let env = setup().await;
    let mut config = env.config();
    // Only wake-ups trigger fetches during the test.
    config.poll_interval = Duration::from_secs(3600);
    let gw = start(config).await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(Sse::open(gw.addr, "/v1/topics/courses/events", &[]).await);
    }
    let live = r#"gateway_fetches_total{reader="live"}"#;
    let fetches_before = metric(gw.addr, live).await;
    let wakeups_before = metric(gw.addr, "gateway_wakeups_total").await;
    for _ in 0..5 {
        produce(&env.admin, "courses", 3, 1).await;
        for client in &mut clients {
            client.events(3).await;
        }
    }
    let fetches = metric(gw.addr, live).await - fetches_before;
    let wakeups = metric(gw.addr, "gateway_wakeups_total").await - wakeups_before;
    assert!((1.0..=5.0).contains(&wakeups), "wake-ups: {wakeups}");
    // One fetch per wake-up (a second only when a batch was full or an open transaction held
    // rows back), for 30 clients: nowhere near one per client.
    assert!(
        fetches <= 2.0 * wakeups,
        "{fetches} fetches for {wakeups} wake-ups"
    );
    assert_eq!(
        metric(gw.addr, r#"gateway_fetches_total{reader="catch_up"}"#).await,
        0.0
    );
    assert_eq!(metric(gw.addr, "gateway_clients").await, 30.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_dropped_with_its_resume_position_while_a_fast_one_keeps_up() {
    let env = setup().await;
    let mut config = env.config();
    config.client_buffer = 8;
    config.slow_client_timeout = Duration::from_secs(2);
    let gw = start(config).await;
    let path = "/v1/topics/courses/events";
    let mut fast = Sse::open(gw.addr, path, &[]).await;
    // A tiny socket receive buffer, and it does not read for a while.
    let mut slow = Sse::open_small_buffer(gw.addr, path).await;

    // Events far larger than the kernel and HTTP buffers between the gateway and the slow client.
    let n = 400usize;
    env.admin
        .execute(
            "INSERT INTO events (topic, payload)
             SELECT 'courses', jsonb_build_object('n', g, 'pad', repeat('x', 32768))
               FROM generate_series(1, $1::bigint) AS g",
            &[&(n as i64)],
        )
        .await
        .unwrap();
    env.admin
        .execute("SELECT pg_notify('events', '')", &[])
        .await
        .unwrap();
    let expected = env.positions("");

    let fast_reader = tokio::spawn(async move {
        let messages = fast.events(n).await;
        (messages, fast)
    });
    let (fast_messages, _fast) = fast_reader.await.unwrap();
    assert!(
        fast_messages.iter().all(|m| m.is_event()),
        "the fast client was not dropped"
    );
    assert_eq!(event_ids(&fast_messages), expected);

    // By now the slow client's queue has been full for longer than the timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rest = slow.rest().await;
    let goodbye = rest.last().expect("a goodbye");
    assert_eq!(goodbye.event, "goodbye");
    assert_eq!(goodbye.json()["reason"], "slow_client");
    let received = event_ids(&rest);
    assert!(
        received.len() < n,
        "the slow client was dropped before the end"
    );
    let resume = goodbye.id.clone().unwrap();
    assert_eq!(Some(&resume), received.last().or(Some(&resume)));
    assert_eq!(
        metric(
            gw.addr,
            r#"gateway_clients_closed_total{reason="slow_client"}"#
        )
        .await,
        1.0
    );

    // Resuming from the goodbye's position completes the stream: nothing lost, nothing twice.
    let mut again = Sse::open(gw.addr, path, &[("last-event-id", &resume)]).await;
    let mut all = received.clone();
    all.extend(event_ids(&again.events(n - received.len()).await));
    assert_eq!(all, expected);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_keeps_live_streams_open_and_loses_nothing() {
    let mut env = setup().await;
    let gw = start(env.config()).await;
    let addr = gw.addr;
    let mut live = Sse::open(addr, "/v1/topics/courses/events", &[]).await;
    produce(&env.admin, "courses", 3, 1).await;
    let mut got = event_ids(&live.events(3).await);

    let pg = tokio::task::spawn_blocking(move || {
        env.pg.stop();
        env
    });
    env = pg.await.unwrap();
    // Health says so; a client that needs stored events is told where to resume.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(addr, "/healthz", &[]).await.unwrap();
        if status == 503 {
            assert!(body.contains("postgres"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never failed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resume = got[1].clone();
    let mut stored = Sse::open(
        addr,
        &format!("/v1/topics/courses/events?from={resume}"),
        &[],
    )
    .await;
    let bye = stored.rest().await;
    let goodbye = bye.last().expect("a goodbye");
    assert_eq!(goodbye.json()["reason"], "database_unavailable", "{bye:?}");
    assert_eq!(goodbye.id.as_deref(), Some(resume.as_str()));

    let env = tokio::task::spawn_blocking(move || {
        env.pg.restart();
        env
    })
    .await
    .unwrap();
    let writer = connect(&env.pg.url()).await;
    produce(&writer, "courses", 4, 1).await;
    // The same live stream carries on.
    got.extend(event_ids(&live.events(4).await));
    assert_eq!(got, env.positions(""));
    gw.stop().await;
}

/// Causal order, live and from a catch-up: A writes an unrelated row first, B appends and
/// commits, A appends after seeing B's commit. Both streams deliver 1, 2, 3, … (B before A each
/// round), the order the events became visible in, not the order the transactions began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_after_a_commit_is_streamed_after_it() {
    let env = setup().await;
    env.admin
        .batch_execute("CREATE TABLE audit (n int)")
        .await
        .unwrap();
    let gw = start(env.config()).await;
    let path = "/v1/topics/o/events";
    let mut live = Sse::open(gw.addr, &format!("{path}?from=latest"), &[]).await;
    assert_eq!(live.status, 200);
    let a = connect(&env.pg.url()).await;
    let b = connect(&env.pg.url()).await;
    let append = |seq: i64| {
        format!(
            "INSERT INTO events (topic, key, payload) VALUES ('o', 'k', '{{\"seq\": {seq}}}');
             SELECT pg_notify('events', '')"
        )
    };
    for round in 0..3 {
        a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
            .await
            .unwrap();
        b.batch_execute(&append(2 * round + 1)).await.unwrap();
        a.batch_execute(&format!("{}; COMMIT", append(2 * round + 2)))
            .await
            .unwrap();
    }
    let seqs = |messages: &[Message]| -> Vec<i64> {
        messages
            .iter()
            .map(|m| m.json()["payload"]["seq"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&live.events(6).await), [1, 2, 3, 4, 5, 6], "live");
    let mut replay = Sse::open(gw.addr, &format!("{path}?from=earliest"), &[]).await;
    assert_eq!(
        seqs(&replay.events(6).await),
        [1, 2, 3, 4, 5, 6],
        "catch-up"
    );
    gw.stop().await;
}

/// Catch-up and live over 8 KiB and 1 MiB payloads (compressible and not): every event once, in
/// order. Batches are cut by the byte bound (`--batch-max-bytes`), and the catch-up reader adapts
/// to payloads stored compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_arrive_once_in_order_in_catch_up_and_live() {
    let env = setup().await;
    let insert = |from: i64, to: i64, huge: bool| {
        let pad = if huge {
            "CASE WHEN g % 2 = 0 THEN repeat('x', 1 << 20)
                  ELSE (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 32768) AS i) END"
        } else {
            "repeat(md5(g::text), 256)"
        };
        format!(
            "INSERT INTO events (topic, payload)
             SELECT 'big', jsonb_build_object('n', g, 'pad', {pad})
               FROM generate_series({from}, {to}) AS g;
             SELECT pg_notify('events', '')"
        )
    };
    env.admin
        .batch_execute(&insert(1, 1500, false))
        .await
        .unwrap();
    env.admin
        .batch_execute(&insert(1501, 1506, true))
        .await
        .unwrap();
    let mut config = env.config();
    config.batch_max_bytes = 1 << 20;
    let gw = start(config).await;
    let ns = |messages: &[Message]| -> Vec<i64> {
        messages
            .iter()
            .filter(|m| m.is_event())
            .map(|m| m.json()["payload"]["n"].as_i64().unwrap())
            .collect()
    };
    let mut sse = Sse::open(gw.addr, "/v1/topics/big/events?from=earliest", &[]).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        ns(&sse.events(1506).await),
        (1..=1506).collect::<Vec<_>>(),
        "catch-up"
    );
    env.admin
        .batch_execute(&insert(1507, 1806, false))
        .await
        .unwrap();
    env.admin
        .batch_execute(&insert(1807, 1810, true))
        .await
        .unwrap();
    assert_eq!(
        ns(&sse.events(304).await),
        (1507..=1810).collect::<Vec<_>>(),
        "live"
    );
    gw.stop().await;
}
