//! What an idle sandbox costs in memory, read from `/proc/<pid>/smaps`.
//!
//! For thaw: the VMM maps the template's memory file `MAP_PRIVATE`, so the
//! guest pages a sandbox wrote are the `Private_Dirty` of that mapping;
//! everything else the VMM has resident is its own overhead. For both
//! runtimes, the private memory a sandbox adds is the `Private_Dirty` of
//! its shim and of its sandbox processes (thaw: the VMM, guest pages
//! included; runc: the container's process).

use std::fs;

use thaw_benches::smaps::parse_smaps;
pub use thaw_benches::smaps::Smaps;

pub fn smaps_of(pid: u32) -> Result<Smaps, String> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("reading /proc/{pid}/smaps: {e}"))?;
    Ok(parse_smaps(&text, thaw_snapshots::MEMORY_FILE))
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The containerd shim serving container `id` (its command line names it
/// with `-id <id>`).
pub fn shim_of(id: &str) -> Option<u32> {
    let needle = format!(" -id {id} ");
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let c = cmdline(*pid) + " ";
            c.contains("containerd-shim") && c.contains(&needle)
        })
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                })
                == Some(pid)
        })
        .collect()
}

/// The executable's file name of `pid`.
pub fn exe_name(pid: u32) -> String {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}
