//! Who may open which stream, and how refusals and bad input are answered.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const READER: &str = "reader-token-0123456789";
const ADMIN: &str = "admin-token-0123456789ab";

fn tokens_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "# test tokens\n{READER} courses,policies\n{ADMIN} *").unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_topics_401_without_one_403_outside_it() {
    let env = setup().await;
    let tokens = tokens_file();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    config.allowed_origins = vec!["https://app.example.com".into()];
    let gw = start(config).await;
    let addr = gw.addr;
    let bearer = format!("Bearer {READER}");

    let (status, headers, body) = get_full(addr, "/v1/topics/courses/events", &[])
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"pgevents\"");
    assert!(body.contains("access token"), "{body}");
    let (status, _) = get(
        addr,
        "/v1/topics/courses/events?access_token=wrong-token-000000000",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = get(
        addr,
        "/v1/topics/courses/events",
        &[("authorization", "Bearer nope")],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, body) = get(
        addr,
        "/v1/topics/secrets/events",
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    assert!(body.contains("\"secrets\""), "{body}");
    let (status, _) = get(
        addr,
        &format!("/v1/events?topic=courses&topic=secrets&access_token={READER}"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    // All topics need `*`.
    let (status, _) = get(addr, &format!("/v1/events?access_token={READER}"), &[])
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = get(addr, "/v1/topics/secrets/ws", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(status, 403, "the WebSocket route checks before upgrading");
    let (status, _) = get(addr, "/v1/topics/courses/ws", &[]).await.unwrap();
    assert_eq!(status, 401);

    // Granted: by header and by query (browsers), and `*` reads anything.
    produce(&env.admin, "courses", 2, 1).await;
    produce(&env.admin, "secrets", 1, 1).await;
    let mut by_header = Sse::open(
        addr,
        "/v1/topics/courses/events?from=earliest",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(by_header.status, 200);
    assert_eq!(by_header.events(2).await.len(), 2);
    let mut by_query = Sse::open(
        addr,
        &format!("/v1/topics/courses/events?from=earliest&access_token={READER}"),
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(by_query.status, 200);
    assert_eq!(
        by_query.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(by_query.events(2).await.len(), 2);
    let mut admin = Sse::open(
        addr,
        &format!("/v1/events?from=earliest&access_token={ADMIN}"),
        &[("origin", "https://evil.example.net")],
    )
    .await;
    assert_eq!(admin.status, 200);
    assert!(
        admin.headers.get("access-control-allow-origin").is_none(),
        "an origin outside the allow-list gets no CORS grant"
    );
    assert_eq!(admin.events(3).await.len(), 3);

    // The CORS preflight from an allowed origin.
    let (status, headers, _) = get_full(
        addr,
        "/v1/topics/courses/events",
        &[("origin", "https://app.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "CORS does not replace the token");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_answer_503_with_retry_after_and_bad_input_is_explained() {
    let env = setup().await;
    let tokens = tokens_file();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    config.max_clients = 3;
    config.max_clients_per_token = 2;
    let gw = start(config).await;
    let addr = gw.addr;
    let path = format!("/v1/topics/courses/events?access_token={READER}");
    let first = Sse::open(addr, &path, &[]).await;
    let _second = Sse::open(addr, &path, &[]).await;
    assert_eq!(first.status, 200);
    let (status, headers, body) = get_full(addr, &path, &[]).await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("--max-clients-per-token"), "{body}");
    let retry: u32 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let _third = Sse::open(addr, &format!("/v1/events?access_token={ADMIN}"), &[]).await;
    let (status, _, body) = get_full(addr, &format!("/v1/events?access_token={ADMIN}"), &[])
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("--max-clients"), "{body}");
    // A closed stream frees its place.
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let again = Sse::open(addr, &path, &[]).await;
        if again.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad input: named, not guessed at.
    let auth = [("authorization", "Bearer admin-token-0123456789ab")];
    drop(_third);
    let (status, body) = get(addr, "/v1/topics/courses/events?from=yesterday", &auth)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("TX_ID/ID"), "{body}");
    let (status, body) = get(addr, "/v1/topics/bad%20topic/events", &auth)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("bad topic"), "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_foreign_last_event_id_streams_from_now_and_says_so_first() {
    let env = setup().await;
    produce(&env.admin, "courses", 3, 1).await;
    let gw = start(env.config()).await;
    let path = "/v1/topics/courses/events";
    // EventSource gives up for good on a non-200 answer: a bad id must not cost the client.
    let mut sse = Sse::open(gw.addr, path, &[("last-event-id", "not-a-position")]).await;
    assert_eq!(sse.status, 200);
    let reset = sse.expect().await;
    assert_eq!(reset.event, "reset");
    assert!(reset.json()["reason"]
        .as_str()
        .unwrap()
        .contains("Last-Event-ID"));
    let stored = env.positions("");
    assert_eq!(
        reset.id.as_deref(),
        Some(stored[2].as_str()),
        "streams from now"
    );
    produce(&env.admin, "courses", 1, 1).await;
    let live = sse.events(1).await;
    assert_eq!(event_ids(&live), env.positions("")[3..].to_vec());

    // A position no transaction of this database has reached yet (another cluster's).
    let mut sse = Sse::open(gw.addr, path, &[("last-event-id", "999999999999/1")]).await;
    let reset = sse.expect().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert!(
        reset.json()["reason"].as_str().unwrap().contains("ahead"),
        "{reset:?}"
    );
    gw.stop().await;
}
