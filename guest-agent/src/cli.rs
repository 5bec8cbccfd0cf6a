//! Command line and the agent's main loop.
//!
//! The parser is hand-written on purpose, unlike the host tools' (clap):
//! the agent is PID 1 and is read from the root disk at every cold boot,
//! so its size matters; as init it must also ignore the kernel command
//! line words it is handed, and it has six options.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;
use nix::sys::signal::{SigSet, Signal};
use thaw_agent_protocol::CONTROL_PORT;

use crate::error::{Error, Result};
use crate::host::HostAddr;
use crate::reaper::Reaper;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::{init, logging, pid1, server};

const USAGE: &str = "\
usage: thaw-agent [options]
  As the guest's init (PID 1) it needs no options: it dials vsock CID 2
  port 1024 and reads thaw.log=<level> and thaw.port=<n> from the kernel
  command line.

  --host <addr>         vsock | vsock://<cid> | unix://<prefix> (the host side
                        of port P is the Unix socket <prefix>_P); required
                        when not PID 1
  --port <n>            control port to dial (default 1024)
  --run-dir <dir>       agent state (default /run/thaw)
  --cgroup-root <dir>   parent cgroup (v2) of containers, or none
                        (default /sys/fs/cgroup/thaw as PID 1, none otherwise)
  --private-mounts      run in a private mount namespace, so every mount the
                        agent makes goes away with it (host tests)
  --log-level <level>   error|warn|info|debug|trace (default: info, or warn
                        as PID 1)
";

#[derive(Debug, Clone)]
pub struct Options {
    pub host: HostAddr,
    pub port: u32,
    pub run_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub private_mounts: bool,
    pub log_level: LevelFilter,
}

fn usage_error(msg: impl std::fmt::Display) -> Error {
    Error::InvalidRequest(format!("{msg}\n{USAGE}"))
}

pub fn parse_args(args: &[String], pid1: bool) -> Result<Options> {
    let mut host = pid1.then_some(HostAddr::Vsock {
        cid: thaw_agent_protocol::HOST_CID,
    });
    let mut port = CONTROL_PORT;
    let mut run_dir = PathBuf::from("/run/thaw");
    let mut cgroup_root = pid1.then(|| PathBuf::from("/sys/fs/cgroup/thaw"));
    let mut private_mounts = false;
    let mut log_level = if pid1 {
        LevelFilter::Warn
    } else {
        LevelFilter::Info
    };
    if pid1 {
        if let Some(l) = pid1::cmdline_param("log").and_then(|l| logging::parse_level(&l)) {
            log_level = l;
        }
        if let Some(p) = pid1::cmdline_param("port").and_then(|p| p.parse().ok()) {
            port = p;
        }
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| usage_error(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--host" => host = Some(HostAddr::parse(&value("--host")?)?),
            "--port" => {
                port = value("--port")?
                    .parse()
                    .map_err(|_| usage_error("--port: not a number"))?
            }
            "--run-dir" => run_dir = PathBuf::from(value("--run-dir")?),
            "--cgroup-root" => {
                let v = value("--cgroup-root")?;
                cgroup_root = (v != "none").then(|| PathBuf::from(v));
            }
            "--private-mounts" => private_mounts = true,
            "--log-level" => {
                let v = value("--log-level")?;
                log_level = logging::parse_level(&v)
                    .ok_or_else(|| usage_error(format!("--log-level: unknown level {v:?}")))?;
            }
            "-h" | "--help" => return Err(usage_error("")),
            // The kernel hands init every command-line word it does not
            // know (e.g. `thaw_pvm`): as init, ignore them.
            _ if pid1 => {}
            other => return Err(usage_error(format!("unknown argument {other:?}"))),
        }
    }
    let host = host.ok_or_else(|| usage_error("--host is required when not PID 1"))?;
    Ok(Options {
        host,
        port,
        run_dir,
        cgroup_root,
        private_mounts,
        log_level,
    })
}

fn enter_private_mount_ns() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::errno("unshare(CLONE_NEWNS)", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::errno("making / private", e))
}

/// Outside a VM: SIGTERM/SIGINT tear every container down and exit.
fn handle_termination(rt: Arc<Runtime>, signals: SigSet) {
    let r = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                log::info!("{sig}: removing all containers and exiting");
                rt.teardown();
                std::process::exit(0);
            }
        });
    if let Err(e) = r {
        log::warn!("no signal thread: {e}");
    }
}

fn run(opts: &Options, pid1: bool) -> Result<()> {
    // Blocked before any thread exists, so every thread inherits it and the
    // signal thread alone receives them. Children get a clean mask from
    // std::process::Command.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if !pid1 {
        signals
            .thread_block()
            .map_err(|e| Error::errno("blocking SIGTERM/SIGINT", e))?;
    }
    if opts.private_mounts {
        enter_private_mount_ns()?;
    }
    let reaper = Reaper::start(!pid1).map_err(|e| Error::io("starting the reaper", e))?;
    let rt = Arc::new(Runtime::new(
        RuntimeConfig {
            run_dir: opts.run_dir.clone(),
            host: opts.host.clone(),
            cgroup_root: opts.cgroup_root.clone(),
            pid1,
        },
        reaper,
    )?);
    if !pid1 {
        handle_termination(rt.clone(), signals);
    }
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting tokio", e))?;
    log::info!(
        "serving on {} (run dir {}, cgroups {})",
        opts.host.describe(opts.port),
        opts.run_dir.display(),
        opts.cgroup_root
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "off".into())
    );
    tokio.block_on(server::serve(rt, opts.port))
}

pub fn main() -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(init::ARG) {
        init::main();
    }
    let pid1 = std::process::id() == 1;
    let early_problems = if pid1 {
        pid1::early_setup()
    } else {
        Vec::new()
    };
    let opts = match parse_args(&args, pid1) {
        Ok(o) => o,
        Err(_) if !pid1 && args.iter().any(|a| a == "-h" || a == "--help") => {
            print!("{USAGE}");
            std::process::exit(0);
        }
        Err(e) if !pid1 => {
            eprintln!("thaw-agent: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            logging::init(LevelFilter::Warn, true);
            log::error!("bad arguments, using defaults: {e}");
            match parse_args(&[], true) {
                Ok(o) => o,
                Err(_) => pid1::fatal_reset(),
            }
        }
    };
    logging::init(opts.log_level, pid1);
    for p in early_problems {
        log::error!("early setup: {p}");
    }
    if pid1 {
        std::panic::set_hook(Box::new(|info| {
            log::error!("fatal: {info}; resetting the VM");
            pid1::fatal_reset();
        }));
    }
    loop {
        match run(&opts, pid1) {
            Ok(()) => log::error!("server stopped"),
            Err(e) => log::error!("{e}"),
        }
        if !pid1 {
            std::process::exit(1);
        }
        // Init must not exit; try again after a pause.
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn host_mode_needs_host() {
        assert!(parse_args(&[], false).is_err());
        let o = parse_args(
            &args(&[
                "--host",
                "unix:///tmp/a",
                "--cgroup-root",
                "none",
                "--port",
                "7",
            ]),
            false,
        )
        .unwrap();
        assert_eq!(o.port, 7);
        assert!(o.cgroup_root.is_none());
        assert!(parse_args(&args(&["--bogus"]), false).is_err());
    }

    #[test]
    fn init_ignores_stray_kernel_words() {
        let o = parse_args(&args(&["thaw_pvm", "noxsave", "--port", "9"]), true).unwrap();
        assert_eq!(o.port, 9);
        assert_eq!(o.host, HostAddr::Vsock { cid: 2 });
        assert_eq!(o.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup/thaw")));
    }
}
