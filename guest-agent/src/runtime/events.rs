//! Exit and OOM events, kept in a bounded ring with sequence numbers so a
//! client that re-polls after a dropped call misses nothing it can still get.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use thaw_agent_protocol::agent::{Event, ExitEvent, GetEventsResponse, OomEvent};
use tokio::sync::Notify;

/// Events kept for late pollers.
const CAPACITY: usize = 4096;

pub struct EventLog {
    inner: Mutex<Inner>,
    notify: Notify,
}

struct Inner {
    next_seq: u64,
    ring: VecDeque<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            inner: Mutex::new(Inner {
                next_seq: 1,
                ring: VecDeque::new(),
            }),
            notify: Notify::new(),
        }
    }
}

impl EventLog {
    fn push(&self, mut ev: Event) {
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            ev.seq = inner.next_seq;
            inner.next_seq += 1;
            if inner.ring.len() == CAPACITY {
                inner.ring.pop_front();
            }
            inner.ring.push_back(ev);
        }
        self.notify.notify_waiters();
    }

    pub fn push_exit(&self, exit: ExitEvent) {
        let mut ev = Event::new();
        ev.set_exit(exit);
        self.push(ev);
    }

    pub fn push_oom(&self, container_id: &str) {
        let mut oom = OomEvent::new();
        oom.container_id = container_id.to_string();
        let mut ev = Event::new();
        ev.set_oom(oom);
        self.push(ev);
    }

    fn collect(&self, after: u64) -> GetEventsResponse {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = GetEventsResponse::new();
        r.first_seq = inner.ring.front().map(|e| e.seq).unwrap_or(inner.next_seq);
        r.events = inner
            .ring
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        r
    }

    /// Events after `after`, waiting up to `timeout` for the first one.
    pub async fn get(&self, after: u64, timeout: Duration) -> GetEventsResponse {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so a push in between wakes us.
            let notified = self.notify.notified();
            let r = self.collect(after);
            if !r.events.is_empty() {
                return r;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.collect(after);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_poll_wakes_on_push_and_keeps_order() {
        let log = std::sync::Arc::new(EventLog::default());
        let empty = log.get(0, Duration::from_millis(10)).await;
        assert!(empty.events.is_empty());
        let l2 = log.clone();
        let waiter = tokio::spawn(async move { l2.get(0, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.push_oom("c1");
        let got = waiter.await.unwrap();
        assert_eq!(got.events.len(), 1);
        assert_eq!(got.events[0].seq, 1);
        assert_eq!(got.events[0].oom().container_id, "c1");
        let mut exit = ExitEvent::new();
        exit.container_id = "c1".into();
        exit.exit_status = 3;
        log.push_exit(exit);
        let got = log.get(1, Duration::from_millis(1)).await;
        assert_eq!(got.events.len(), 1);
        assert_eq!(got.events[0].exit().exit_status, 3);
        assert_eq!(got.first_seq, 1);
    }
}
