//! The circuit breaker: a pure state machine that decides whether a call may go out.
//!
//! It reads no clock: every input carries the time (`now`), so the tests drive it with
//! explicit instants. It counts only transport failures and timeouts; a status from the
//! server (even `Busy`) proves the transport works and counts as a success.
//!
//! States: `Closed` lets every call through and counts consecutive failures; at
//! `failures_to_open` it becomes `Open` for `open_duration`, during which every call is
//! refused. The first call after that is a probe (`HalfOpen`): its success closes the
//! breaker, its failure opens it again. While the probe is out, other calls are refused;
//! a probe whose result never comes (its caller gave up) is replaced by another after
//! `open_duration`, so the breaker cannot stay half-open forever.

use std::time::{Duration, Instant};

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Calls go through; `failures` consecutive transport failures so far.
    Closed { failures: u32 },
    /// Calls are refused until `until`.
    Open { until: Instant },
    /// One probe call is out; others are refused until it reports or `probe_until` passes.
    HalfOpen { probe_until: Instant },
}

/// A consecutive-failure circuit breaker that takes time as an argument.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    failures_to_open: u32,
    open_duration: Duration,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker that opens after `failures_to_open` consecutive failures (at
    /// least one) and stays open for `open_duration`.
    pub(crate) fn new(failures_to_open: u32, open_duration: Duration) -> Breaker {
        Breaker {
            failures_to_open: failures_to_open.max(1),
            open_duration,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// The current state, for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go out at `now`. An open breaker whose time is up lets this
    /// call through as the probe and refuses the others until the probe reports.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { probe_until: until } => {
                if now < until {
                    return false;
                }
                self.state = BreakerState::HalfOpen { probe_until: now + self.open_duration };
                true
            }
        }
    }

    /// A call got an answer from the server: the transport works. Closes a half-open
    /// breaker; a late success while open changes nothing (the probe decides).
    pub(crate) fn record_success(&mut self) {
        match self.state {
            BreakerState::Closed { .. } | BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::Closed { failures: 0 };
            }
            BreakerState::Open { .. } => {}
        }
    }

    /// A call failed in the transport or timed out at `now`. Opens the breaker on the
    /// `failures_to_open`-th consecutive failure, or at once when the probe failed.
    pub(crate) fn record_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                self.state = if failures >= self.failures_to_open {
                    BreakerState::Open { until: now + self.open_duration }
                } else {
                    BreakerState::Closed { failures }
                };
            }
            BreakerState::HalfOpen { .. } => self.state = BreakerState::Open { until: now + self.open_duration },
            BreakerState::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(3, OPEN);
        breaker.record_failure(t0);
        breaker.record_failure(t0);
        breaker.record_success();
        breaker.record_failure(t0);
        breaker.record_failure(t0);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 2 });
        assert!(breaker.admit(t0));
        breaker.record_failure(t0);
        assert_eq!(breaker.state(), BreakerState::Open { until: t0 + OPEN });
        assert!(!breaker.admit(t0));
        assert!(!breaker.admit(t0 + OPEN - Duration::from_millis(1)));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_success_closes() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(1, OPEN);
        breaker.record_failure(t0);
        let t1 = t0 + OPEN;
        assert!(breaker.admit(t1), "the probe");
        assert_eq!(breaker.state(), BreakerState::HalfOpen { probe_until: t1 + OPEN });
        assert!(!breaker.admit(t1), "a second call while the probe is out");
        assert!(!breaker.admit(t1 + Duration::from_millis(500)));
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        assert!(breaker.admit(t1));
    }

    #[test]
    fn a_failed_probe_reopens_for_another_period() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(2, OPEN);
        breaker.record_failure(t0);
        breaker.record_failure(t0);
        let t1 = t0 + OPEN + Duration::from_millis(5);
        assert!(breaker.admit(t1));
        let t2 = t1 + Duration::from_millis(20);
        breaker.record_failure(t2);
        assert_eq!(breaker.state(), BreakerState::Open { until: t2 + OPEN });
        assert!(!breaker.admit(t2 + OPEN / 2));
        assert!(breaker.admit(t2 + OPEN));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_open_duration() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(1, OPEN);
        breaker.record_failure(t0);
        assert!(breaker.admit(t0 + OPEN));
        // The probe's caller never reports (it was cancelled).
        assert!(!breaker.admit(t0 + OPEN + OPEN / 2));
        assert!(breaker.admit(t0 + OPEN + OPEN), "a new probe");
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(1, OPEN);
        breaker.record_failure(t0);
        breaker.record_success();
        breaker.record_failure(t0 + OPEN / 2);
        assert_eq!(breaker.state(), BreakerState::Open { until: t0 + OPEN });
    }

    #[test]
    fn zero_failures_to_open_means_one() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(0, OPEN);
        assert!(breaker.admit(t0));
        breaker.record_failure(t0);
        assert!(!breaker.admit(t0));
    }
}
