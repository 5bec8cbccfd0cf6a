//! OOM detection: watches each container's memory.events with inotify (the
//! kernel notifies on changes) and reports a new oom_kill count as an event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::runtime::cgroup;
use crate::runtime::events::EventLog;

struct Watched {
    wd: Option<WatchDescriptor>,
    cgroup: PathBuf,
    last: u64,
}

#[derive(Clone)]
pub struct OomWatcher {
    inotify: Option<Arc<Inotify>>,
    by_id: Arc<Mutex<HashMap<String, Watched>>>,
    events: Arc<EventLog>,
}

impl OomWatcher {
    pub fn start(events: Arc<EventLog>) -> OomWatcher {
        let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(i) => Some(Arc::new(i)),
            Err(e) => {
                log::warn!("inotify unavailable, OOM events only at exit: {e}");
                None
            }
        };
        let w = OomWatcher {
            inotify,
            by_id: Arc::default(),
            events,
        };
        if let Some(ino) = w.inotify.clone() {
            let w2 = w.clone();
            let spawned = std::thread::Builder::new()
                .name("oom".into())
                .spawn(move || loop {
                    match ino.read_events() {
                        Ok(evs) => {
                            for ev in evs {
                                w2.on_change(ev.wd);
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            log::error!("inotify read: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("starting the OOM watcher thread: {e}");
            }
        }
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn watch(&self, id: &str, cgroup: PathBuf) {
        let events = cgroup.join("memory.events");
        let wd = match (&self.inotify, events.exists()) {
            (Some(ino), true) => ino.add_watch(&events, AddWatchFlags::IN_MODIFY).ok(),
            _ => None,
        };
        let last = cgroup::oom_kills(&cgroup);
        self.lock()
            .insert(id.to_string(), Watched { wd, cgroup, last });
    }

    pub fn unwatch(&self, id: &str) {
        if let Some(w) = self.lock().remove(id) {
            if let (Some(ino), Some(wd)) = (&self.inotify, w.wd) {
                let _ = ino.rm_watch(wd);
            }
        }
    }

    fn on_change(&self, wd: WatchDescriptor) {
        let id = self
            .lock()
            .iter()
            .find(|(_, w)| w.wd == Some(wd))
            .map(|(id, _)| id.clone());
        if let Some(id) = id {
            self.check_now(&id);
        }
    }

    /// Reports an OOM kill not reported yet; called on inotify changes and
    /// before a container's exit is published.
    pub fn check_now(&self, id: &str) {
        let fire = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(w) => {
                    let now = cgroup::oom_kills(&w.cgroup);
                    let fire = now > w.last;
                    w.last = w.last.max(now);
                    fire
                }
                None => false,
            }
        };
        if fire {
            self.events.push_oom(id);
        }
    }
}
