//! The `gateway` command line. Every option has an environment twin (the names the compose file
//! uses) and a doc comment, which becomes `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use services::config::{parse_bytes, parse_duration, ChannelArgs, LogArgs, PostgresArgs};

use crate::error::{Error, Result};

/// Pushes the event stream live to browsers and services over Server-Sent Events and WebSocket.
/// Every event carries its position; a client that reconnects with `Last-Event-ID` (or
/// `?from=POSITION`) gets exactly what it missed, then live events, with no gap and no duplicate.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version)]
pub struct Config {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Address to serve the streams, the demo page, /healthz and /metrics on, e.g. 0.0.0.0:8084.
    #[arg(
        long = "http-addr",
        env = "HTTP_ADDR",
        default_value = "127.0.0.1:8084"
    )]
    pub http_addr: SocketAddr,

    /// File of access tokens, one per line: `TOKEN TOPIC[,TOPIC...]` (`*` = every topic); blank
    /// lines and lines starting with `#` are skipped. Clients send a token as
    /// `Authorization: Bearer TOKEN` or `?access_token=TOKEN` (browsers' EventSource cannot set
    /// headers). Required unless --open.
    #[arg(long = "tokens-file", env = "GATEWAY_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Serve every topic to anyone, without tokens. For a local demo only: never expose an open
    /// gateway.
    #[arg(long = "open", env = "GATEWAY_OPEN", conflicts_with = "tokens_file")]
    pub open: bool,

    /// Origins whose pages may read the streams (CORS) and open WebSockets, comma-separated, e.g.
    /// https://app.example.com,http://localhost:3000. `*` lets any page read them without
    /// credentials (answered `Access-Control-Allow-Origin: *`); the origin `null` is never
    /// allowed. Default: same origin only. A WebSocket handshake from another origin gets 403.
    #[arg(
        long = "allowed-origins",
        env = "GATEWAY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Host names (the `Host` header, port ignored) the gateway answers, comma-separated, e.g.
    /// events.example.com,localhost; `*` answers any. Other hosts get 403, so a DNS-rebinding page
    /// cannot reach a gateway it was not meant to. Default: localhost, 127.0.0.1 and ::1 plus the
    /// hosts of --allowed-origins when the gateway listens on loopback or runs --open; any host
    /// otherwise (a token is then what protects the streams).
    #[arg(
        long = "allowed-hosts",
        env = "GATEWAY_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// Most TCP connections open at once (streams, requests and idle ones together); past it new
    /// connections are closed at once. At start-up the open-file limit (RLIMIT_NOFILE) is raised to
    /// fit it, and this cap is lowered, with a warning, when the hard limit is too low.
    #[arg(
        long = "max-connections",
        env = "GATEWAY_MAX_CONNECTIONS",
        default_value_t = 12_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Most TCP connections open at once from one client IP address; past it that address's new
    /// connections are closed at once. Behind a reverse proxy every client has the proxy's
    /// address: raise it to --max-connections there.
    #[arg(
        long = "max-connections-per-address",
        env = "GATEWAY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections_per_address: u32,

    /// How long a connection may go without sending a complete request head: counted from the
    /// connection's start and, on a keep-alive connection, from the end of each response, so it
    /// is also the idle keep-alive timeout. A connection past it is closed (streams already
    /// answered are not affected).
    #[arg(
        long = "header-read-timeout",
        env = "GATEWAY_HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub header_read_timeout: Duration,

    /// Most streams open at once; past it new streams get 503 with Retry-After.
    #[arg(
        long = "max-clients",
        env = "GATEWAY_MAX_CLIENTS",
        default_value_t = 10_000
    )]
    pub max_clients: usize,

    /// Most streams open at once per token; past it that token's new streams get 503 with
    /// Retry-After.
    #[arg(
        long = "max-clients-per-token",
        env = "GATEWAY_MAX_CLIENTS_PER_TOKEN",
        default_value_t = 100
    )]
    pub max_clients_per_token: usize,

    /// Messages buffered per client. A client whose buffer stays full (--slow-client-timeout) is
    /// sent a final `goodbye` with the position to resume from and disconnected, so it can never
    /// slow the others.
    #[arg(
        long = "client-buffer",
        env = "GATEWAY_CLIENT_BUFFER",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(2..=1_000_000)
    )]
    pub client_buffer: u32,

    /// How long a live event may wait for room in a client's full buffer before that client is
    /// dropped (with its resume position).
    #[arg(
        long = "slow-client-timeout",
        env = "GATEWAY_SLOW_CLIENT_TIMEOUT",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub slow_client_timeout: Duration,

    /// Clients reading stored events (catching up) at once; the others wait their turn, so a crowd
    /// of reconnecting clients cannot swamp the database.
    #[arg(
        long = "catch-up-concurrency",
        env = "GATEWAY_CATCH_UP_CONCURRENCY",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=256)
    )]
    pub catch_up_concurrency: u32,

    /// Events read per database fetch (live and catch-up).
    #[arg(
        long = "batch-size",
        env = "GATEWAY_BATCH_SIZE",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub batch_size: u32,

    /// Bytes of payload and headers per database fetch, as well as --batch-size (live and
    /// catch-up): memory stays bounded whatever the payloads. A single larger event still comes
    /// alone. Accepts B, KiB, MiB.
    #[arg(
        long = "batch-max-bytes",
        env = "GATEWAY_BATCH_MAX_BYTES",
        default_value = "4MiB",
        value_parser = parse_bytes
    )]
    pub batch_max_bytes: usize,

    /// Comment lines sent on idle streams so proxies keep them open.
    #[arg(
        long = "heartbeat-interval",
        env = "GATEWAY_HEARTBEAT_INTERVAL",
        default_value = "15s",
        value_parser = parse_duration
    )]
    pub heartbeat_interval: Duration,

    /// Streams are closed (with a `goodbye` and their resume position) after this long, so clients
    /// reconnect and their token is checked again: a token removed from the file loses its streams.
    #[arg(
        long = "max-stream-age",
        env = "GATEWAY_MAX_STREAM_AGE",
        default_value = "1h",
        value_parser = parse_duration
    )]
    pub max_stream_age: Duration,

    /// Fallback poll: the longest a lost wake-up can delay live events.
    #[arg(
        long = "poll-interval",
        env = "GATEWAY_POLL_INTERVAL",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub poll_interval: Duration,

    #[command(flatten)]
    pub channel: ChannelArgs,

    /// How long streams get to say goodbye on SIGTERM before the process exits anyway.
    #[arg(
        long = "shutdown-grace",
        env = "GATEWAY_SHUTDOWN_GRACE",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// A configuration with every default, for tests and benchmarks (the binary parses its own).
    pub fn new(database_url: impl Into<String>) -> Config {
        Config::try_parse_from(["gateway", "--database-url", &database_url.into(), "--open"])
            .expect("the defaults parse")
    }

    /// The CORS allow-list, without empty entries (an empty `GATEWAY_ALLOWED_ORIGINS` is none).
    pub fn origins(&self) -> Vec<String> {
        self.allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect()
    }

    /// Checks what clap cannot. Errors are configuration errors.
    pub fn validate(&self) -> Result<()> {
        if self.tokens_file.is_none() && !self.open {
            return Err(Error::Config(
                "no --tokens-file / GATEWAY_TOKENS_FILE: give a file of `TOKEN TOPIC[,TOPIC...]` \
                 lines, or --open / GATEWAY_OPEN=true for an unauthenticated local demo"
                    .into(),
            ));
        }
        for (what, value) in [
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--poll-interval", self.poll_interval),
            ("--max-stream-age", self.max_stream_age),
            ("--slow-client-timeout", self.slow_client_timeout),
            ("--header-read-timeout", self.header_read_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{what} must be greater than zero")));
            }
        }
        if self.max_clients == 0 || self.max_clients_per_token == 0 {
            return Err(Error::Config(
                "--max-clients and --max-clients-per-token must be at least 1".into(),
            ));
        }
        for origin in self.origins() {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "--allowed-origins / GATEWAY_ALLOWED_ORIGINS: {origin:?} is not an origin \
                     (expected scheme://host[:port] such as https://app.example.com, or *)"
                )));
            }
        }
        for host in self.hosts_listed() {
            if host != "*"
                && (host.contains('/')
                    || host.contains('@')
                    || host.contains(' ')
                    || host.is_empty())
            {
                return Err(Error::Config(format!(
                    "--allowed-hosts / GATEWAY_ALLOWED_HOSTS: {host:?} is not a host name \
                     (expected e.g. events.example.com, 127.0.0.1, [::1], or *)"
                )));
            }
        }
        Ok(())
    }

    fn hosts_listed(&self) -> Vec<String> {
        self.allowed_hosts
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect()
    }

    /// The `Host` allow-list in force (see `--allowed-hosts`): `None` answers any host.
    pub fn hosts(&self) -> Option<Vec<String>> {
        let listed = self.hosts_listed();
        if !listed.is_empty() {
            if listed.iter().any(|h| h == "*") {
                return None;
            }
            return Some(listed.iter().map(|h| host_name(h)).collect());
        }
        if !(self.http_addr.ip().is_loopback() || self.open) {
            return None;
        }
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(String::from)
            .collect();
        for origin in self.origins() {
            if let Some((_, authority)) = origin.split_once("://") {
                hosts.push(host_name(authority));
            }
        }
        Some(hosts)
    }
}

/// The host of a `Host` header value or an origin's authority: lower case, without the port
/// (`[::1]:8084` → `[::1]`, `Example.com:443` → `example.com`).
pub fn host_name(authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => authority[..=end].to_string(),
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.contains(':') => {
            host.to_string()
        }
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, clap::Error> {
        let mut all = vec!["gateway", "--database-url", "postgres://u@h/db"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&["--open"]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8084");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.channel.notify_channel.as_str(), "events");
        c.validate().unwrap();
    }

    #[test]
    fn a_gateway_without_tokens_must_be_opened_on_purpose() {
        let err = parse(&[]).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("GATEWAY_TOKENS_FILE"), "{err}");
        assert!(parse(&["--open", "--tokens-file", "t"]).is_err());
        parse(&["--tokens-file", "t"]).unwrap().validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        let err = parse(&["--open", "--allowed-origins", "example.com"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("GATEWAY_ALLOWED_ORIGINS"), "{err}");
        let err = parse(&["--open", "--heartbeat-interval", "0s"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--heartbeat-interval"), "{err}");
        assert!(parse(&["--open", "--client-buffer", "1"]).is_err());
        let c = parse(&["--open", "--allowed-origins", ",https://a.example/,"]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.origins(), vec!["https://a.example"]);
        assert!(parse(&["--open", "--heartbeat-interval", "soon"]).is_err());
        let err = parse(&["--open", "--allowed-hosts", "http://a.example/"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("GATEWAY_ALLOWED_HOSTS"), "{err}");
        assert!(parse(&["--open", "--max-connections", "0"]).is_err());
    }

    #[test]
    fn hosts_default_to_loopback_names_on_loopback_or_open_and_to_any_otherwise() {
        let loopback = parse(&["--open"]).unwrap().hosts().unwrap();
        assert_eq!(loopback, vec!["localhost", "127.0.0.1", "[::1]"]);
        let open_everywhere = parse(&["--open", "--http-addr", "0.0.0.0:8084"])
            .unwrap()
            .hosts()
            .unwrap();
        assert_eq!(open_everywhere, loopback);
        let with_origin = parse(&["--open", "--allowed-origins", "https://App.example:8443"])
            .unwrap()
            .hosts()
            .unwrap();
        assert!(with_origin.contains(&"app.example".to_string()));
        let tokens_public = parse(&["--tokens-file", "t", "--http-addr", "0.0.0.0:8084"]).unwrap();
        assert_eq!(tokens_public.hosts(), None);
        let listed = parse(&["--open", "--allowed-hosts", "Events.example.com, localhost"])
            .unwrap()
            .hosts()
            .unwrap();
        assert_eq!(listed, vec!["events.example.com", "localhost"]);
        assert_eq!(
            parse(&["--open", "--allowed-hosts", "*"]).unwrap().hosts(),
            None
        );
        assert_eq!(host_name("[::1]:8084"), "[::1]");
        assert_eq!(host_name("LOCALHOST:8084"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
    }
}
