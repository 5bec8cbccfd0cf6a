//! The agent's events (exits, OOMs) as task events: one thread long-polls
//! the agent's event log for the life of the sandbox.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::Status;
use thaw_agent_protocol::agent as proto;
use thaw_agent_protocol::events::EventCursor;

use super::process::ts_from_ns;
use super::{lock, Tasks};
use crate::sandbox::Sandbox;

/// Long-poll window for agent events.
const EVENT_POLL: Duration = Duration::from_secs(10);
/// Failed polls in a row after which the agent counts as lost.
const MAX_POLL_FAILURES: u32 = 20;

/// Polls the agent's event stream for exits and OOMs until the sandbox
/// dies or the shim shuts down.
pub(super) fn start_event_loop(tasks: Weak<Tasks>, sb: Arc<Sandbox>) {
    let spawned = std::thread::Builder::new()
        .name("agent-events".into())
        .spawn(move || {
            let mut cursor = EventCursor::new();
            let mut failures = 0u32;
            loop {
                if sb.is_dead() {
                    return;
                }
                let Some(me) = tasks.upgrade() else { return };
                if me.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                drop(me);
                match sb.agent().get_events(cursor.after(), EVENT_POLL) {
                    Ok(r) => {
                        failures = 0;
                        let Some(me) = tasks.upgrade() else { return };
                        let new = cursor.take(&r);
                        if let Some((from, to)) = new.missed {
                            log::warn!("missed agent events {from}..{to}; asking for exits");
                            me.resync_exits(&sb);
                        }
                        for e in new.events {
                            me.handle_agent_event(e);
                        }
                    }
                    Err(e) => {
                        if sb.is_dead() {
                            return;
                        }
                        failures += 1;
                        log::warn!("agent events: {e}");
                        if failures >= MAX_POLL_FAILURES {
                            if let Some(me) = tasks.upgrade() {
                                if !me.shutting_down.load(Ordering::SeqCst) {
                                    me.sandbox_died(&format!("agent connection lost: {e}"));
                                }
                            }
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("spawning the agent event thread: {e}");
    }
}

impl Tasks {
    fn handle_agent_event(self: &Arc<Self>, e: &proto::Event) {
        match &e.kind {
            Some(proto::event::Kind::Exit(x)) => {
                let Ok(p) = self.process(&x.container_id, &x.exec_id) else {
                    log::debug!("exit of unknown process {}/{}", x.container_id, x.exec_id);
                    return;
                };
                p.on_exit(
                    x.exit_status,
                    ts_from_ns(x.exited_at_unix_ns),
                    &x.termination_message,
                    &self.events,
                );
            }
            Some(proto::event::Kind::Oom(o))
                if lock(&self.containers).contains_key(&o.container_id) =>
            {
                self.events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    ev::TaskOOM {
                        container_id: o.container_id.clone(),
                        ..Default::default()
                    },
                );
            }
            _ => {}
        }
    }

    /// Events were lost: ask the agent for each live process's exit.
    fn resync_exits(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        for c in self.all_containers() {
            for p in c.all_processes() {
                let s = p.state().status;
                if s == Status::RUNNING || s == Status::PAUSED {
                    let (events, sb) = (self.events.clone(), sb.clone());
                    let _ = std::thread::Builder::new()
                        .name("wait-fallback".into())
                        .spawn(move || {
                            if let Ok(r) = sb.agent().wait_process(&p.container_id, &p.exec_id) {
                                p.on_exit(
                                    r.exit_status,
                                    ts_from_ns(r.exited_at_unix_ns),
                                    &r.termination_message,
                                    &events,
                                );
                            }
                        });
                }
            }
        }
    }
}
