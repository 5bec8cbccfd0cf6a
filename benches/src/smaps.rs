//! `/proc/<pid>/smaps` read for what a sandbox costs: all `Rss` and
//! `Private_Dirty`, and the same of the guest-memory mapping apart.

use std::path::Path;

/// The figures of one process, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Smaps {
    /// Private_Dirty of every mapping.
    pub private_dirty: u64,
    /// Of the guest-memory mapping (a mapping of the file `memory`):
    /// its size, Rss and Private_Dirty; zero when there is none.
    pub guest_size: u64,
    pub guest_rss: u64,
    pub guest_private_dirty: u64,
    /// Rss of every mapping.
    pub rss: u64,
}

impl Smaps {
    pub fn rss_without_guest(&self) -> u64 {
        self.rss - self.guest_rss
    }

    pub fn private_dirty_without_guest(&self) -> u64 {
        self.private_dirty - self.guest_private_dirty
    }
}

/// Parses smaps text; the guest mapping is the one whose path's last
/// component is `memory_file`.
pub fn parse_smaps(text: &str, memory_file: &str) -> Smaps {
    let mut s = Smaps::default();
    let mut in_guest = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            let path = line.split_whitespace().nth(5).unwrap_or("");
            in_guest = Path::new(path)
                .file_name()
                .is_some_and(|n| n == memory_file);
            continue;
        }
        let kib = words
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "Size:" if in_guest => s.guest_size += kib,
            "Rss:" => {
                s.rss += kib;
                if in_guest {
                    s.guest_rss += kib;
                }
            }
            "Private_Dirty:" => {
                s.private_dirty += kib;
                if in_guest {
                    s.guest_private_dirty += kib;
                }
            }
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mapping_is_told_apart() {
        let text = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:00 12 /usr/bin/thaw-vmm
Size:               1024 kB
Rss:                 800 kB
Private_Dirty:         0 kB
7f0000000000-7f0010000000 rw-p 00000000 fd:00 99 /var/t/templates/abc/memory
Size:             262144 kB
Rss:               40000 kB
Private_Dirty:      3000 kB
7f0020000000-7f0020100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 500 kB
Private_Dirty:       500 kB
VmFlags: rd wr mr mw me ac sd
";
        let s = parse_smaps(text, "memory");
        assert_eq!(s.guest_size, 262144);
        assert_eq!(s.guest_rss, 40000);
        assert_eq!(s.guest_private_dirty, 3000);
        assert_eq!(s.rss_without_guest(), 1300);
        assert_eq!(s.private_dirty, 3500);
        assert_eq!(s.private_dirty_without_guest(), 500);
    }
}
