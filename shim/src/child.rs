//! Running helper programs (mkfs.erofs) to completion.
//!
//! In the shim daemon the containerd-shim crate reaps every child on
//! SIGCHLD, so `Child::wait` would race it and fail with ECHILD. There the
//! exit status comes from the crate's exit monitor instead; elsewhere (the
//! `start`/`delete` actions, unit tests) plain `wait` is right.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};

use crate::error::{Error, Result};

static REAPER_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Called once the daemon's SIGCHLD reaper owns our children.
pub fn set_reaper_active() {
    REAPER_ACTIVE.store(true, Ordering::SeqCst);
}

pub fn reaper_active() -> bool {
    REAPER_ACTIVE.load(Ordering::SeqCst)
}

#[derive(Debug)]
pub struct Finished {
    /// Exit code, or 128 + signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with piped output, killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    run_with_input(cmd, None, timeout)
}

/// [`run`], with `input` on the program's stdin (closed after it).
pub fn run_with_input(
    cmd: &mut Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Finished> {
    let what = format!("{:?}", cmd.get_program());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Subscribe before spawning so a fast exit cannot be missed.
    let sub = if reaper_active() {
        Some(monitor_subscribe(Topic::Pid).map_err(|e| Error::Shim(e.to_string()))?)
    } else {
        None
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting {what}"), e))?;
    let pid = child.id() as i32;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // On its own thread: a program that reads nothing must not block
        // us on a full pipe. EPIPE is its right.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        });
    }
    let out = child.stdout.take();
    let err = child.stderr.take();
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(1 << 20).read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = read(out.map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err_t = read(err.map(|e| Box::new(e) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let code = match sub {
        Some(sub) => loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match sub.rx.recv_timeout(left) {
                Ok(ev) => {
                    if let Subject::Pid(p) = ev.subject {
                        if p == pid {
                            break ev.exit_code;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    return Err(Error::Shim(format!("{what} did not finish in {timeout:?}")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Shim("exit monitor closed".into()));
                }
            }
        },
        None => loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    use std::os::unix::process::ExitStatusExt;
                    break st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Shim(format!("{what} did not finish in {timeout:?}")));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(Error::io(format!("waiting for {what}"), e)),
            }
        },
    };
    Ok(Finished {
        code,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}
