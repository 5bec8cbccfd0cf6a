//! Running external commands with a deadline, so a hung `ctr` fails a test
//! instead of hanging the suite.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Output {
    /// The exit code, or `None` when killed by a signal or timed out.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }

    /// stdout and stderr together, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit={:?} timed_out={} elapsed={:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code(),
            self.timed_out,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }

    /// Like [`Output::describe`], with long output cut to its ends.
    pub fn describe_short(&self) -> String {
        fn cut(s: &str) -> String {
            if s.len() <= 4096 {
                return s.to_string();
            }
            let head = s.char_indices().nth(2048).map_or(s.len(), |(i, _)| i);
            let tail = s.char_indices().rev().nth(2047).map_or(0, |(i, _)| i);
            format!(
                "{}\n[... {} bytes ...]\n{}",
                &s[..head],
                s.len(),
                &s[tail..]
            )
        }
        format!(
            "exit={:?} timed_out={} elapsed={:?}\n--- stdout ({} bytes) ---\n{}\n--- stderr ({} bytes) ---\n{}",
            self.code(),
            self.timed_out,
            self.elapsed,
            self.stdout.len(),
            cut(&self.stdout),
            self.stderr.len(),
            cut(&self.stderr)
        )
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` with stdin closed; kills it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    wait_with_deadline(child, start, timeout)
}

/// Waits for an already spawned child (stdout/stderr piped or not).
pub fn wait_with_deadline(mut child: Child, start: Instant, timeout: Duration) -> Output {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for child: {e}"),
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
