//! Live fan-out and catch-up of the `gateway` binary, each against a raw baseline measured in the
//! same run (`cargo bench -p gateway --bench fan_out`).
//!
//! 1. **Catch-up to one SSE client**: `BENCH_CATCH_UP_EVENTS` (default 100 000) stored events
//!    streamed from `from=earliest` to one SSE client, vs the raw position read (the shared
//!    `Reader::fetch`, same batch size, rows decoded, nothing sent) and vs the consumer's null-sink
//!    catch-up of the same rows. Rounds alternate (`BENCH_ROUNDS`, default 3); best of each.
//! 2. **Fan-out**: `BENCH_CLIENTS` (default 1000) SSE clients on one topic while events commit one
//!    per transaction at each rate of `BENCH_RATES` (default 100,1000 events/s) for
//!    `BENCH_SECONDS` (default 5): events/s delivered (all clients), commit→client latency
//!    p50/p99 (the writer sends its one-statement transaction → a client has parsed the frame,
//!    so insert and commit are included), database fetches
//!    per wake-up (from the gateway's /metrics), gateway CPU (utime+stime) and RSS per client.
//!    Delivered events/s is set against the raw position read of part 1 (rows/s).
//!
//! The gateway runs as the real binary in a child process (its CPU and memory are its own); the
//! clients are real HTTP/1.1 connections from this process, sharing the machine with it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use consumer::sink::{NullSink, Observed};
use event_store::position::{Position, Reader};
use event_store::{db, migrations};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use testbed::machine::ProcStat;
use testbed::{env_or, Postgres};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const USER: &str = "bench_gateway";

#[tokio::main]
async fn main() {
    let catch_up_events: i64 = env_or("BENCH_CATCH_UP_EVENTS", 100_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let clients: usize = env_or("BENCH_CLIENTS", 1000);
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();

    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(&format!("CREATE ROLE {USER} LOGIN IN ROLE events_consumer"))
        .await
        .unwrap();
    let url = pg.url_for(USER, None);

    // --- 1. catch-up --------------------------------------------------------------------------
    admin
        .execute(
            "INSERT INTO events (topic, key, type, payload)
             SELECT 'stored', 'k' || (g % 100), 'created',
                    jsonb_build_object('n', g, 'name', 'event number ' || g, 'ok', true)
               FROM generate_series(1, $1::bigint) AS g",
            &[&catch_up_events],
        )
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
    let last = last_position(&admin).await;
    let mut gateway = Gateway::start(&url, &[]).await;
    let (mut raw, mut ours, mut consumer) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let before = Cpu::now(&gateway);
        raw.push(raw_read(&url, last).await);
        let after_raw = Cpu::now(&gateway);
        consumer.push(consumer_null_sink(&url, last, round).await);
        let after_consumer = Cpu::now(&gateway);
        ours.push(sse_catch_up(gateway.addr, catch_up_events as usize).await);
        let after_gateway = Cpu::now(&gateway);
        eprintln!(
            "round {round}: raw {:?} ({}), consumer {:?} ({}), gateway {:?} ({})",
            raw[round],
            after_raw.since(&before),
            consumer[round],
            after_consumer.since(&after_raw),
            ours[round],
            after_gateway.since(&after_consumer),
        );
    }
    let rate = |runs: &[Duration]| catch_up_events as f64 / best(runs).as_secs_f64();
    let (raw_rate, ours_rate, consumer_rate) = (rate(&raw), rate(&ours), rate(&consumer));
    println!("catch-up of {catch_up_events} stored events to one SSE client (best of {rounds}):");
    println!("  raw position read (Reader::fetch, batches of 1000): {raw_rate:>10.0} events/s");
    println!(
        "  consumer, null sink:                                {consumer_rate:>10.0} events/s"
    );
    println!(
        "  gateway → SSE client:                               {ours_rate:>10.0} events/s  \
         = {:.2}x raw, {:.2}x consumer",
        ours_rate / raw_rate,
        ours_rate / consumer_rate
    );
    gateway.stop();

    // --- 2. fan-out -----------------------------------------------------------------------------
    println!("\nfan-out: {clients} SSE clients on one topic, one event per transaction, {seconds} s per rate:");
    for rate in rates {
        let mut gateway = Gateway::start(&url, &[]).await;
        let idle = gateway.usage();
        let fan = fan_out(&gateway, &pg.url(), clients, rate, seconds).await;
        let cpu_per_s = (fan.cpu_end - fan.cpu_start) / fan.elapsed.as_secs_f64();
        println!(
            "  {rate:>5} events/s: delivered {:>9.0} events/s ({} of {} expected) = {:.3}x raw read; \
             latency p50 {:.2} ms, p99 {:.2} ms; {:.2} fetches per wake-up ({} wake-ups); \
             gateway CPU {:.0}% of a core, RSS {} MiB ({:.1} KiB per client over idle {} MiB)",
            fan.delivered as f64 / fan.elapsed.as_secs_f64(),
            fan.delivered,
            fan.expected,
            fan.delivered as f64 / fan.elapsed.as_secs_f64() / raw_rate,
            fan.p50_ms,
            fan.p99_ms,
            fan.fetches / fan.wakeups.max(1.0),
            fan.wakeups,
            cpu_per_s * 100.0,
            fan.rss_kib / 1024,
            (fan.rss_kib.saturating_sub(idle.1)) as f64 / clients as f64,
            idle.1 / 1024,
        );
        gateway.stop();
    }
}

/// CPU seconds used so far by PostgreSQL (every `postgres` process, and the backends that have
/// exited, which the postmaster's children counters hold), the gateway and this benchmark (the
/// raw reader, the consumer and the SSE client): where a round's time went on the shared cores.
struct Cpu {
    postgres: f64,
    gateway: f64,
    bench: f64,
}

impl Cpu {
    fn now(gateway: &Gateway) -> Cpu {
        Cpu {
            postgres: ProcStat::all()
                .iter()
                .filter(|p| p.command == "postgres")
                .map(ProcStat::total_cpu)
                .sum(),
            gateway: gateway.usage().0,
            bench: ProcStat::of_self().cpu,
        }
    }

    fn since(&self, before: &Cpu) -> String {
        format!(
            "CPU ms: postgres {:.0}, gateway {:.0}, bench {:.0}",
            (self.postgres - before.postgres) * 1e3,
            (self.gateway - before.gateway) * 1e3,
            (self.bench - before.bench) * 1e3
        )
    }
}

fn best(runs: &[Duration]) -> Duration {
    runs.iter().copied().min().unwrap()
}

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "gateway-bench").unwrap())
        .await
        .unwrap()
}

async fn last_position(admin: &Client) -> Position {
    let row = admin
        .query_one(
            "SELECT e.tx_id::text, e.id FROM events e ORDER BY e.tx_id DESC, e.id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    Position::new(row.get::<_, &str>(0).parse().unwrap(), row.get(1))
}

/// The baseline: the shared position read, batch after batch, nothing sent anywhere.
async fn raw_read(url: &str, last: Position) -> Duration {
    let client = connect(url).await;
    let reader = Reader::prepare(&client).await.unwrap();
    let started = Instant::now();
    let mut after = Position::START;
    while after < last {
        let batch = reader.fetch(&client, after, 1000, None).await.unwrap();
        std::hint::black_box(&batch.events);
        after = batch.end.expect("rows up to the last position");
    }
    started.elapsed()
}

async fn consumer_null_sink(url: &str, last: Position, round: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut config = consumer::Config::new(url, None);
    config.name = format!("bench{round}");
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run_with(
        config,
        Observed::new(NullSink::new(), tx),
        shutdown.clone(),
    ));
    while let Some(delivered) = rx.recv().await {
        if delivered.end >= last {
            break;
        }
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    elapsed
}

/// The `gateway` binary as a child process (stopped on drop, also when the benchmark fails).
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

impl Gateway {
    async fn start(url: &str, extra: &[(&str, &str)]) -> Gateway {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
        command
            .env("DATABASE_URL", url)
            .env("GATEWAY_OPEN", "true")
            .env("HTTP_ADDR", addr.to_string())
            .env("GATEWAY_MAX_CLIENTS", "100000")
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null());
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn().expect("start the gateway binary");
        let deadline = Instant::now() + Duration::from_secs(60);
        while get_text(addr, "/healthz").await.as_deref() != Some("ok\n") {
            assert!(Instant::now() < deadline, "the gateway did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Gateway { child, addr }
    }

    /// (CPU seconds used so far, RSS in KiB) from /proc.
    fn usage(&self) -> (f64, u64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0);
        (ProcStat::of(pid).map_or(0.0, |p| p.cpu), rss)
    }

    fn stop(&mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

async fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .ok()?
        .ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = get_text(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Opens an SSE stream and calls `on_frame` with each complete frame's bytes until it returns
/// false or the stream ends.
async fn stream(addr: SocketAddr, path: &str, mut on_frame: impl FnMut(&[u8]) -> bool) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        let mut start = 0;
        while let Some(end) = find(&buffer[start..], b"\n\n") {
            if !on_frame(&buffer[start..start + end]) {
                return;
            }
            start += end + 2;
        }
        buffer.drain(..start);
    }
}

/// The client's frame search: memmem, as a browser's parser would be, so that the client (which
/// shares the 2 cores with the gateway and PostgreSQL here) costs what a real one does.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// One client streaming every stored event.
async fn sse_catch_up(addr: SocketAddr, n: usize) -> Duration {
    let started = Instant::now();
    let mut seen = 0;
    stream(addr, "/v1/topics/stored/events?from=earliest", |frame| {
        if frame.starts_with(b"event: created") {
            seen += 1;
        }
        seen < n
    })
    .await;
    assert_eq!(seen, n, "every stored event arrived");
    started.elapsed()
}

struct FanOut {
    delivered: usize,
    expected: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    fetches: f64,
    wakeups: f64,
    cpu_start: f64,
    cpu_end: f64,
    /// With every client connected.
    rss_kib: u64,
}

async fn fan_out(
    gateway: &Gateway,
    owner_url: &str,
    clients: usize,
    rate: u64,
    seconds: u64,
) -> FanOut {
    let addr = gateway.addr;
    let total = (rate * seconds) as usize;
    // Commit times, by sequence number, in nanoseconds since `origin`.
    let origin = Instant::now();
    let committed: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let connected = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..clients {
        let committed = committed.clone();
        let connected = connected.clone();
        readers.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(total);
            let mut first = true;
            stream(addr, "/v1/topics/live/events", |frame| {
                if first {
                    first = false;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(at) = find(frame, b"\"seq\":") {
                    // jsonb text: `"seq": 12` (a space after the colon).
                    let digits = frame[at + 6..].trim_ascii_start();
                    let end = digits
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(digits.len());
                    let seq: usize = std::str::from_utf8(&digits[..end])
                        .unwrap()
                        .parse()
                        .unwrap();
                    let now = origin.elapsed().as_nanos() as u64;
                    let at = committed[seq].load(Ordering::Acquire);
                    latencies.push((now.saturating_sub(at) / 1000) as u32);
                    if seq + 1 == total {
                        return false;
                    }
                }
                true
            })
            .await;
            latencies
        }));
    }
    // Every client has its stream open (the preamble arrived) before the first commit.
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < clients {
        assert!(Instant::now() < deadline, "clients did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, rss_connected) = gateway.usage();
    let fetches_before = metric(addr, r#"gateway_fetches_total{reader="live"}"#).await;
    let wakeups_before = metric(addr, "gateway_wakeups_total").await;
    let (cpu_start, _) = gateway.usage();

    let writer = connect(owner_url).await;
    let insert = writer
        .prepare(
            "WITH e AS (INSERT INTO events (topic, payload) VALUES ('live', jsonb_build_object('seq', $1::bigint)) RETURNING id)
             SELECT pg_notify('events', '') FROM e",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..total {
        tick.tick().await;
        // Stamped as the one-statement transaction is sent: the latency includes its insert and
        // commit (a stamp taken after the acknowledgement could come after a client has the event).
        committed[seq].store(origin.elapsed().as_nanos() as u64, Ordering::Release);
        writer.execute(&insert, &[&(seq as i64)]).await.unwrap();
    }
    let mut latencies = Vec::new();
    let mut delivered = 0;
    for reader in readers {
        let got = tokio::time::timeout(Duration::from_secs(300), reader)
            .await
            .expect("clients finish")
            .unwrap();
        delivered += got.len();
        latencies.extend(got);
    }
    let elapsed = started.elapsed();
    let (cpu_end, _) = gateway.usage();
    let fetches = metric(addr, r#"gateway_fetches_total{reader="live"}"#).await - fetches_before;
    let wakeups = metric(addr, "gateway_wakeups_total").await - wakeups_before;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|us| *us as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    FanOut {
        delivered,
        expected: total * clients,
        elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        fetches,
        wakeups,
        cpu_start,
        cpu_end,
        rss_kib: rss_connected,
    }
}
