//! Building templates: boot a VM cold in a child `thaw-vmm`, wait until its
//! guest says it is ready, snapshot it and stop it. The store
//! (`thaw_snapshots::template`) decides when to build and publishes the
//! result atomically; this module only produces the snapshot files.
//!
//! Also the `thaw-vmm template build|list|rm|gc` subcommand.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thaw_snapshots::template::{Store, TemplateInputs, TemplateKey, DEFAULT_STORE};
pub use thaw_vmm_api::ReadyProbe;
use thaw_vmm_api::{BootArgs, Disk, Serial, VmmClient, VmmCommand};

use crate::Error;

/// The port the guest agent dials when it is ready.
pub const AGENT_PORT: u32 = 1024;
/// The port thaw's test init reports on.
pub const TEST_INIT_PORT: u32 = 1234;
/// Longest line accepted from the guest while waiting for it.
const MAX_GUEST_LINE: u64 = 4096;

#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The `thaw-vmm` binary to boot the template with.
    pub vmm: PathBuf,
    pub ready_port: u32,
    pub probe: ReadyProbe,
    /// Cold boot, readiness and snapshot must finish within this.
    pub timeout: Duration,
}

impl BuildOptions {
    pub fn new(vmm: PathBuf) -> Self {
        BuildOptions {
            vmm,
            ready_port: AGENT_PORT,
            probe: ReadyProbe::Agent,
            timeout: Duration::from_secs(300),
        }
    }
}

/// Why a build failed once the template VM was running (the error the
/// caller sees adds the VMM's stderr and the guest console).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("thaw-vmm exited ({0}) before the guest was ready")]
    VmmExited(ExitStatus),
    #[error("the guest was not ready before the deadline")]
    NotReady,
    #[error("timed out")]
    TimedOut,
    #[error("the guest sent {0:?}, not a line")]
    NotALine(String),
    #[error("test init said {said:?}, expected {expected}")]
    TestInit {
        said: String,
        expected: &'static str,
    },
    #[error("test init echo: {ok:?} {pong:?}")]
    TestInitEcho { ok: String, pong: String },
    #[error("the template VM's control socket: {0}")]
    Control(#[from] thaw_vmm_api::Error),
    #[error("the template VM did not exit after stop")]
    NoExitAfterStop,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn build_io(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// The child VMM; killed and reaped if dropped while still running.
struct VmmChild {
    child: Child,
    sockets: tempfile::TempDir,
}

impl VmmChild {
    fn console(&self) -> PathBuf {
        self.sockets.path().join("console")
    }
    fn stderr(&self) -> PathBuf {
        self.sockets.path().join("stderr")
    }

    /// The last lines of the VMM's stderr and the guest console, for errors.
    fn diagnostics(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read(p).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "\n--- thaw-vmm stderr ---\n{}\n--- guest console (tail) ---\n{}",
            tail(&self.stderr()),
            tail(&self.console())
        )
    }

    fn fail(&mut self, source: BuildError) -> Error {
        // Stop it first so its stderr is complete.
        self.kill();
        Error::TemplateBuild {
            source,
            diagnostics: self.diagnostics(),
        }
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boots `inputs` cold, waits for the guest to be ready, snapshots it into
/// `out` and stops the VMM. Past `opts.timeout` the VMM is killed and the
/// build fails. The VMM's sockets live in a private temporary directory
/// that is removed on every path.
pub fn boot_and_snapshot(
    inputs: &TemplateInputs,
    opts: &BuildOptions,
    out: &Path,
) -> Result<(), Error> {
    let deadline = Instant::now() + opts.timeout;
    let sockets = tempfile::Builder::new()
        .prefix("thaw-template-")
        .tempdir()
        .map_err(io_err("creating a socket directory"))?;
    let uds = sockets.path().join("vsock");
    let api = sockets.path().join("api");
    // Listen before the VMM starts: the guest may dial as soon as it runs.
    let ready_path = sockets.path().join(format!("vsock_{}", opts.ready_port));
    let ready = thaw_snapshots::private::bind_socket(&ready_path)
        .map_err(io_err(format!("listening on {}", ready_path.display())))?;
    let stderr_path = sockets.path().join("stderr");
    let stderr = thaw_snapshots::private::create_file(&stderr_path)
        .map_err(io_err(format!("creating {}", stderr_path.display())))?;

    let boot = VmmCommand::Boot(BootArgs {
        disks: vec![Disk::read_only(&inputs.root_image)],
        spare_disks: inputs.spare_disks.into(),
        vsock_uds: Some(uds.clone()),
        vcpus: inputs.vcpus.into(),
        memory_mib: inputs.memory_mib,
        serial: Serial::File(sockets.path().join("console")),
        api_sock: Some(api.clone()),
        ..BootArgs::new(&inputs.kernel)
    });
    let child = boot
        .command(&opts.vmm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(io_err(format!("starting {}", opts.vmm.display())))?;
    let mut vmm = VmmChild { child, sockets };

    let conn = match accept_until(&ready, &mut vmm, deadline) {
        Ok(c) => c,
        Err(e) => return Err(vmm.fail(e)),
    };
    // Held open until the snapshot is taken: the guest waits in it.
    let _held = match opts.probe {
        ReadyProbe::Agent => conn,
        ReadyProbe::TestInit => match walk_test_init(conn, &ready, &uds, &mut vmm, deadline) {
            Ok(c) => c,
            Err(e) => return Err(vmm.fail(e)),
        },
    };

    if let Err(e) = control(&api, deadline).and_then(|c| Ok(c.snapshot(out)?)) {
        return Err(vmm.fail(e));
    }
    if let Err(e) = control(&api, deadline).and_then(|c| Ok(c.stop()?)) {
        return Err(vmm.fail(e));
    }
    let stop_by = Instant::now() + Duration::from_secs(30);
    loop {
        match vmm.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < stop_by => std::thread::sleep(Duration::from_millis(20)),
            _ => return Err(vmm.fail(BuildError::NoExitAfterStop)),
        }
    }
    Ok(())
}

fn remaining(deadline: Instant) -> Result<Duration, BuildError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(BuildError::TimedOut)
}

/// A client of the VMM's control socket whose round trips end by `deadline`.
fn control(api: &Path, deadline: Instant) -> Result<VmmClient, BuildError> {
    Ok(VmmClient::new(api, remaining(deadline)?))
}

/// Accepts one connection, giving up if the VMM exits or time runs out.
fn accept_until(
    listener: &UnixListener,
    vmm: &mut VmmChild,
    deadline: Instant,
) -> Result<UnixStream, BuildError> {
    listener
        .set_nonblocking(true)
        .map_err(build_io("waiting for the guest's connection"))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(build_io("setting up the guest's connection"))?;
                let left = remaining(deadline)?;
                s.set_read_timeout(Some(left))
                    .and_then(|_| s.set_write_timeout(Some(left)))
                    .map_err(build_io("setting up the guest's connection"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(build_io("accepting the guest's connection")(e)),
        }
        if let Ok(Some(status)) = vmm.child.try_wait() {
            return Err(BuildError::VmmExited(status));
        }
        if Instant::now() >= deadline {
            return Err(BuildError::NotReady);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line from the guest, bounded in length (a hostile guest cannot make
/// us buffer without end) and by the stream's timeout.
fn guest_line(r: &mut impl BufRead) -> Result<String, BuildError> {
    let mut line = String::new();
    r.take(MAX_GUEST_LINE)
        .read_line(&mut line)
        .map_err(build_io("reading from the guest"))?;
    if !line.ends_with('\n') {
        return Err(BuildError::NotALine(line));
    }
    Ok(line.trim_end().to_string())
}

/// Drives the test init from its first report to its serve loop; returns
/// the serve connection, on which it waits for a command.
fn walk_test_init(
    first: UnixStream,
    ready: &UnixListener,
    uds: &Path,
    vmm: &mut VmmChild,
    deadline: Instant,
) -> Result<UnixStream, BuildError> {
    let said = |said: String, expected| BuildError::TestInit { said, expected };
    let mut w = first
        .try_clone()
        .map_err(build_io("talking to the test init"))?;
    let mut r = BufReader::new(first);
    let disk = guest_line(&mut r)?;
    if !disk.starts_with("disk ") {
        return Err(said(disk, "a disk report"));
    }
    writeln!(w, "nonce 1").map_err(build_io("talking to the test init"))?;
    let ack = guest_line(&mut r)?;
    if ack != "ack 1" {
        return Err(said(ack, "ack 1"));
    }
    let echo = UnixStream::connect(uds).map_err(build_io("connecting to vsock"))?;
    let left = remaining(deadline)?;
    echo.set_read_timeout(Some(left))
        .map_err(build_io("connecting to vsock"))?;
    (&echo)
        .write_all(b"CONNECT 5001\nping\n")
        .map_err(build_io("talking to the test init's echo port"))?;
    let mut er = BufReader::new(&echo);
    let ok = guest_line(&mut er)?;
    let pong = guest_line(&mut er)?;
    if !ok.starts_with("OK ") || pong != "echo ping" {
        return Err(BuildError::TestInitEcho { ok, pong });
    }
    let serve = accept_until(ready, vmm, deadline)?;
    let mut r = BufReader::new(
        serve
            .try_clone()
            .map_err(build_io("talking to the test init"))?,
    );
    let line = guest_line(&mut r)?;
    if line != "ready" {
        return Err(said(line, "ready"));
    }
    Ok(serve)
}

// ---------------------------------------------------------------------------
// The `template` subcommand (parsed by clap as part of `cli`).

/// `thaw-vmm template build|list|rm|gc`.
#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// Boot a template VM once, wait until its guest is ready, snapshot it
    /// into the store and print its directory (at once if already built).
    Build(BuildArgs),
    /// One line per template: key, parameters, inputs, creation time.
    List(StoreArgs),
    /// Remove one template.
    Rm {
        #[arg(value_name = "KEY", value_parser = parse_key)]
        key: TemplateKey,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove templates whose inputs changed since they were built.
    Gc(StoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Template store.
    #[arg(long = "store", value_name = "DIR", default_value = DEFAULT_STORE)]
    pub dir: PathBuf,
}

/// What a ready guest looks like (`--ready`); the words are
/// [`ReadyProbe::arg`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Ready {
    /// The guest agent dials the ready port.
    Agent,
    /// thaw's test init (tests/test-init).
    TestInit,
}

impl From<Ready> for ReadyProbe {
    fn from(r: Ready) -> Self {
        match r {
            Ready::Agent => ReadyProbe::Agent,
            Ready::TestInit => ReadyProbe::TestInit,
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct BuildArgs {
    /// Uncompressed ELF guest kernel.
    #[arg(long, value_name = "VMLINUX")]
    kernel: PathBuf,
    /// The guest's root disk (read-only; a `,ro` suffix is accepted).
    #[arg(long = "disk", value_name = "ROOT_IMAGE[,ro]")]
    disk: PathBuf,
    /// Empty disk slots kept for attach after restore.
    #[arg(long, value_name = "N", default_value_t = 0)]
    spare_disks: u8,
    /// Guest vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    memory_mib: u32,
    /// What a ready guest looks like.
    #[arg(long, value_name = "PROBE", value_enum, default_value_t = Ready::Agent)]
    ready: Ready,
    /// Vsock port the guest dials when ready [default: 1024 for agent,
    /// 1234 for test-init].
    #[arg(long, value_name = "P")]
    ready_port: Option<u32>,
    /// Give up on the build after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// After a failed build, fail at once with its reason for this many
    /// seconds instead of booting again.
    #[arg(long, value_name = "SECS",
          default_value_t = thaw_snapshots::template::DEFAULT_RETRY_AFTER.as_secs())]
    retry_after: u64,
    /// Keep the store's templates within this many MiB on disk: past it,
    /// the least recently used templates no VM runs from are removed (the
    /// one this command returns never is).
    #[arg(long, value_name = "MIB")]
    max_store_mib: Option<u64>,
    #[command(flatten)]
    store: StoreArgs,
}

fn parse_key(value: &str) -> Result<TemplateKey, String> {
    TemplateKey::parse(value).map_err(|e| e.to_string())
}

/// A parsed `template` command with its defaults resolved.
#[derive(Debug, PartialEq)]
enum Subcommand {
    Build {
        inputs: TemplateInputs,
        probe: ReadyProbe,
        ready_port: u32,
        timeout: Duration,
        max_store_mib: Option<u64>,
    },
    List,
    Remove(TemplateKey),
    Gc,
}

impl TemplateCommand {
    fn resolve(self) -> (Subcommand, Store) {
        match self {
            TemplateCommand::Build(b) => {
                let probe = ReadyProbe::from(b.ready);
                let store =
                    Store::new(b.store.dir).with_retry_after(Duration::from_secs(b.retry_after));
                let root_image = match b.disk.to_str().and_then(|d| d.strip_suffix(",ro")) {
                    Some(stripped) => PathBuf::from(stripped),
                    None => b.disk,
                };
                let cmd = Subcommand::Build {
                    inputs: TemplateInputs {
                        kernel: b.kernel,
                        root_image,
                        vcpus: b.vcpus,
                        memory_mib: b.memory_mib,
                        spare_disks: b.spare_disks,
                        // The child VMM boots with `--pvm auto`.
                        guest_cmdline: crate::vm::default_guest_cmdline(crate::vm::host_is_pvm()),
                    },
                    probe,
                    ready_port: b.ready_port.unwrap_or(match probe {
                        ReadyProbe::Agent => AGENT_PORT,
                        ReadyProbe::TestInit => TEST_INIT_PORT,
                    }),
                    timeout: Duration::from_secs(b.timeout),
                    max_store_mib: b.max_store_mib,
                };
                (cmd, store)
            }
            TemplateCommand::List(s) => (Subcommand::List, Store::new(s.dir)),
            TemplateCommand::Rm { key, store } => (Subcommand::Remove(key), Store::new(store.dir)),
            TemplateCommand::Gc(s) => (Subcommand::Gc, Store::new(s.dir)),
        }
    }

    /// Runs it; returns the exit status (0 ok, 1 failed).
    pub fn run(self) -> i32 {
        let (cmd, store) = self.resolve();
        match run(cmd, &store) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("thaw-vmm template: {e}");
                1
            }
        }
    }
}

/// Evicts least recently used templates past `max_mib` (never `keep`).
/// A failure is reported, not fatal: the template asked for is ready.
fn enforce_quota(store: &Store, max_mib: Option<u64>, keep: &TemplateKey) {
    let Some(max) = max_mib else { return };
    match store.evict_to(max.saturating_mul(1 << 20), Some(keep)) {
        Ok(removed) => {
            for k in removed {
                eprintln!("thaw-vmm template: evicted {k} (store over {max} MiB)");
            }
        }
        Err(e) => eprintln!("thaw-vmm template: keeping the store within {max} MiB: {e}"),
    }
}

fn run(cmd: Subcommand, store: &Store) -> Result<(), Error> {
    match cmd {
        Subcommand::Build {
            inputs,
            probe,
            ready_port,
            timeout,
            max_store_mib,
        } => {
            // Narrows a store made before stores were owner-only, so the
            // templates inside (guest memory) cannot be reached by others.
            thaw_snapshots::private::create_dir_all(store.root())
                .map_err(io_err(format!("creating {}", store.root().display())))?;
            let key = store.key(&inputs)?;
            if let Some(dir) = store.get(&key) {
                store.mark_used(&key);
                eprintln!("thaw-vmm template: {key} already built");
                enforce_quota(store, max_store_mib, &key);
                println!("{}", dir.display());
                return Ok(());
            }
            let vmm = std::env::current_exe().map_err(io_err("finding thaw-vmm itself"))?;
            let opts = BuildOptions {
                vmm,
                ready_port,
                probe,
                timeout,
            };
            let started = Instant::now();
            let dir = store.build(&key, &inputs, |out| boot_and_snapshot(&inputs, &opts, out))?;
            eprintln!(
                "thaw-vmm template: {key} ready after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            enforce_quota(store, max_store_mib, &key);
            println!("{}", dir.display());
        }
        Subcommand::List => {
            for rec in store.list()? {
                match rec {
                    Ok(r) => println!("{}", r.summary()),
                    Err(e) => println!("unreadable  {e}"),
                }
            }
        }
        Subcommand::Remove(key) => store.remove(&key)?,
        Subcommand::Gc => {
            for key in store.gc()? {
                println!("removed {key}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{self, Invocation};
    use clap::error::ErrorKind;

    fn parse_os(argv: Vec<std::ffi::OsString>) -> Result<(Subcommand, Store), clap::Error> {
        match cli::parse(argv)? {
            Invocation::Template(t) => Ok(t.resolve()),
            other => panic!("expected a template command, got {other:?}"),
        }
    }

    /// `thaw-vmm template` followed by `s`.
    fn parse(s: &str) -> Result<(Subcommand, Store), clap::Error> {
        parse_os(
            ["thaw-vmm", "template"]
                .into_iter()
                .chain(s.split_whitespace())
                .map(Into::into)
                .collect(),
        )
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_build() {
        let (cmd, store) = parse(
            "build --kernel /k --disk /r,ro --spare-disks 2 --vcpus 2 --memory-mib 512 \
             --ready test-init --timeout 90 --store /s",
        )
        .unwrap();
        assert_eq!(store.root(), Path::new("/s"));
        assert_eq!(
            cmd,
            Subcommand::Build {
                inputs: TemplateInputs {
                    kernel: "/k".into(),
                    root_image: "/r".into(),
                    vcpus: 2,
                    memory_mib: 512,
                    spare_disks: 2,
                    guest_cmdline: crate::vm::default_guest_cmdline(crate::vm::host_is_pvm()),
                },
                probe: ReadyProbe::TestInit,
                ready_port: TEST_INIT_PORT,
                timeout: Duration::from_secs(90),
                max_store_mib: None,
            }
        );
        let (cmd, store) = parse("build --kernel /k --disk /r --ready-port 7").unwrap();
        assert_eq!(store.root(), Path::new(DEFAULT_STORE));
        match cmd {
            Subcommand::Build {
                probe, ready_port, ..
            } => assert_eq!((probe, ready_port), (ReadyProbe::Agent, 7)),
            other => panic!("{other:?}"),
        }
        match parse("build --kernel /k --disk /r --max-store-mib 4096")
            .unwrap()
            .0
        {
            Subcommand::Build { max_store_mib, .. } => assert_eq!(max_store_mib, Some(4096)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_list_rm_gc() {
        let key = "ab".repeat(32);
        assert_eq!(parse("list").unwrap().0, Subcommand::List);
        let (cmd, store) = parse("gc --store /x").unwrap();
        assert_eq!((cmd, store.root()), (Subcommand::Gc, Path::new("/x")));
        assert_eq!(
            parse(&format!("rm {key}")).unwrap().0,
            Subcommand::Remove(TemplateKey::parse(&key).unwrap())
        );
    }

    #[test]
    fn mistakes_name_the_option() {
        let has = |s: &str, words: &[&str]| {
            let e = err(s);
            for w in words {
                assert!(e.contains(w), "{s:?}: {w:?} not in {e}");
            }
        };
        has("build --disk /r", &["--kernel"]);
        has("build --kernel /k", &["--disk"]);
        has(
            "build --kernel /k --disk /r --vcpus two",
            &["--vcpus", "two"],
        );
        has("build --kernel /k --disk /r --vcpus 0", &["--vcpus", "'0'"]);
        has("build --kernel /k --disk /r --timeout 0", &["--timeout"]);
        has(
            "build --kernel /k --disk /r --spare-disks 300",
            &["--spare-disks", "300"],
        );
        has(
            "build --kernel /k --disk /r --ready fast",
            &["--ready", "fast"],
        );
        has("build --kernel", &["--kernel"]);
        has("list --kernel /k", &["--kernel"]);
        has("rm", &["KEY"]);
        has("rm nope", &["not a template key"]);
        has("rm nope extra", &["extra"]);
        has("frobnicate", &["frobnicate"]);
        let e = parse("").unwrap_err();
        assert_ne!(e.kind(), ErrorKind::DisplayHelp);
        assert_ne!(cli::report_status(e.kind()), 0);
    }

    /// What thaw-vmm-api builds is what this parser reads.
    #[test]
    fn reads_the_build_command_line_the_api_crate_builds() {
        use thaw_vmm_api::{TemplateBuildArgs, VmmCommand};
        let parse_api = |t: TemplateBuildArgs| {
            let args = VmmCommand::TemplateBuild(t).args();
            assert_eq!(args[0], "template");
            parse_os(std::iter::once("thaw-vmm".into()).chain(args).collect()).unwrap()
        };
        let inputs = |vcpus, memory_mib, spare_disks| TemplateInputs {
            kernel: "/k".into(),
            root_image: "/r".into(),
            vcpus,
            memory_mib,
            spare_disks,
            guest_cmdline: crate::vm::default_guest_cmdline(crate::vm::host_is_pvm()),
        };
        let (cmd, store) = parse_api(TemplateBuildArgs::new("/k", "/r"));
        assert_eq!(store.root(), Path::new(DEFAULT_STORE));
        assert_eq!(
            cmd,
            Subcommand::Build {
                inputs: inputs(1, 256, 0),
                probe: ReadyProbe::Agent,
                ready_port: AGENT_PORT,
                timeout: Duration::from_secs(300),
                max_store_mib: None,
            }
        );
        let (cmd, store) = parse_api(TemplateBuildArgs {
            spare_disks: 8,
            vcpus: 2,
            memory_mib: 128,
            ready: ReadyProbe::TestInit,
            ready_port: Some(4321),
            timeout_secs: 5,
            retry_after_secs: 30,
            store: Some("/s".into()),
            max_store_mib: Some(100),
            ..TemplateBuildArgs::new("/k", "/r")
        });
        assert_eq!(store.root(), Path::new("/s"));
        assert_eq!(
            cmd,
            Subcommand::Build {
                inputs: inputs(2, 128, 8),
                probe: ReadyProbe::TestInit,
                ready_port: 4321,
                timeout: Duration::from_secs(5),
                max_store_mib: Some(100),
            }
        );
        let (cmd, _) = parse_api(TemplateBuildArgs {
            ready: ReadyProbe::TestInit,
            ..TemplateBuildArgs::new("/k", "/r")
        });
        assert!(matches!(
            cmd,
            Subcommand::Build {
                ready_port: TEST_INIT_PORT,
                ..
            }
        ));
    }

    /// The `--ready` words are the api crate's.
    #[test]
    fn ready_words_are_the_api_crates() {
        use clap::ValueEnum;
        for r in Ready::value_variants() {
            let word = r.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(word, ReadyProbe::from(*r).arg());
        }
    }
}
