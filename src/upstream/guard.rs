//! Upstream politeness and fast failure: a cap on concurrent requests (waiters queue), respect
//! for 429 `Retry-After` with exponential backoff, and a circuit breaker that stops sending to
//! an upstream that keeps failing so clients get an answer (stale content or an error) at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// First backoff after a 429 without `Retry-After`; doubles per consecutive 429.
const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause, whatever upstream asks for.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// The breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    /// Concurrent requests (including the body transfer) to this upstream.
    pub max_concurrent: usize,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before a single probe request is let through.
    pub open_for: Duration,
}

/// Why a request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Upstream asked us to slow down; resume after this long.
    RateLimited(Duration),
    /// Upstream kept failing; the breaker retries in this long.
    CircuitOpen(Duration),
}

/// Breaker state, for the log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// One probe is in flight after `open_for`.
    HalfOpen,
}

#[derive(Debug)]
struct State {
    consecutive_failures: u32,
    /// Open until this instant; a probe may go after it.
    open_until: Option<Instant>,
    probing: bool,
    /// No request before this instant (429).
    paused_until: Option<Instant>,
    consecutive_429: u32,
}

/// One upstream's guard.
pub struct Guard {
    config: GuardConfig,
    permits: Arc<Semaphore>,
    state: Mutex<State>,
}

/// Held for the whole upstream exchange, body included; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// What an exchange came to, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect error, timeout, 5xx.
    Failure,
    /// 429, with upstream's `Retry-After` if it gave one.
    RateLimited(Option<Duration>),
}

impl Guard {
    pub fn new(config: GuardConfig) -> Guard {
        Guard {
            config,
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            state: Mutex::new(State {
                consecutive_failures: 0,
                open_until: None,
                probing: false,
                paused_until: None,
                consecutive_429: 0,
            }),
        }
    }

    /// Waits for a slot, or says why no request may go now. Checked before and after the
    /// wait, so a queued request does not go out into a breaker that opened meanwhile.
    pub async fn admit(&self) -> Result<Permit, Refusal> {
        self.check(Instant::now(), false)?;
        let slot = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        self.check(Instant::now(), true)?;
        Ok(Permit { _slot: slot })
    }

    /// Whether a request may go at `now`; `claim_probe` takes the half-open probe slot.
    fn check(&self, now: Instant, claim_probe: bool) -> Result<(), Refusal> {
        let mut s = self.state.lock().expect("guard state");
        if let Some(until) = s.paused_until {
            if now < until {
                return Err(Refusal::RateLimited(until - now));
            }
            s.paused_until = None;
        }
        if let Some(until) = s.open_until {
            if now < until {
                return Err(Refusal::CircuitOpen(until - now));
            }
            if s.probing {
                return Err(Refusal::CircuitOpen(self.config.open_for));
            }
            if claim_probe {
                s.probing = true;
            }
        }
        Ok(())
    }

    /// Records how an admitted exchange went.
    pub fn record(&self, outcome: Outcome) -> Option<BreakerState> {
        self.record_at(Instant::now(), outcome)
    }

    fn record_at(&self, now: Instant, outcome: Outcome) -> Option<BreakerState> {
        let mut s = self.state.lock().expect("guard state");
        let before = state_of(&s, now);
        match outcome {
            Outcome::Success => {
                s.consecutive_failures = 0;
                s.consecutive_429 = 0;
                s.open_until = None;
                s.probing = false;
            }
            Outcome::RateLimited(retry_after) => {
                s.consecutive_429 += 1;
                let backoff = BASE_BACKOFF * 2u32.saturating_pow(s.consecutive_429 - 1);
                let pause = retry_after.unwrap_or(backoff).min(MAX_PAUSE);
                s.paused_until = Some(now + pause);
                // A 429 is upstream working as designed, not failing; the probe is answered.
                s.probing = false;
            }
            Outcome::Failure => {
                s.consecutive_failures += 1;
                if s.probing || s.consecutive_failures >= self.config.failure_threshold {
                    s.open_until = Some(now + self.config.open_for);
                }
                s.probing = false;
            }
        }
        let after = state_of(&s, now);
        (after != before).then_some(after)
    }

    pub fn state(&self) -> BreakerState {
        state_of(&self.state.lock().expect("guard state"), Instant::now())
    }
}

fn state_of(s: &State, now: Instant) -> BreakerState {
    match s.open_until {
        None => BreakerState::Closed,
        Some(_) if s.probing => BreakerState::HalfOpen,
        Some(until) if now < until => BreakerState::Open,
        Some(_) => BreakerState::HalfOpen,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(threshold: u32) -> Guard {
        Guard::new(GuardConfig {
            max_concurrent: 2,
            failure_threshold: threshold,
            open_for: Duration::from_secs(10),
        })
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let g = guard(3);
        let t0 = Instant::now();
        assert_eq!(g.record_at(t0, Outcome::Failure), None);
        assert_eq!(g.record_at(t0, Outcome::Failure), None);
        assert_eq!(g.record_at(t0, Outcome::Failure), Some(BreakerState::Open));
        assert!(matches!(g.check(t0, true), Err(Refusal::CircuitOpen(_))));
        // After open_for, exactly one probe goes; others are still refused.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(g.check(t1, true), Ok(()));
        assert!(matches!(g.check(t1, true), Err(Refusal::CircuitOpen(_))));
        // A failed probe reopens at once.
        assert_eq!(g.record_at(t1, Outcome::Failure), Some(BreakerState::Open));
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(g.check(t2, true), Ok(()));
        assert_eq!(
            g.record_at(t2, Outcome::Success),
            Some(BreakerState::Closed)
        );
        assert_eq!(g.check(t2, true), Ok(()));
    }

    #[test]
    fn successes_reset_the_failure_count() {
        let g = guard(2);
        let t = Instant::now();
        g.record_at(t, Outcome::Failure);
        g.record_at(t, Outcome::Success);
        g.record_at(t, Outcome::Failure);
        assert_eq!(g.check(t, true), Ok(()));
    }

    #[test]
    fn rate_limits_pause_with_retry_after_or_backoff() {
        let g = guard(5);
        let t = Instant::now();
        g.record_at(t, Outcome::RateLimited(Some(Duration::from_secs(7))));
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(7)))
        );
        assert_eq!(g.check(t + Duration::from_secs(8), true), Ok(()));
        // Without Retry-After: 1 s, 2 s, 4 s ... by consecutive 429s (this is the second).
        let t = t + Duration::from_secs(8);
        g.record_at(t, Outcome::RateLimited(None));
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(2)))
        );
        // A success starts the backoff over.
        g.record_at(t + Duration::from_secs(3), Outcome::Success);
        g.record_at(t, Outcome::RateLimited(None));
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(1)))
        );
        g.record_at(t, Outcome::RateLimited(Some(Duration::from_secs(100_000))));
        assert_eq!(g.check(t, true), Err(Refusal::RateLimited(MAX_PAUSE)));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        h.insert(
            header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a past date");
        let soon = SystemTime::now() + Duration::from_secs(90);
        h.insert(
            header::RETRY_AFTER,
            httpdate::fmt_http_date(soon).parse().unwrap(),
        );
        let got = retry_after(&h).unwrap();
        assert!((88..=90).contains(&got.as_secs()), "{got:?}");
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[tokio::test]
    async fn waiters_queue_for_a_slot() {
        let g = Arc::new(guard(5));
        let a = g.admit().await.unwrap();
        let _b = g.admit().await.unwrap();
        let g2 = Arc::clone(&g);
        let third = tokio::spawn(async move { g2.admit().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "third waits while two are out");
        drop(a);
        assert_eq!(third.await.unwrap(), Ok(()));
    }
}
