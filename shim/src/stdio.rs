//! Copies between containerd's stdio FIFOs and the agent's per-stream
//! sockets (one raw byte stream per stdin/stdout/stderr, dialed by the
//! agent to a port the shim listens on).
//!
//! Every copy can be cancelled, so a client that stopped reading or a guest
//! that never closes a stream cannot pin a thread or hang a delete. The
//! output copies count themselves and the bytes they move in `OutputDone`:
//! an exit is published only after they finish, so `ctr` sees all output
//! before the exit status. A slow host only makes that take longer; the
//! wait gives up only when no byte has moved for a while (nobody reads, or
//! the guest holds a stream open without writing).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{Error, IoContext, Result};

const BUF: usize = 64 * 1024;
/// How often a wait for output looks whether bytes are still moving.
const PROGRESS_CHECK: Duration = Duration::from_millis(100);

/// The FIFO paths containerd gave for one process ("" = not wired).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A pipe whose write end, once closed, wakes every poll that watches it.
#[derive(Debug, Clone)]
pub struct Cancel {
    read: Arc<OwnedFd>,
    write: Arc<Mutex<Option<OwnedFd>>>,
}

impl Cancel {
    pub fn new() -> Result<Self> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .ctx(|| "creating cancel pipe".to_string())?;
        Ok(Cancel {
            read: Arc::new(r),
            write: Arc::new(Mutex::new(Some(w))),
        })
    }

    pub fn cancel(&self) {
        if let Ok(mut w) = self.write.lock() {
            w.take();
        }
    }

    fn is_cancelled(&self) -> bool {
        self.write.lock().map(|w| w.is_none()).unwrap_or(true)
    }
}

/// Waits until `fd` is ready for `flags` or the cancel pipe closes.
/// Returns false when cancelled.
fn wait_ready(fd: &impl AsFd, flags: PollFlags, cancel: &Cancel) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(fd.as_fd(), flags),
            PollFd::new(cancel.read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(false);
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(true);
        }
    }
}

/// Writes all of `buf`, waiting for room, unless cancelled (-> false).
fn write_all_cancellable<W: Write + AsFd>(
    w: &mut W,
    mut buf: &[u8],
    cancel: &Cancel,
) -> io::Result<bool> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_ready(w, PollFlags::POLLOUT, cancel)? {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Counts running output copies of one process and the bytes they moved.
#[derive(Debug, Default)]
pub struct OutputDone {
    running: Mutex<usize>,
    cond: Condvar,
    moved: AtomicU64,
}

impl OutputDone {
    fn add(&self) {
        if let Ok(mut n) = self.running.lock() {
            *n += 1;
        }
    }

    fn finish(&self) {
        if let Ok(mut n) = self.running.lock() {
            *n = n.saturating_sub(1);
            self.cond.notify_all();
        }
    }

    fn moved(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Waits until every output copy ended, for as long as they keep
    /// moving bytes; false once none moved for `idle`.
    pub fn wait(&self, idle: Duration) -> bool {
        let Ok(mut n) = self.running.lock() else {
            return false;
        };
        let mut last = self.moved.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while *n > 0 {
            let now = self.moved.load(Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
            let left = idle.saturating_sub(quiet_since.elapsed());
            if left.is_zero() {
                return false;
            }
            // Wake up now and then to look at the byte count.
            match self.cond.wait_timeout(n, left.min(PROGRESS_CHECK)) {
                Ok((g, _)) => n = g,
                Err(_) => return false,
            }
        }
        true
    }
}

/// Opens an output FIFO for writing without blocking on a reader:
/// read-write keeps the FIFO open (writes queue in the pipe) even when the
/// client is not reading yet or went away.
fn open_output_fifo(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("opening output FIFO {path}"))
}

/// Opens the stdin FIFO for reading without waiting for a writer. Poll on
/// it reports readable only for data, or for hang-up after a writer came
/// and went, so an early EOF cannot be mistaken.
fn open_input_fifo(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("opening stdin FIFO {path}"))
}

/// The listening sockets for one process's streams, made before the agent
/// call that makes the agent dial them.
pub struct PendingStdio {
    paths: StdioPaths,
    stdin: Option<(u32, UnixListener, PathBuf, File)>,
    stdout: Option<(u32, UnixListener, PathBuf, File)>,
    stderr: Option<(u32, UnixListener, PathBuf, File)>,
}

/// Allocates `<uds>_<port>` listeners for the non-empty FIFOs.
pub fn prepare(
    paths: &StdioPaths,
    uds: &Path,
    mut next_port: impl FnMut() -> u32,
) -> Result<PendingStdio> {
    let mut listen =
        |fifo: &str, input: bool| -> Result<Option<(u32, UnixListener, PathBuf, File)>> {
            if fifo.is_empty() {
                return Ok(None);
            }
            let file = if input {
                open_input_fifo(fifo)?
            } else {
                open_output_fifo(fifo)?
            };
            let port = next_port();
            let sock = thaw_agent_protocol::transport::host_socket_path(uds, port);
            let _ = std::fs::remove_file(&sock);
            let l = thaw_snapshots::private::bind_socket(&sock)
                .ctx(|| format!("listening on {}", sock.display()))?;
            l.set_nonblocking(true)
                .ctx(|| format!("setting {} non-blocking", sock.display()))?;
            Ok(Some((port, l, sock, file)))
        };
    let stdin = listen(&paths.stdin, true)?;
    let stdout = listen(&paths.stdout, false)?;
    // With a terminal the tty carries both outputs; stderr stays unwired.
    let stderr = if paths.terminal {
        None
    } else {
        listen(&paths.stderr, false)?
    };
    Ok(PendingStdio {
        paths: paths.clone(),
        stdin,
        stdout,
        stderr,
    })
}

impl PendingStdio {
    /// The ports to put in the agent request.
    pub fn ports(&self) -> thaw_agent_protocol::agent::Stdio {
        let mut s = thaw_agent_protocol::agent::Stdio::new();
        s.stdin_port = self.stdin.as_ref().map_or(0, |x| x.0);
        s.stdout_port = self.stdout.as_ref().map_or(0, |x| x.0);
        s.stderr_port = self.stderr.as_ref().map_or(0, |x| x.0);
        s
    }

    /// Accepts the agent's connections (it dialed them before its reply)
    /// and starts the copies.
    pub fn connect(mut self, timeout: Duration) -> Result<Bridges> {
        let cancel = Cancel::new()?;
        let stdin_cancel = Cancel::new()?;
        let done = Arc::new(OutputDone::default());
        let mut bridges = Bridges {
            cancel: cancel.clone(),
            stdin_cancel: stdin_cancel.clone(),
            done: done.clone(),
            sockets: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        if let Some((_, l, sock, fifo)) = self.stdin.take() {
            let s = accept_until(&l, &sock, deadline, &cancel)?;
            let _ = std::fs::remove_file(&sock);
            bridges.sockets.push(sock);
            let (c, sc) = (cancel.clone(), stdin_cancel.clone());
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || copy_stdin(fifo, s, &c, &sc))
                .ctx(|| "spawning stdin copy".into())?;
        }
        for (slot, name) in [
            (self.stdout.take(), "stdout"),
            (self.stderr.take(), "stderr"),
        ] {
            let Some((_, l, sock, fifo)) = slot else {
                continue;
            };
            let s = accept_until(&l, &sock, deadline, &cancel)?;
            let _ = std::fs::remove_file(&sock);
            bridges.sockets.push(sock);
            done.add();
            let (c, d) = (cancel.clone(), done.clone());
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Err(e) = copy_output(s, fifo, &c, &d) {
                        log::warn!("{name} copy ended: {e}");
                    }
                    d.finish();
                });
            if let Err(e) = spawned {
                done.finish();
                return Err(Error::io(format!("spawning {name} copy"), e));
            }
        }
        let _ = &self.paths;
        Ok(bridges)
    }
}

/// Removes listening sockets that were never connected (error paths).
impl Drop for PendingStdio {
    fn drop(&mut self) {
        for (_, _, sock, _) in [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(sock);
        }
    }
}

fn accept_until(
    l: &UnixListener,
    sock: &Path,
    deadline: Instant,
    cancel: &Cancel,
) -> Result<UnixStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)
                    .ctx(|| "setting stdio stream non-blocking".into())?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io(format!("accepting on {}", sock.display()), e)),
        }
        if Instant::now() >= deadline || cancel.is_cancelled() {
            return Err(Error::Agent(format!(
                "the agent did not connect the stdio stream {}",
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// stdin FIFO -> agent stream; EOF (or close_io) half-closes the stream.
fn copy_stdin(mut fifo: File, mut sock: UnixStream, cancel: &Cancel, stdin_cancel: &Cancel) {
    let mut buf = vec![0u8; BUF];
    loop {
        let mut fds = [
            PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
            PollFd::new(cancel.read.as_fd(), PollFlags::POLLIN),
            PollFd::new(stdin_cancel.read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("stdin poll: {e}");
                break;
            }
        }
        let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
        if ready(1) {
            return; // process gone: no half-close needed
        }
        let closing = ready(2);
        if ready(0) || closing {
            // Drain what is there; on close_io stop at "nothing more now".
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => match write_all_cancellable(&mut sock, &buf[..n], cancel) {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        log::debug!("stdin write: {e}");
                        return;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if closing {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("stdin read: {e}");
                    break;
                }
            }
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// agent stream -> stdout/stderr FIFO, until the agent half-closes.
fn copy_output(
    mut sock: UnixStream,
    mut fifo: File,
    cancel: &Cancel,
    done: &OutputDone,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut fifo_ok = true;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                if fifo_ok {
                    match write_all_cancellable(&mut fifo, &buf[..n], cancel) {
                        Ok(true) => {}
                        Ok(false) => return Ok(()),
                        // Keep draining the stream so the guest never blocks.
                        Err(e) => {
                            log::warn!("output FIFO write: {e}; discarding further output");
                            fifo_ok = false;
                        }
                    }
                }
                done.moved(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_ready(&sock, PollFlags::POLLIN, cancel)? {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The running copies of one process.
pub struct Bridges {
    cancel: Cancel,
    stdin_cancel: Cancel,
    done: Arc<OutputDone>,
    sockets: Vec<PathBuf>,
}

impl Bridges {
    /// Ends stdin after what the client has written so far.
    pub fn close_stdin(&self) {
        self.stdin_cancel.cancel();
    }

    /// Waits for stdout/stderr to reach EOF while they keep moving; false
    /// once nothing moved for `idle`.
    pub fn wait_output(&self, idle: Duration) -> bool {
        self.done.wait(idle)
    }

    /// Stops every copy now.
    pub fn stop(&self) {
        self.cancel.cancel();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Drop for Bridges {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn mkfifo(p: &Path) {
        let c = CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    struct Fixture {
        dir: tempfile::TempDir,
        paths: StdioPaths,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = StdioPaths::default();
        for (n, slot) in [
            ("in", &mut paths.stdin),
            ("out", &mut paths.stdout),
            ("err", &mut paths.stderr),
        ] {
            let p = dir.path().join(n);
            mkfifo(&p);
            *slot = p.to_str().unwrap().to_string();
        }
        Fixture { dir, paths }
    }

    /// Plays the agent: dials the ports like the agent does.
    fn dial(uds: &Path, port: u32) -> UnixStream {
        UnixStream::connect(thaw_agent_protocol::transport::host_socket_path(uds, port)).unwrap()
    }

    #[test]
    fn output_reaches_fifos_and_stdin_reaches_stream_then_eof() {
        let f = fixture();
        let uds = f.dir.path().join("v.sock");
        let mut port = 100;
        let pending = prepare(&f.paths, &uds, || {
            port += 1;
            port
        })
        .unwrap();
        let ports = pending.ports();
        assert_eq!(
            (ports.stdin_port, ports.stdout_port, ports.stderr_port),
            (101, 102, 103)
        );
        // The listeners the agent dials are owner-only, whatever the umask.
        for p in [101, 102, 103] {
            let sock = thaw_agent_protocol::transport::host_socket_path(&uds, p);
            let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&sock).unwrap());
            assert_eq!(mode & 0o777, 0o600, "{}", sock.display());
        }
        // The client side (ctr) opens its ends.
        let mut out_reader = File::open(&f.paths.stdout).unwrap();
        let mut err_reader = File::open(&f.paths.stderr).unwrap();
        let mut in_writer = OpenOptions::new().write(true).open(&f.paths.stdin).unwrap();
        let mut g_in = dial(&uds, 101);
        let mut g_out = dial(&uds, 102);
        let mut g_err = dial(&uds, 103);
        let bridges = pending.connect(Duration::from_secs(5)).unwrap();

        in_writer.write_all(b"typed input").unwrap();
        drop(in_writer);
        let mut got = String::new();
        g_in.read_to_string(&mut got).unwrap();
        assert_eq!(got, "typed input", "stdin then EOF");

        g_out.write_all(b"hello out").unwrap();
        g_err.write_all(b"hello err").unwrap();
        drop(g_out);
        drop(g_err);
        assert!(bridges.wait_output(Duration::from_secs(5)));
        drop(bridges);
        let mut s = String::new();
        out_reader.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello out");
        s.clear();
        err_reader.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello err");
        // Listening sockets are gone.
        assert!(std::fs::read_dir(f.dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("v.sock")));
    }

    #[test]
    fn a_stream_that_never_closes_cannot_hang_the_shim() {
        let f = fixture();
        let uds = f.dir.path().join("v.sock");
        let mut paths = f.paths.clone();
        paths.stdin.clear();
        paths.stderr.clear();
        let pending = prepare(&paths, &uds, || 7).unwrap();
        let _out_reader = File::open(&paths.stdout).unwrap();
        let _g_out = dial(&uds, 7);
        let bridges = pending.connect(Duration::from_secs(5)).unwrap();
        assert!(!bridges.wait_output(Duration::from_millis(200)));
        bridges.stop();
        assert!(
            bridges.wait_output(Duration::from_secs(2)),
            "cancel ends the copy"
        );
    }

    #[test]
    fn slow_output_that_keeps_moving_is_waited_for_in_full() {
        let f = fixture();
        let uds = f.dir.path().join("v.sock");
        let mut paths = f.paths.clone();
        paths.stdin.clear();
        paths.stderr.clear();
        let pending = prepare(&paths, &uds, || 9).unwrap();
        let mut reader = File::open(&paths.stdout).unwrap();
        let mut g_out = dial(&uds, 9);
        let bridges = pending.connect(Duration::from_secs(5)).unwrap();
        // 20 chunks, 50 ms apart: a whole second, five idle windows long.
        let w = std::thread::spawn(move || {
            for i in 0..20u8 {
                g_out.write_all(&[b'a' + i; 1000]).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let started = Instant::now();
        assert!(
            bridges.wait_output(Duration::from_millis(200)),
            "gave up while bytes moved"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
        w.join().unwrap();
        drop(bridges);
        let got = r.join().unwrap();
        assert_eq!(got.len(), 20_000);
        assert_eq!(got[19_999], b'a' + 19);
    }

    #[test]
    fn agent_not_dialing_is_an_error_not_a_hang() {
        let f = fixture();
        let mut n = 0;
        let pending = prepare(&f.paths, &f.dir.path().join("w.sock"), || {
            n += 1;
            n
        })
        .unwrap();
        let start = Instant::now();
        let e = pending
            .connect(Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("did not connect"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn output_with_a_reader_that_went_away_is_drained() {
        let f = fixture();
        let uds = f.dir.path().join("v.sock");
        let mut paths = f.paths.clone();
        paths.stdin.clear();
        paths.stderr.clear();
        let pending = prepare(&paths, &uds, || 5).unwrap();
        let mut g_out = dial(&uds, 5);
        let bridges = pending.connect(Duration::from_secs(5)).unwrap();
        // Nobody reads the FIFO: more than a pipe buffer must not block
        // forever; stop() ends it.
        let w = std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..4 {
                if g_out.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        bridges.stop();
        assert!(bridges.wait_output(Duration::from_secs(2)));
        drop(bridges);
        w.join().unwrap();
    }
}
