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

    pub fn admit(self: &Arc<Limits>, token: &str) -> Result<Slot, Full> {
        let mut open = self.open.lock().unwrap();
        if open.0 >= self.max {
            return Err(Full::Total);
        }
        let mine = open.1.entry(token.to_string()).or_insert(0);
        if *mine >= self.per_token {
            return Err(Full::Token);
        }
        *mine += 1;
        open.0 += 1;
        self.metrics.clients.set(open.0 as f64);
        Ok(Slot {
            limits: self.clone(),
            token: token.to_string(),
        })
    }
}

/// One open stream; dropping it frees the place.
pub struct Slot {
    limits: Arc<Limits>,
    token: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap();
        open.0 -= 1;
        if let Some(mine) = open.1.get_mut(&self.token) {
            *mine -= 1;
            if *mine == 0 {
                open.1.remove(&self.token);
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
        let a1 = limits.admit("a").unwrap();
        let _a2 = limits.admit("a").unwrap();
        assert_eq!(limits.admit("a").err(), Some(Full::Token));
        let _b1 = limits.admit("b").unwrap();
        assert_eq!(limits.admit("c").err(), Some(Full::Total));
        drop(a1);
        let _a3 = limits.admit("a").unwrap();
    }
}
