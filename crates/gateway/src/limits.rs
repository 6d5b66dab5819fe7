//! Caps on open streams, in total (`--max-clients`) and per token (`--max-clients-per-token`).
//! A stream holds a [`Slot`] for as long as it is open; past a cap, new streams are refused
//! with 503 and `Retry-After`, and the streams already open are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

pub struct Limits {
    max: usize,
    per_token: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
    metrics: Metrics,
}

/// Which cap refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Token,
}

impl Limits {
    pub fn new(max: usize, per_token: usize, metrics: Metrics) -> Arc<Limits> {
        Arc::new(Limits {
            max,
            per_token,
            open: Mutex::new((0, HashMap::new())),
            metrics,
        })
    }

    /// A place for one more stream of `token` (`None`: an open gateway, where only the total
    /// cap applies).
    pub fn admit(self: &Arc<Limits>, token: Option<&str>) -> Result<Slot, Full> {
        let mut open = self.open.lock().unwrap();
        if open.0 >= self.max {
            return Err(Full::Total);
        }
        if let Some(token) = token {
            let mine = open.1.entry(token.to_string()).or_insert(0);
            if *mine >= self.per_token {
                return Err(Full::Token);
            }
            *mine += 1;
        }
        open.0 += 1;
        self.metrics.clients.set(open.0 as f64);
        Ok(Slot {
            limits: self.clone(),
            token: token.map(str::to_string),
        })
    }
}

/// One open stream; dropping it frees the place.
pub struct Slot {
    limits: Arc<Limits>,
    token: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap();
        open.0 -= 1;
        if let Some(token) = &self.token {
            if let Some(mine) = open.1.get_mut(token) {
                *mine -= 1;
                if *mine == 0 {
                    open.1.remove(token);
                }
            }
        }
        self.limits.metrics.clients.set(open.0 as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_token_and_in_total_and_free_on_drop() {
        let limits = Limits::new(3, 2, Metrics::new());
        let a1 = limits.admit(Some("a")).unwrap();
        let _a2 = limits.admit(Some("a")).unwrap();
        assert_eq!(limits.admit(Some("a")).err(), Some(Full::Token));
        let _b1 = limits.admit(Some("b")).unwrap();
        assert_eq!(limits.admit(Some("c")).err(), Some(Full::Total));
        assert_eq!(limits.admit(None).err(), Some(Full::Total));
        drop(a1);
        let _a3 = limits.admit(Some("a")).unwrap();
    }

    #[test]
    fn an_open_gateway_has_only_the_total_cap() {
        let limits = Limits::new(3, 1, Metrics::new());
        let _slots: Vec<Slot> = (0..3).map(|_| limits.admit(None).unwrap()).collect();
        assert_eq!(limits.admit(None).err(), Some(Full::Total));
    }
}
