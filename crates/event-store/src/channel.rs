//! The NOTIFY channel: producers and the capture watcher send wake-ups on it; consumers, the
//! gateway and `eventsctl tail --follow` LISTEN on it.

use std::fmt;
use std::str::FromStr;

/// PostgreSQL truncates identifiers at 63 bytes and `pg_notify` refuses longer channel names.
const MAX_CHANNEL_BYTES: usize = 63;

/// A validated NOTIFY channel name (1 to 63 bytes). `pg_notify` takes the name as a string, so any
/// characters work; the default is `events`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel(String);

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NOTIFY channel {name:?}: {reason}")]
pub struct InvalidChannel {
    pub name: String,
    pub reason: &'static str,
}

impl Channel {
    pub fn new(name: impl Into<String>) -> Result<Channel, InvalidChannel> {
        let name = name.into();
        let reason = if name.is_empty() {
            "it is empty"
        } else if name.len() > MAX_CHANNEL_BYTES {
            "it is longer than 63 bytes"
        } else if name.contains('\0') {
            "it contains a NUL character"
        } else {
            return Ok(Channel(name));
        };
        Err(InvalidChannel { name, reason })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For binding as a query parameter without a temporary.
    pub fn as_string(&self) -> &String {
        &self.0
    }
}

impl Default for Channel {
    fn default() -> Channel {
        Channel(crate::DEFAULT_CHANNEL.to_string())
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Channel {
    type Err = InvalidChannel;
    fn from_str(s: &str) -> Result<Channel, InvalidChannel> {
        Channel::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_bounded() {
        assert_eq!(Channel::default().as_str(), "events");
        assert!(Channel::new("orders.v2 wake-ups").is_ok());
        assert!(Channel::new("x".repeat(63)).is_ok());
        for bad in ["", "a\0b", &"x".repeat(64)] {
            assert!(Channel::new(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
