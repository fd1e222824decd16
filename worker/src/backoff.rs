//! Jittered exponential backoff for calls to a server that may be restarting.

use std::time::Duration;

use rand::RngExt as _;

/// First delay after a failure.
const INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between attempts: a restarted server is noticed within this.
const CAP: Duration = Duration::from_secs(5);

/// Delays that double from 100 ms up to 5 s, each drawn from `[d/2, d]` so
/// that many workers do not retry in lockstep after a server restart.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: INITIAL }
    }
}

impl Backoff {
    /// The next delay to wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(CAP);
        let floor = ceiling / 2;
        let jitter = rand::rng().random_range(0..=(ceiling - floor).as_millis() as u64);
        floor + Duration::from_millis(jitter)
    }

    /// Starts over after a success.
    pub(crate) fn reset(&mut self) {
        self.next = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL, "{first:?}");
        for _ in 0..20 {
            let d = backoff.next_delay();
            assert!(d <= CAP, "{d:?}");
        }
        let late = backoff.next_delay();
        assert!(late >= CAP / 2, "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL);
    }
}
