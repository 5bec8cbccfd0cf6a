//! The VMM's log: lines on stderr, rate-limited. Many warnings are
//! triggered by what the guest writes (a bad descriptor, a bad register
//! access); a guest that triggers them in a loop must not fill the host's
//! disk with the VMM's log. Past the budget, lines are counted, not
//! written, and the count is reported once lines flow again.

use std::sync::Mutex;
use std::time::Instant;

/// Lines that may be written at once, and the rate the budget refills at.
pub const BURST: u32 = 100;
pub const PER_SECOND: u32 = 20;

/// A token bucket over log lines, with a count of what it dropped.
#[derive(Debug)]
pub struct RateLimiter {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; first say that this many lines were dropped before it.
    Write {
        dropped_before: u64,
    },
    Drop,
}

impl RateLimiter {
    pub fn new(now: Instant) -> Self {
        RateLimiter {
            tokens: f64::from(BURST),
            last: now,
            dropped: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * f64::from(PER_SECOND)).min(f64::from(BURST));
        if self.tokens < 1.0 {
            self.dropped += 1;
            return Verdict::Drop;
        }
        self.tokens -= 1.0;
        Verdict::Write {
            dropped_before: std::mem::take(&mut self.dropped),
        }
    }
}

/// The process's logger (`log` facade), writing `thaw-vmm: <level>: <msg>`.
pub struct StderrLogger {
    limiter: Mutex<Option<RateLimiter>>,
}

pub static LOGGER: StderrLogger = StderrLogger {
    limiter: Mutex::new(None),
};

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = Instant::now();
        let verdict = {
            let mut g = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            g.get_or_insert_with(|| RateLimiter::new(now)).check(now)
        };
        if let Verdict::Write { dropped_before } = verdict {
            if dropped_before > 0 {
                eprintln!(
                    "thaw-vmm: warn: {dropped_before} log lines dropped (over {PER_SECOND}/s)"
                );
            }
            eprintln!(
                "thaw-vmm: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger; THAW_VMM_LOG=debug|info|error sets the level
/// (default warn).
pub fn init() {
    let level = match std::env::var("THAW_VMM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_is_cut_to_the_burst_then_the_rate_and_counted() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0);
        let written = (0..10_000)
            .filter(|_| matches!(l.check(t0), Verdict::Write { .. }))
            .count();
        assert_eq!(written, BURST as usize);
        // One second later, the budget has refilled by the rate; the first
        // line written reports what was dropped.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            l.check(t1),
            Verdict::Write {
                dropped_before: 10_000 - u64::from(BURST)
            }
        );
        let more = (0..1000)
            .filter(|_| matches!(l.check(t1), Verdict::Write { .. }))
            .count();
        assert_eq!(more, PER_SECOND as usize - 1);
    }
}
