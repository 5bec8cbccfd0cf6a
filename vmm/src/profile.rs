//! Opt-in guest profiler: with `THAW_VMM_PROFILE=<file>` a thread kicks
//! vCPU 0 out of `KVM_RUN` every 10 ms, the vCPU records its RIP, and a
//! histogram is written at exit. Map it with the kernel's System.map
//! (`scripts/profile-symbols.sh`). It is the profiler that works on PVM
//! hosts, where the guest kernel is emulated and perf cannot see into it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub const PROFILE_ENV: &str = "THAW_VMM_PROFILE";
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

pub struct RipSampler {
    path: PathBuf,
    counts: Mutex<HashMap<u64, u64>>,
}

impl RipSampler {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A sampler if `THAW_VMM_PROFILE` names a file.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os(PROFILE_ENV).filter(|p| !p.is_empty())?;
        Some(Self::new(path.into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, rip: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(rip).or_insert(0) += 1;
    }

    /// (rip, count), most frequent first.
    pub fn histogram(&self) -> Vec<(u64, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut h: Vec<(u64, u64)> = counts.iter().map(|(&r, &c)| (r, c)).collect();
        h.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        h
    }

    /// Writes `count rip` lines under a header; returns the sample total.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<u64> {
        let h = self.histogram();
        let total: u64 = h.iter().map(|&(_, c)| c).sum();
        writeln!(
            out,
            "# thaw-vmm guest RIP samples, vCPU 0 every {} ms: {total} samples",
            SAMPLE_INTERVAL.as_millis()
        )?;
        writeln!(out, "# count rip")?;
        for (rip, count) in h {
            writeln!(out, "{count} {rip:#x}")?;
        }
        Ok(total)
    }

    pub fn write_file(&self) -> std::io::Result<u64> {
        let mut f = std::io::BufWriter::new(thaw_snapshots::private::create_file(&self.path)?);
        let total = self.write_to(&mut f)?;
        f.flush()?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_sorted_and_written_with_a_total() {
        let s = RipSampler::new(PathBuf::from("unused"));
        for rip in [0x10, 0x20, 0x20, 0x30, 0x20, 0x30] {
            s.record(rip);
        }
        assert_eq!(s.histogram(), vec![(0x20, 3), (0x30, 2), (0x10, 1)]);
        let mut out = Vec::new();
        assert_eq!(s.write_to(&mut out).unwrap(), 6);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("6 samples"), "{text}");
        assert_eq!(&lines[2..], ["3 0x20", "2 0x30", "1 0x10"]);
    }

    #[test]
    fn writes_the_file_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let s = RipSampler::new(dir.path().join("prof.txt"));
        s.record(0xffff_ffff_8100_0000);
        assert_eq!(s.write_file().unwrap(), 1);
        let text = std::fs::read_to_string(s.path()).unwrap();
        assert!(text.ends_with("1 0xffffffff81000000\n"), "{text}");
    }
}
