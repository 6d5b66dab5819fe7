//! Where a reader should stand: `earliest`, `latest`, a position `<tx_id>/<id>`, or an RFC 3339
//! time. `reset --to` and `tail --from` both take one; the positions they resolve to come from
//! `event_store::position`, which owns all SQL that reads events by position.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use event_store::position::{self, Position};
use tokio_postgres::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Before every event: everything still stored is read (again).
    Earliest,
    /// After the last event below the visibility horizon: only what commits from now on, plus
    /// events of transactions still open (which commit later, behind newer ids).
    Latest,
    /// Exactly here: everything after this position.
    Position(Position),
    /// Just before the first event (by position) created at or after this time.
    Time(SystemTime),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Earliest => f.write_str("earliest"),
            Target::Latest => f.write_str("latest"),
            Target::Position(p) => write!(f, "position {p}"),
            Target::Time(t) => write!(f, "time {}", humantime::format_rfc3339_millis(*t)),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        let text = text.trim();
        match text {
            "earliest" => return Ok(Target::Earliest),
            "latest" => return Ok(Target::Latest),
            _ => {}
        }
        if text.contains('/') {
            return Position::parse(text)
                .map(Target::Position)
                .map_err(|e| e.to_string());
        }
        parse_rfc3339(text).map(Target::Time).map_err(|e| {
            format!(
                "{text:?} is neither earliest, latest, a position <tx_id>/<id> (e.g. 81234/1048576) \
                 nor an RFC 3339 time (e.g. 2026-12-04T18:00:00Z): {e}"
            )
        })
    }
}

/// RFC 3339 with `Z` or a numeric offset (`+02:00`), and optional fractions of a second.
fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    if let Some(utc) = text.strip_suffix(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(utc).map_err(|e| e.to_string());
    }
    // A trailing ±HH:MM offset: parse the local part as if UTC, then shift.
    let cut = text
        .char_indices()
        .rev()
        .take(6)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map(|(i, _)| i)
        .filter(|&i| text.len() - i == 6 && text.as_bytes()[i + 3] == b':')
        .ok_or("a time zone is required: end with Z or an offset such as +02:00")?;
    let (local, offset) = text.split_at(cut);
    let hours: u64 = offset[1..3].parse().map_err(|_| "bad offset hours")?;
    let minutes: u64 = offset[4..6].parse().map_err(|_| "bad offset minutes")?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    let local = humantime::parse_rfc3339_weak(local).map_err(|e| e.to_string())?;
    Ok(if offset.starts_with('+') {
        local - shift
    } else {
        local + shift
    })
}

/// What a target resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub position: Position,
    /// `time` only: no event is that recent, so the position is the latest one.
    pub nothing_newer: bool,
}

impl Target {
    pub async fn resolve(&self, client: &Client) -> event_store::Result<Resolved> {
        let position = match self {
            Target::Earliest => Position::START,
            Target::Latest => position::latest(client).await?,
            Target::Position(p) => *p,
            Target::Time(t) => match position::before_time(client, *t).await? {
                Some(p) => p,
                None => {
                    return Ok(Resolved {
                        position: position::latest(client).await?,
                        nothing_newer: true,
                    })
                }
            },
        };
        Ok(Resolved {
            position,
            nothing_newer: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("earliest".parse(), Ok(Target::Earliest));
        assert_eq!(" latest ".parse(), Ok(Target::Latest));
        assert_eq!(
            "81234/1048576".parse(),
            Ok(Target::Position(Position::new(81234, 1048576)))
        );
        let utc: Target = "2026-12-04T18:00:00Z".parse().unwrap();
        let offset: Target = "2026-12-04T20:00:00+02:00".parse().unwrap();
        let fraction: Target = "2026-12-04T13:30:00.250-04:30".parse().unwrap();
        assert_eq!(utc, offset);
        let Target::Time(t) = fraction else { panic!() };
        let Target::Time(u) = utc else { panic!() };
        assert_eq!(t.duration_since(u).unwrap(), Duration::from_millis(250));

        for bad in [
            "",
            "yesterday",
            "12/x",
            "-1/5",
            "5/-1",
            "2026-12-04T18:00:00",
            "2026-13-04T18:00:00Z",
        ] {
            let err = bad.parse::<Target>().unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
        let err = "yesterday".parse::<Target>().unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
