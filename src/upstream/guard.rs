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

/// An admitted request until its outcome is recorded: its slot, and the half-open probe if it
/// took it. Dropped unrecorded (the request's future was dropped, say by a client that went
/// away) it gives the probe back, so an abandoned probe cannot keep the breaker open for good.
pub struct Admission<'a> {
    guard: &'a Guard,
    permit: Option<Permit>,
    probe: bool,
}

impl Admission<'_> {
    /// Records how the exchange went; the slot stays held by the returned permit.
    pub fn record(mut self, outcome: Outcome) -> (Permit, Option<BreakerState>) {
        let change = self.guard.record_at(Instant::now(), outcome, self.probe);
        self.probe = false;
        (self.permit.take().expect("recorded once"), change)
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.guard.state.lock().expect("guard state").probing = false;
        }
    }
}

/// What an exchange came to, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect error, timeout, 5xx.
    Failure,
    /// 429, with upstream's `Retry-After` if it gave one.
    RateLimited(Option<Duration>),
    /// Nothing learnt about upstream: regcache's side failed before asking (credentials, TLS
    /// setup). A probe that ends so leaves the breaker as it was.
    Neutral,
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
    pub async fn admit(&self) -> Result<Admission<'_>, Refusal> {
        self.check(Instant::now(), false)?;
        let slot = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let probe = self.check(Instant::now(), true)?;
        Ok(Admission {
            guard: self,
            permit: Some(Permit { _slot: slot }),
            probe,
        })
    }

    /// Whether a request may go at `now`; `claim_probe` takes the half-open probe slot, and
    /// the answer says whether it did.
    fn check(&self, now: Instant, claim_probe: bool) -> Result<bool, Refusal> {
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
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records how an admitted exchange went; `probe` says whether it was the half-open probe
    /// (only the probe's own outcome ends the probe).
    fn record_at(&self, now: Instant, outcome: Outcome, probe: bool) -> Option<BreakerState> {
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
                // `Retry-After: 0` (or a date already past) asks for no pause at all, which a
                // run of 429s disproves: the backoff applies then.
                let asked = retry_after.filter(|d| !d.is_zero());
                let pause = asked.unwrap_or(backoff).min(MAX_PAUSE);
                s.paused_until = Some(now + pause);
                // A 429 is upstream working as designed, not failing; the probe is answered.
                s.probing &= !probe;
            }
            Outcome::Failure => {
                s.consecutive_failures += 1;
                if probe || s.consecutive_failures >= self.config.failure_threshold {
                    s.open_until = Some(now + self.config.open_for);
                }
                s.probing &= !probe;
            }
            Outcome::Neutral => s.probing &= !probe,
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
        assert_eq!(g.record_at(t0, Outcome::Failure, false), None);
        assert_eq!(g.record_at(t0, Outcome::Failure, false), None);
        assert_eq!(
            g.record_at(t0, Outcome::Failure, false),
            Some(BreakerState::Open)
        );
        assert!(matches!(g.check(t0, true), Err(Refusal::CircuitOpen(_))));
        // After open_for, exactly one probe goes; others are still refused.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(g.check(t1, true), Ok(true));
        assert!(matches!(g.check(t1, true), Err(Refusal::CircuitOpen(_))));
        // A failed probe reopens at once.
        assert_eq!(
            g.record_at(t1, Outcome::Failure, true),
            Some(BreakerState::Open)
        );
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(g.check(t2, true), Ok(true));
        assert_eq!(
            g.record_at(t2, Outcome::Success, true),
            Some(BreakerState::Closed)
        );
        assert_eq!(g.check(t2, true), Ok(false), "closed: no probe to take");
    }

    #[test]
    fn successes_reset_the_failure_count() {
        let g = guard(2);
        let t = Instant::now();
        g.record_at(t, Outcome::Failure, false);
        g.record_at(t, Outcome::Success, false);
        g.record_at(t, Outcome::Failure, false);
        assert_eq!(g.check(t, true), Ok(false));
    }

    #[test]
    fn rate_limits_pause_with_retry_after_or_backoff() {
        let g = guard(5);
        let t = Instant::now();
        g.record_at(t, Outcome::RateLimited(Some(Duration::from_secs(7))), false);
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(7)))
        );
        assert_eq!(g.check(t + Duration::from_secs(8), true), Ok(false));
        // Without Retry-After: 1 s, 2 s, 4 s ... by consecutive 429s (this is the second).
        let t = t + Duration::from_secs(8);
        g.record_at(t, Outcome::RateLimited(None), false);
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(2)))
        );
        // A success starts the backoff over.
        g.record_at(t + Duration::from_secs(3), Outcome::Success, false);
        g.record_at(t, Outcome::RateLimited(None), false);
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(1)))
        );
        g.record_at(
            t,
            Outcome::RateLimited(Some(Duration::from_secs(100_000))),
            false,
        );
        assert_eq!(g.check(t, true), Err(Refusal::RateLimited(MAX_PAUSE)));
    }

    #[test]
    fn retry_after_zero_still_backs_off() {
        let g = guard(5);
        let t = Instant::now();
        g.record_at(t, Outcome::RateLimited(Some(Duration::ZERO)), false);
        g.record_at(t, Outcome::RateLimited(Some(Duration::ZERO)), false);
        assert_eq!(
            g.check(t, true),
            Err(Refusal::RateLimited(Duration::from_secs(2))),
            "the second 429 in a row pauses as if upstream had said nothing"
        );
    }

    /// A guard whose breaker opens after one failure and allows a probe at once.
    fn tripped() -> Guard {
        let g = Guard::new(GuardConfig {
            max_concurrent: 2,
            failure_threshold: 1,
            open_for: Duration::ZERO,
        });
        g.record_at(Instant::now(), Outcome::Failure, false);
        g
    }

    #[tokio::test]
    async fn an_abandoned_probe_gives_the_probe_back() {
        let g = tripped();
        let probe = g.admit().await.expect("the probe goes");
        assert_eq!(g.state(), BreakerState::HalfOpen);
        assert!(
            matches!(g.admit().await, Err(Refusal::CircuitOpen(_))),
            "one probe at a time"
        );
        // Its request future is dropped before an answer: no outcome is recorded.
        drop(probe);
        let next = g.admit().await.expect("another request may probe");
        let (_permit, change) = next.record(Outcome::Success);
        assert_eq!(change, Some(BreakerState::Closed));
    }

    #[tokio::test]
    async fn a_neutral_probe_leaves_the_breaker_open() {
        let g = tripped();
        let (_permit, change) = g.admit().await.unwrap().record(Outcome::Neutral);
        assert_eq!(change, None, "not closed by a failure of regcache's own");
        assert_eq!(g.state(), BreakerState::HalfOpen, "open_for is zero");
        let (_permit, change) = g.admit().await.unwrap().record(Outcome::Failure);
        assert_eq!(change, None, "the next probe failed: open again at once");
        assert!(g.state() != BreakerState::Closed);
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
