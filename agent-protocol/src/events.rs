//! The shim's reading of the agent's event log (`GetEvents`): which events
//! in a reply are new, and whether some were missed.
//!
//! The agent numbers events from 1 and keeps a bounded ring; `first_seq`
//! is the oldest it still holds. The shim cannot trust any of it (a guest
//! may be hostile or confused), so [`EventCursor::take`] holds whatever a
//! reply says to these rules: each sequence number is handed out at most
//! once, the cursor never moves back, out-of-order events in one reply are
//! put in order, and a gap (in `first_seq` or between events) is reported
//! so the caller can ask for exits directly. No arithmetic can overflow,
//! whatever the numbers.

use crate::agent::{Event, GetEventsResponse};

/// The last event sequence number the shim has seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventCursor {
    last: u64,
}

/// What one `GetEvents` reply brought.
#[derive(Debug, Default, PartialEq)]
pub struct NewEvents<'a> {
    /// Events not seen before, in sequence order.
    pub events: Vec<&'a Event>,
    /// Events were missed: `(first missed, first seen after them)`.
    pub missed: Option<(u64, u64)>,
}

impl EventCursor {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `after_seq` of the next `GetEvents` request.
    pub fn after(&self) -> u64 {
        self.last
    }

    /// Takes the new events of `reply` and moves past them.
    pub fn take<'a>(&mut self, reply: &'a GetEventsResponse) -> NewEvents<'a> {
        let mut out = NewEvents::default();
        // Nothing can be missed before the first event we ever saw.
        if self.last > 0 {
            let expected = self.last.saturating_add(1);
            if reply.first_seq > expected {
                out.missed = Some((expected, reply.first_seq));
            }
        }
        let mut fresh: Vec<&Event> = reply.events.iter().filter(|e| e.seq > self.last).collect();
        fresh.sort_by_key(|e| e.seq);
        fresh.dedup_by_key(|e| e.seq);
        for e in fresh {
            // `e.seq > self.last`, so `self.last + 1` cannot overflow.
            let expected = self.last + 1;
            if self.last > 0 && e.seq > expected && out.missed.is_none() {
                out.missed = Some((expected, e.seq));
            }
            self.last = e.seq;
            out.events.push(e);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(first_seq: u64, seqs: &[u64]) -> GetEventsResponse {
        let mut r = GetEventsResponse::new();
        r.first_seq = first_seq;
        r.events = seqs
            .iter()
            .map(|&seq| {
                let mut e = Event::new();
                e.seq = seq;
                e
            })
            .collect();
        r
    }

    fn seqs(n: &NewEvents<'_>) -> Vec<u64> {
        n.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn in_order_events_are_taken_once() {
        let mut c = EventCursor::new();
        let r = reply(1, &[1, 2, 3]);
        let n = c.take(&r);
        assert_eq!(seqs(&n), [1, 2, 3]);
        assert_eq!(n.missed, None);
        assert_eq!(c.after(), 3);
        // The same reply again (a replayed or repeated answer) is nothing new.
        let n = c.take(&r);
        assert!(n.events.is_empty());
        assert_eq!(c.after(), 3);
    }

    #[test]
    fn repeated_and_out_of_order_seqs_are_sorted_and_deduplicated() {
        let mut c = EventCursor::new();
        let r = reply(1, &[3, 1, 2, 2, 3, 1]);
        assert_eq!(seqs(&c.take(&r)), [1, 2, 3]);
        // Older than the cursor: dropped, the cursor does not move back.
        let r = reply(1, &[2, 4]);
        assert_eq!(seqs(&c.take(&r)), [4]);
        assert_eq!(c.after(), 4);
    }

    #[test]
    fn gaps_are_reported() {
        let mut c = EventCursor::new();
        assert_eq!(c.take(&reply(5, &[5])).missed, None, "first reply");
        assert_eq!(c.take(&reply(9, &[9])).missed, Some((6, 9)));
        assert_eq!(c.take(&reply(10, &[10, 12])).missed, Some((11, 12)));
    }

    #[test]
    fn extreme_seqs_do_not_overflow() {
        let mut c = EventCursor::new();
        let r = reply(u64::MAX, &[u64::MAX, 0, u64::MAX]);
        let n = c.take(&r);
        assert_eq!(seqs(&n), [u64::MAX]);
        assert_eq!(c.after(), u64::MAX);
        let r = reply(u64::MAX, &[u64::MAX, 1]);
        let n = c.take(&r);
        assert!(n.events.is_empty());
        assert_eq!(n.missed, None);
    }
}
