//! Shared helpers for the benchmarks: run counts from the environment,
//! percentiles of measured durations, and one timed boot under thaw-vmm or
//! QEMU (`run`).

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

pub mod report;
pub mod run;
pub mod smaps;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var}={value:?} is not a positive whole number")]
    BadCount { var: String, value: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM control: {0}")]
    Vmm(#[from] thaw_vmm_api::Error),
    /// A VM did not boot as the benchmark needs.
    #[error("{0}")]
    Boot(String),
}

impl Error {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Is this host's KVM the PVM flavour (guest kernel code emulated)?
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A run count from environment variable `var`, `default` when unset.
pub fn count_from_env(var: &str, default: usize) -> Result<usize, Error> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::BadCount {
                var: var.to_string(),
                value,
            }),
        },
    }
}

/// The `p`-th percentile (0 < p <= 100) by the nearest-rank method: the
/// smallest sample with at least p% of the samples at or below it. It is
/// always a measured value; with 20 samples p99 is the slowest run.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    percentile_of(samples, p)
}

/// `percentile` for any ordered figure (memory sizes, counts).
pub fn percentile_of<T: Ord + Copy>(samples: &[T], p: f64) -> Option<T> {
    if samples.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// What a benchmark table shows for one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub runs: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// p50, p99, min and max of `samples`; None when there are none.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    Some(Summary {
        runs: samples.len(),
        p50: percentile(samples, 50.0)?,
        p99: percentile(samples, 99.0)?,
        min: samples.iter().min().copied()?,
        max: samples.iter().max().copied()?,
    })
}

/// A duration for a table: milliseconds below 10 s, seconds above.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10_000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        // Unsorted on purpose: the helper sorts.
        let s = ms(&[50, 10, 40, 20, 30]);
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_millis(30)));
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&s, 20.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&s, 21.0), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&s, 100.0), Some(Duration::from_millis(50)));
    }

    #[test]
    fn p99_of_twenty_is_the_slowest_and_p50_the_tenth() {
        let s: Vec<Duration> = (1..=20).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_millis(10)));
        // 200 samples: p99 is the 198th, not the maximum.
        let s: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(198)));
    }

    #[test]
    fn no_samples_or_bad_p_give_none() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(summarize(&[]), None);
        let s = ms(&[1]);
        assert_eq!(percentile(&s, 0.0), None);
        assert_eq!(percentile(&s, 101.0), None);
        assert_eq!(percentile(&s, f64::NAN), None);
    }

    #[test]
    fn percentiles_of_other_figures() {
        let kib: Vec<u64> = vec![2100, 1900, 2500];
        assert_eq!(percentile_of(&kib, 50.0), Some(2100));
        assert_eq!(percentile_of(&kib, 99.0), Some(2500));
        assert_eq!(percentile_of::<u64>(&[], 50.0), None);
    }

    #[test]
    fn summary_of_samples() {
        let s = summarize(&ms(&[3, 1, 2])).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.p50, Duration::from_millis(2));
        assert_eq!(s.p99, Duration::from_millis(3));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(3));
    }

    #[test]
    fn counts_from_the_environment() {
        // Variable names unique to this test: tests run in parallel.
        std::env::set_var("THAW_BENCH_TEST_COUNT_OK", " 7 ");
        assert_eq!(count_from_env("THAW_BENCH_TEST_COUNT_OK", 20).unwrap(), 7);
        assert_eq!(
            count_from_env("THAW_BENCH_TEST_COUNT_UNSET", 20).unwrap(),
            20
        );
        for bad in ["0", "-1", "x", ""] {
            std::env::set_var("THAW_BENCH_TEST_COUNT_BAD", bad);
            let e = count_from_env("THAW_BENCH_TEST_COUNT_BAD", 20).unwrap_err();
            assert!(e.to_string().contains("THAW_BENCH_TEST_COUNT_BAD"), "{e}");
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(fmt_duration(Duration::from_millis(45_678)), "45.68 s");
    }
}
