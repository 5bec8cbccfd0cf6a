//! A container's stats from the agent as containerd's cgroup v2 Metrics,
//! the type runc's shim reports on a cgroup v2 host.

use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::MessageField;
use thaw_agent_protocol::agent as proto;

pub fn metrics_from(s: &proto::StatsResponse) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(v2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(v2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            swap_usage: mem.swap_usage_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(v2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(v2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::to_any;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn metrics_are_cgroup_v2_metrics() {
        let mut s = proto::StatsResponse::new();
        let mut m = proto::MemoryStats::new();
        m.usage_bytes = 1234;
        m.oom_kill_events = 2;
        s.memory = MessageField::some(m);
        let any = to_any(&metrics_from(&s)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let back = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.memory.usage, 1234);
        assert_eq!(back.memory_events.oom_kill, 2);
    }
}
