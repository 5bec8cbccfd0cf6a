//! A minimal logger: /dev/kmsg when the agent is PID 1 (the console may not
//! be open, and kmsg records survive into the kernel log), stderr otherwise.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

enum Sink {
    Kmsg(Mutex<File>),
    Stderr,
}

struct Logger {
    sink: Sink,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match &self.sink {
            Sink::Kmsg(file) => {
                // kmsg wants one record per write, prefixed by a syslog level.
                let prio = match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                let line = format!("<{prio}>thaw-agent: {}\n", record.args());
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            Sink::Stderr => {
                let line = format!(
                    "thaw-agent[{}] {}: {}\n",
                    std::process::id(),
                    record.level(),
                    record.args()
                );
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Parses "error", "warn", "info", "debug", "trace", "off".
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.parse().ok()
}

/// Installs the logger once; later calls are ignored.
pub fn init(level: LevelFilter, kmsg: bool) {
    let sink = if kmsg {
        match std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            Ok(f) => Sink::Kmsg(Mutex::new(f)),
            Err(_) => Sink::Stderr,
        }
    } else {
        Sink::Stderr
    };
    let logger: &'static Logger = Box::leak(Box::new(Logger { sink }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
