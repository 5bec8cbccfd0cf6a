//! The agent's container runtime on this host, without a VM: the real
//! `thaw-agent` binary, driven over Unix sockets exactly as the shim drives
//! it over vsock, running busybox containers as root in a scratch directory.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use thaw_agent_protocol::agent::*;
use thaw_agent_protocol::ttrpc;

fn rpc_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("{other:?}"),
    }
}

fn rpc_code(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => ttrpc::Code::UNKNOWN,
    }
}

#[test]
fn env_cwd_hostname_and_exit_code() {
    let h = Harness::start("env", true);
    let mut s = spec(&[
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd; hostname; echo oops >&2; exit 3",
    ]);
    s["process"]["env"] = json!(["PATH=/bin", "GREETING=hello from thaw"]);
    s["process"]["cwd"] = json!("/tmp");
    let r = h.run("env", &s, None);
    assert_eq!(r.out(), "hello from thaw\n/tmp\nthaw-test\n");
    assert_eq!(r.err(), "oops\n");
    assert_eq!(r.status, 3);
    let exits: Vec<_> = h
        .events(0, 1000)
        .into_iter()
        .filter(|e| e.has_exit())
        .map(|e| e.exit().clone())
        .collect();
    assert!(
        exits
            .iter()
            .any(|e| e.container_id == "env" && e.exec_id.is_empty() && e.exit_status == 3),
        "exit event missing: {exits:?}"
    );
    assert!(h.leftover_container_dirs().is_empty());
}

#[test]
fn user_groups_capabilities_and_limits() {
    let h = Harness::start("user", true);
    let script = "id -u; id -g; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
                  ulimit -n; echo $HOME; touch /probe 2>&1 || echo readonly-root; \
                  grep -E ' /proc/(keys|acpi) ' /proc/self/mountinfo | sed -e 's/^[^ ]* [^ ]* [^ ]* [^ ]* \\([^ ]*\\) .* - \\([^ ]*\\) .*/masked \\1 \\2/'; echo x > /proc/sys/kernel/domainname 2>&1 || echo readonly-proc";
    let mut s = spec(&["sh", "-c", script]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5, 20]});
    s["process"]["env"] = json!(["PATH=/bin", "HOME=/home/user"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 77, "soft": 77}]);
    s["process"]["capabilities"] =
        json!({"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": [], "permitted": []});
    s["root"]["readonly"] = json!(true);
    let r = h.run("user", &s, None);
    let out = r.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert_eq!(lines[1], "1000", "{out}");
    assert_eq!(lines[2], "1000 5 20", "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    // CAP_CHOWN (bit 0) and CAP_KILL (bit 5) only.
    assert!(out.contains("CapBnd:\t0000000000000021"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(lines.contains(&"77"), "{out}");
    assert!(lines.contains(&"/home/user"), "{out}");
    assert!(out.contains("readonly-root"), "{out}");
    // Masked paths: a file gets /dev/null bound over it, a directory an
    // empty read-only tmpfs.
    assert!(
        lines.iter().any(|l| l.starts_with("masked /proc/keys ")),
        "{out}"
    );
    assert!(lines.contains(&"masked /proc/acpi tmpfs"), "{out}");
    assert!(out.contains("readonly-proc"), "{out}");
    assert_eq!(r.status, 0, "stderr: {}", r.err());
}

#[test]
fn signals_reach_the_process_and_set_the_exit_status() {
    let h = Harness::start("signals", true);
    // A handler: SIGTERM makes it exit 7.
    let s = spec(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
    ]);
    let io = h.stdio(false, true, false);
    h.create("trap", &s, &io).unwrap();
    let (_, out, _) = io.accept_raw();
    let mut out = out.unwrap();
    h.start_proc("trap", "").unwrap();
    let first = read_until(&mut out, "ready\n", Duration::from_secs(10));
    assert_eq!(first, "ready\n");
    h.signal("trap", "", libc::SIGTERM, false).unwrap();
    assert_eq!(h.wait("trap", ""), 7);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    h.remove("trap");

    // No handler: SIGKILL, reported as 128 + 9.
    let io = h.stdio(false, false, false);
    h.create("kill", &spec(&["sleep", "1000"]), &io).unwrap();
    h.start_proc("kill", "").unwrap();
    h.signal("kill", "", libc::SIGKILL, false).unwrap();
    assert_eq!(h.wait("kill", ""), 137);
    // Signalling an exited process is "not found", as containerd expects.
    let e = h.signal("kill", "", libc::SIGTERM, false).unwrap_err();
    assert_eq!(rpc_code(&e), ttrpc::Code::NOT_FOUND, "{}", rpc_message(&e));
    h.remove("kill");
}

#[test]
fn stdin_eof_by_half_close_and_by_close_stdin() {
    let h = Harness::start("stdin", true);
    let input: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let r = h.run("cat", &spec(&["cat"]), Some(&input));
    assert_eq!(r.status, 0);
    assert_eq!(r.stdout.len(), input.len());
    assert!(r.stdout == input, "stdin did not come back intact");

    // CloseStdin: the process sees EOF although the stream stays open.
    let io = h.stdio(true, true, false);
    h.create("wc", &spec(&["wc", "-c"]), &io).unwrap();
    let mut streams = io.accept();
    h.start_proc("wc", "").unwrap();
    let mut stdin = streams.stdin.take().unwrap();
    stdin.write_all(b"12345").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut req = CloseStdinRequest::new();
    req.container_id = "wc".into();
    h.client.close_stdin(ctx(10), &req).unwrap();
    assert_eq!(h.wait("wc", ""), 0);
    let (out, _) = streams.collect();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "5");
    drop(stdin);
    h.remove("wc");
}

#[test]
fn tty_is_allocated_inside_the_container() {
    let h = Harness::start("tty", true);
    let mut s = spec(&["sh", "-c", "tty; stty size; read line; echo \"got:$line\""]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 30, "width": 100});
    let io = h.stdio(true, true, false);
    h.create("tty", &s, &io).unwrap();
    let mut streams = io.accept();
    h.start_proc("tty", "").unwrap();
    let mut stdin = streams.stdin.take().unwrap();
    stdin.write_all(b"typed\n").unwrap();
    assert_eq!(h.wait("tty", ""), 0);
    let (out, _) = streams.collect();
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert!(out.contains("/dev/pts/0\n"), "{out:?}");
    assert!(out.contains("30 100\n"), "{out:?}");
    assert!(out.contains("got:typed\n"), "{out:?}");
    h.remove("tty");

    // Resize before start changes what the program sees.
    let mut s = spec(&["stty", "size"]);
    s["process"]["terminal"] = json!(true);
    let io = h.stdio(false, true, false);
    h.create("resize", &s, &io).unwrap();
    let streams = io.accept();
    let mut req = ResizeTtyRequest::new();
    req.container_id = "resize".into();
    req.width = 132;
    req.height = 43;
    h.client.resize_tty(ctx(10), &req).unwrap();
    h.start_proc("resize", "").unwrap();
    assert_eq!(h.wait("resize", ""), 0);
    let (out, _) = streams.collect();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "43 132");
    h.remove("resize");
}

#[test]
fn exec_joins_the_running_container() {
    let h = Harness::start("exec", true);
    let io = h.stdio(false, false, false);
    let s = spec(&["sh", "-c", "echo inside > /tmp/marker; exec sleep 1000"]);
    h.create("box", &s, &io).unwrap();
    let init_pid = h.start_proc("box", "").unwrap();

    let run_exec = |exec_id: &str, args: &[&str]| -> (u32, String) {
        let io = h.stdio(false, true, true);
        h.exec("box", exec_id, &process(args), &io)
            .unwrap_or_else(|e| panic!("exec: {}", rpc_message(&e)));
        let streams = io.accept();
        h.start_proc("box", exec_id).unwrap();
        let status = h.wait("box", exec_id);
        let (out, err) = streams.collect();
        let mut del = DeleteProcessRequest::new();
        del.container_id = "box".into();
        del.exec_id = exec_id.into();
        h.client.delete_process(ctx(10), &del).unwrap();
        (
            status,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ),
        )
    };
    // Wait for the marker file the init writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while Instant::now() < deadline {
        let (_, out) = run_exec("probe", &["cat", "/tmp/marker"]);
        seen = out;
        if seen == "inside\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen, "inside\n",
        "exec does not see the container's filesystem"
    );
    let (status, out) = run_exec(
        "ns",
        &[
            "sh",
            "-c",
            "hostname; readlink /proc/1/ns/pid; readlink /proc/self/ns/pid; exit 5",
        ],
    );
    assert_eq!(status, 5);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "thaw-test");
    assert_eq!(
        lines[1], lines[2],
        "exec is not in the container's pid namespace: {out}"
    );

    // ListPids sees the init; an exec in flight shows with its id.
    let io = h.stdio(false, false, false);
    let exec_pid = h
        .exec("box", "sleeper", &process(&["sleep", "1000"]), &io)
        .unwrap();
    h.start_proc("box", "sleeper").unwrap();
    if h.cgroup().is_some() {
        let mut req = ContainerRequest::new();
        req.container_id = "box".into();
        let pids = h.client.list_pids(ctx(10), &req).unwrap().processes;
        assert!(pids.iter().any(|p| p.pid == init_pid), "{pids:?}");
        assert!(
            pids.iter()
                .any(|p| p.pid == exec_pid && p.exec_id == "sleeper"),
            "{pids:?}"
        );
    }
    // Killing everything ends both.
    h.signal("box", "", libc::SIGKILL, true).unwrap();
    assert_eq!(h.wait("box", "sleeper"), 137);
    assert_eq!(h.wait("box", ""), 137);
    h.remove("box");
}

#[test]
fn ten_megabytes_of_output_arrive_intact() {
    let h = Harness::start("bigout", true);
    let data: Vec<u8> = {
        // Deterministic, non-repeating bytes (xorshift).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..10 * 1024 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    std::fs::write(h.rootfs.join("data.bin"), &data).unwrap();
    // Both streams at once, then exit at once: the exit must wait for both.
    let s = spec(&["sh", "-c", "cat /data.bin; cat /data.bin >&2; exit 9"]);
    let io = h.stdio(false, true, true);
    h.create("big", &s, &io).unwrap();
    let streams = io.accept();
    let started = Instant::now();
    h.start_proc("big", "").unwrap();
    assert_eq!(h.wait("big", ""), 9);
    let (out, err) = streams.collect();
    println!("20 MiB through the agent in {:?}", started.elapsed());
    assert_eq!(out.len(), data.len());
    assert!(out == data, "stdout corrupted");
    assert_eq!(err.len(), data.len());
    assert!(err == data, "stderr corrupted");
    h.remove("big");
}

#[test]
fn bad_specs_get_precise_errors_and_the_agent_keeps_serving() {
    let h = Harness::start("badspec", true);
    let io = || h.stdio(false, false, false);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            {
                let mut s = spec(&["true"]);
                s["process"]["user"]["uid"] = json!("root");
                s
            },
            "process.user.uid",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["process"]["cwd"] = json!("relative/dir");
                s
            },
            "process.cwd",
        ),
        (
            {
                let mut s = spec(&["no-such-program"]);
                s["process"]["env"] = json!(["PATH=/bin"]);
                s
            },
            "process.args[0]",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["process"]["cwd"] = json!("/does/not/exist");
                s
            },
            "process.cwd",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["mounts"].as_array_mut().unwrap().push(json!({"destination": "/data", "type": "bind", "source": "/host/only/path", "options": ["rbind"]}));
                s
            },
            "mounts[7].source",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["mounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"destination": "/weird", "type": "nosuchfs", "source": "x"}));
                s
            },
            "mounts[7]",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "user"}));
                s
            },
            "linux.namespaces[5]",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["process"]["capabilities"]["bounding"] = json!(["CAP_FLY"]);
                s
            },
            "process.capabilities.bounding[0]",
        ),
        (
            {
                let mut s = spec(&["true"]);
                s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]});
                s
            },
            "linux.seccomp.syscalls[0].action",
        ),
    ];
    for (i, (s, field)) in cases.iter().enumerate() {
        let e = h.create(&format!("bad{i}"), s, &io()).expect_err(field);
        let msg = rpc_message(&e);
        assert_eq!(rpc_code(&e), ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains(&format!("spec field {field}:")),
            "case {i}: want field {field}, got {msg}"
        );
    }
    // Nothing left behind by the failures, and the agent still works.
    assert_eq!(h.leftover_container_dirs(), Vec::<String>::new());
    let r = h.run("good", &spec(&["echo", "still serving"]), None);
    assert_eq!((r.status, r.out().as_str()), (0, "still serving\n"));
}

#[test]
fn seccomp_profile_from_the_spec_is_enforced() {
    let h = Harness::start("seccomp", true);
    let mut s = spec(&[
        "sh",
        "-c",
        "mkdir /tmp/a && echo made; mkdir /tmp/b; echo rc=$?",
    ]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
             "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_NE"}]}
        ]
    });
    // busybox mkdir passes mode 0777 (non-zero): denied with EACCES.
    let r = h.run("sc", &s, None);
    assert!(!r.out().contains("made"), "{}", r.out());
    assert!(r.err().contains("Permission denied"), "stderr: {}", r.err());
    assert!(r.out().contains("rc=1"), "{}", r.out());
}

#[test]
fn sandbox_containers_share_uts_ipc_and_etc_files() {
    let h = Harness::start("sandbox", true);
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod1".into();
    req.hostname = "pod-host".into();
    req.hosts = "127.0.0.1 localhost\n10.1.2.3 pod-host\n".into();
    req.resolv_conf = "nameserver 10.0.0.10\n".into();
    h.client.create_sandbox(ctx(10), &req).unwrap();

    let mut outputs = Vec::new();
    for id in ["app1", "app2"] {
        let mut s = spec(&[
            "sh",
            "-c",
            "hostname; readlink /proc/self/ns/ipc; cat /etc/hosts /etc/resolv.conf",
        ]);
        s.as_object_mut().unwrap().remove("hostname");
        // CRI-style: paths to the pause container's namespaces on the host.
        s["linux"]["namespaces"] = json!([
            {"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/var/run/netns/cni-x"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"}, {"type": "uts", "path": "/proc/4242/ns/uts"}
        ]);
        let io = h.stdio(false, true, true);
        h.create_in(id, "pod1", &s, &io)
            .unwrap_or_else(|e| panic!("{}", rpc_message(&e)));
        let streams = io.accept();
        h.start_proc(id, "").unwrap();
        assert_eq!(h.wait(id, ""), 0);
        let (out, err) = streams.collect();
        assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
        outputs.push(String::from_utf8(out).unwrap());
    }
    assert_eq!(
        outputs[0], outputs[1],
        "containers of one pod see different namespaces"
    );
    assert!(outputs[0].starts_with("pod-host\n"), "{}", outputs[0]);
    assert!(outputs[0].contains("10.1.2.3 pod-host"), "{}", outputs[0]);
    assert!(
        outputs[0].contains("nameserver 10.0.0.10"),
        "{}",
        outputs[0]
    );

    // A sandbox with containers cannot go away.
    let mut del = DestroySandboxRequest::new();
    del.sandbox_id = "pod1".into();
    assert!(h.client.destroy_sandbox(ctx(10), &del).is_err());
    h.remove("app1");
    h.remove("app2");
    h.client.destroy_sandbox(ctx(10), &del).unwrap();
}

#[test]
fn pause_and_resume_freeze_the_container() {
    let h = Harness::start("pause", true);
    let Some(cg) = h.cgroup() else {
        skip("pause_and_resume_freeze_the_container: no cgroup v2 mount on this host");
        return;
    };
    let cg_dir = cg.containers().join("ticker");
    let s = spec(&[
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.02; done",
    ]);
    let io = h.stdio(false, true, false);
    h.create("ticker", &s, &io).unwrap();
    let (_, out, _) = io.accept_raw();
    let out = out.unwrap();
    // Timestamp every line as it arrives.
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(out).lines() {
            match line {
                Ok(l) => lines.push((Instant::now(), l)),
                Err(_) => break,
            }
        }
        lines
    });
    h.start_proc("ticker", "").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut req = ContainerRequest::new();
    req.container_id = "ticker".into();
    h.client.pause_container(ctx(10), &req).unwrap();
    let paused_at = Instant::now();
    assert_eq!(
        std::fs::read_to_string(cg_dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    let events = std::fs::read_to_string(cg_dir.join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    std::thread::sleep(Duration::from_millis(500));
    let resumed_at = Instant::now();
    h.client.resume_container(ctx(10), &req).unwrap();
    assert!(std::fs::read_to_string(cg_dir.join("cgroup.events"))
        .unwrap()
        .contains("frozen 0"));
    std::thread::sleep(Duration::from_millis(300));
    h.signal("ticker", "", libc::SIGKILL, false).unwrap();
    assert_eq!(h.wait("ticker", ""), 137);
    let lines = reader.join().unwrap();
    let n: Vec<u64> = lines.iter().filter_map(|(_, l)| l.parse().ok()).collect();
    // Counting went on before and after, never skipped a number...
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{n:?}");
    let before = lines.iter().filter(|(t, _)| *t < paused_at).count();
    let after = lines.iter().filter(|(t, _)| *t > resumed_at).count();
    // ...and stopped while frozen (100 ms allowed for lines in flight).
    let during = lines
        .iter()
        .filter(|(t, _)| *t > paused_at + Duration::from_millis(100) && *t < resumed_at)
        .count();
    assert!(before > 3 && after > 3, "before {before}, after {after}");
    assert_eq!(during, 0, "output while frozen");
    h.remove("ticker");
}

#[test]
fn cgroup_limits_are_applied_or_refused_precisely() {
    let h = Harness::start("limits", true);
    let Some(cg) = h.cgroup() else {
        skip("cgroup_limits_are_applied_or_refused_precisely: no cgroup v2 mount on this host");
        return;
    };
    let controllers = cg.controllers();
    let mut s = spec(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait; echo done",
    ]);
    s["linux"]["resources"] = json!({"pids": {"limit": 6}, "memory": {"limit": 67108864}, "cpu": {"quota": 50000, "period": 100000}});
    if !(controllers.iter().any(|c| c == "pids")
        && controllers.iter().any(|c| c == "memory")
        && controllers.iter().any(|c| c == "cpu"))
    {
        // Here the host's memory/cpu/pids controllers are bound to cgroup v1,
        // so cgroup v2 cannot enforce them: the agent must say so precisely.
        skip(&format!(
            "cgroup_limits_are_applied_or_refused_precisely: enforcement of memory/cpu/pids limits and the OOM event not tested: cgroup v2 here only offers {controllers:?} (memory, cpu, pids are bound to cgroup v1); checked the agent's precise refusal instead"
        ));
        let e = h
            .create("limited", &s, &h.stdio(false, false, false))
            .unwrap_err();
        let msg = rpc_message(&e);
        assert_eq!(rpc_code(&e), ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("spec field linux.resources."), "{msg}");
        assert!(msg.contains("controller is not enabled"), "{msg}");
        assert!(
            !cg.containers().join("limited").exists(),
            "cgroup left behind"
        );
        return;
    }
    let r = h.run("limited", &s, None);
    assert!(
        r.err().contains("can't fork") || r.err().contains("Resource temporarily unavailable"),
        "{}",
        r.err()
    );
    let cgdir = cg.containers();
    assert!(!cgdir.join("limited").exists());

    // OOM: the kill is reported as an event before the exit.
    let mut s = spec(&[
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    s["linux"]["resources"] = json!({"memory": {"limit": 33554432, "swap": 33554432}});
    let r = h.run("oom", &s, None);
    assert_eq!(r.status, 137, "{} {}", r.out(), r.err());
    let evs = h.events(0, 1000);
    assert!(
        evs.iter()
            .any(|e| e.has_oom() && e.oom().container_id == "oom"),
        "{evs:?}"
    );
}

#[test]
fn control_connection_is_redialed_and_state_survives() {
    let mut h = Harness::start("redial", true);
    let io = h.stdio(false, false, false);
    h.create("long", &spec(&["sleep", "1000"]), &io).unwrap();
    h.start_proc("long", "").unwrap();
    // Drop the control connection, as a vsock reset after snapshot restore
    // or a shim restart would.
    let old = std::mem::replace(&mut h.client, {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        thaw_agent_protocol::transport::sync_client(a).unwrap()
    });
    drop(old);
    h.reaccept();
    let health = h.client.health(ctx(10), &HealthRequest::new()).unwrap();
    assert_eq!(
        health.protocol_version,
        thaw_agent_protocol::PROTOCOL_VERSION
    );
    assert!(!health.pid1);
    assert!(health.uptime_ns > 0);
    // The container started before is still there.
    h.signal("long", "", libc::SIGKILL, false).unwrap();
    assert_eq!(h.wait("long", ""), 137);
    h.remove("long");
}

#[test]
fn guest_settings_calls() {
    let h = Harness::start("settings", false);
    let mut t = SetTimeRequest::new();
    t.unix_time_ns = 1_700_000_000_000_000_000;
    // Not PID 1: the agent refuses to touch this host's clock.
    let e = h.client.set_time(ctx(10), &t).unwrap_err();
    assert_eq!(
        rpc_code(&e),
        ttrpc::Code::FAILED_PRECONDITION,
        "{}",
        rpc_message(&e)
    );
    let mut ent = AddEntropyRequest::new();
    // Real random bytes: this reaches the host's own RNG.
    ent.data = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut ent.data)
        .unwrap();
    h.client.add_entropy(ctx(10), &ent).unwrap();
    ent.data = vec![0u8; 5000];
    assert_eq!(
        rpc_code(&h.client.add_entropy(ctx(10), &ent).unwrap_err()),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // Without cgroups, stats and pause say why they cannot work.
    let io = h.stdio(false, false, false);
    h.create("nocg", &spec(&["sleep", "1000"]), &io).unwrap();
    let mut req = ContainerRequest::new();
    req.container_id = "nocg".into();
    let e = h.client.stats(ctx(10), &req).unwrap_err();
    assert_eq!(
        rpc_code(&e),
        ttrpc::Code::FAILED_PRECONDITION,
        "{}",
        rpc_message(&e)
    );
    h.remove("nocg");
}

/// The exit is published only after every byte of output and the stream's
/// EOF have been handed to the host: read nothing until WaitProcess returns,
/// then a non-blocking read must find all of it, ending in EOF, never
/// "would block". A background child holding stdout open must not delay the
/// exit (the container has no pid namespace, so it survives its parent).
#[test]
fn exit_is_reported_after_output_is_drained() {
    let h = Harness::start("drain", true);
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(h.rootfs.join("data.bin"), &data).unwrap();
    let mut s = spec(&["sh", "-c", "cat /data.bin; sleep 30 & exit 4"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
    let io = h.stdio(false, true, false);
    h.create("drain", &s, &io).unwrap();
    let (_, out, _) = io.accept_raw();
    let mut out = out.unwrap();
    let t0 = Instant::now();
    h.start_proc("drain", "").unwrap();
    assert_eq!(h.wait("drain", ""), 4);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "exit held back by the background writer"
    );
    out.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "after the exit, stdout still {e} with {} of {} bytes",
                got.len(),
                data.len()
            ),
        }
    }
    assert!(
        got == data,
        "output differs ({} bytes vs {})",
        got.len(),
        data.len()
    );
    h.remove("drain");
}

#[test]
fn exec_with_a_terminal() {
    let h = Harness::start("exectty", true);
    let io = h.stdio(false, false, false);
    h.create("box", &spec(&["sleep", "1000"]), &io).unwrap();
    h.start_proc("box", "").unwrap();
    let mut p = process(&["sh", "-c", "tty; stty size"]);
    p["terminal"] = json!(true);
    p["consoleSize"] = json!({"height": 10, "width": 20});
    let io = h.stdio(false, true, false);
    h.exec("box", "t", &p, &io)
        .unwrap_or_else(|e| panic!("{}", rpc_message(&e)));
    let streams = io.accept();
    h.start_proc("box", "t").unwrap();
    assert_eq!(h.wait("box", "t"), 0);
    let (out, _) = streams.collect();
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("10 20\n"), "{out:?}");
    h.remove("box");
}

/// The guest's real rootfs path: an erofs image on a block device (a loop
/// device here, virtio-blk in the VM), mounted read-only under an overlay
/// whose upper layer is tmpfs, through the MountRootfs call.
#[test]
fn erofs_block_device_rootfs_under_overlay() {
    let h = Harness::start("erofs", true);
    let image = h.dir.join("rootfs.erofs");
    let st = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&h.rootfs)
        .status()
        .expect("mkfs.erofs");
    assert!(st.success());
    let loopdev = LoopDevice::attach(&image);
    let mut req = MountRootfsRequest::new();
    req.container_id = "ero".into();
    let mut r = Rootfs::new();
    r.source = loopdev.path.clone();
    r.fstype = "erofs".into();
    // The agent reads the loop device's size from sysfs before mounting.
    let len = std::fs::metadata(&image).unwrap().len();
    r.size_bytes = len - len % 512;
    req.rootfs = protobuf::MessageField::some(r);
    let merged = h
        .client
        .mount_rootfs(ctx(30), &req)
        .unwrap_or_else(|e| panic!("{}", rpc_message(&e)))
        .path;
    assert!(merged.ends_with("/rootfs"), "{merged}");

    // No rootfs in the create request: the mounted one is used.
    let s = spec(&["sh", "-c", "echo written > /new-file && cat /new-file; grep ' / / ' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1"]);
    let io = h.stdio(false, true, true);
    let mut creq = CreateContainerRequest::new();
    creq.container_id = "ero".into();
    creq.spec_json = serde_json::to_vec(&s).unwrap();
    creq.stdio = protobuf::MessageField::some(io.proto.clone());
    h.client
        .create_container(ctx(60), &creq)
        .unwrap_or_else(|e| panic!("{}", rpc_message(&e)));
    let streams = io.accept();
    h.start_proc("ero", "").unwrap();
    assert_eq!(h.wait("ero", ""), 0);
    let (out, err) = streams.collect();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "written\noverlay\n",
        "stderr: {}",
        String::from_utf8_lossy(&err)
    );
    h.remove("ero");
}

/// A mounted rootfs has one owner at a time and is unmounted once: by a
/// create that fails after taking it over from MountRootfs, and by
/// RemoveContainer. A second unmount of the same mounts would fail and be
/// logged ("unmounting ...").
#[test]
fn mounted_rootfs_is_unmounted_once_by_a_failed_create_and_by_remove() {
    let h = Harness::start("rootfs-owner", true);
    let container_dir = h.dir.join("run/c/own");
    let rootfs = || {
        let mut r = Rootfs::new();
        r.source = h.rootfs.to_string_lossy().into();
        r
    };
    let mount_rootfs = || {
        let mut req = MountRootfsRequest::new();
        req.container_id = "own".into();
        req.rootfs = protobuf::MessageField::some(rootfs());
        h.client
            .mount_rootfs(ctx(30), &req)
            .unwrap_or_else(|e| panic!("{}", rpc_message(&e)));
    };
    let create = |with_rootfs: bool, io: &PendingIo| {
        let mut req = CreateContainerRequest::new();
        req.container_id = "own".into();
        req.spec_json = serde_json::to_vec(&spec(&["echo", "on the premounted rootfs"])).unwrap();
        if with_rootfs {
            req.rootfs = protobuf::MessageField::some(rootfs());
        }
        req.stdio = protobuf::MessageField::some(io.proto.clone());
        h.client.create_container(ctx(60), &req)
    };

    // A create that names a rootfs although one was mounted fails after
    // taking the mounted one over: it unmounts it and frees the id.
    mount_rootfs();
    assert!(!h.env.agent_mounts_below(&container_dir).is_empty());
    let e = create(true, &h.stdio(false, false, false)).expect_err("two rootfs");
    assert_eq!(
        rpc_code(&e),
        ttrpc::Code::INVALID_ARGUMENT,
        "{}",
        rpc_message(&e)
    );
    assert!(rpc_message(&e).contains("already mounted by MountRootfs"));
    assert_eq!(
        h.env.agent_mounts_below(&container_dir),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(h.leftover_container_dirs(), Vec::<String>::new());

    // The id is free again; this time the container takes the rootfs over
    // and RemoveContainer unmounts it.
    mount_rootfs();
    let io = h.stdio(false, true, false);
    create(false, &io).unwrap_or_else(|e| panic!("{}", rpc_message(&e)));
    let streams = io.accept();
    h.start_proc("own", "").unwrap();
    assert_eq!(h.wait("own", ""), 0);
    let (out, _) = streams.collect();
    assert_eq!(String::from_utf8_lossy(&out), "on the premounted rootfs\n");
    h.remove("own");
    assert_eq!(
        h.env.agent_mounts_below(&container_dir),
        Vec::<std::path::PathBuf>::new()
    );
    let log = h.log();
    assert!(
        !log.contains("unmounting"),
        "a mount was unmounted twice:\n{log}"
    );
}

/// A read-only loop device, detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(image: &std::path::Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            path: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

/// Create + start + exit of `true` through the agent on this host (no VM):
/// the agent's own share of a container start.
#[test]
fn measure_create_start_exit_of_true() {
    let h = Harness::start("measure", true);
    let mut times = Vec::new();
    for i in 0..10 {
        let id = format!("t{i}");
        let io = h.stdio(false, true, true);
        let t0 = Instant::now();
        h.create(&id, &spec(&["true"]), &io).unwrap();
        let streams = io.accept();
        h.start_proc(&id, "").unwrap();
        let status = h.wait(&id, "");
        let (out, err) = streams.collect();
        times.push(t0.elapsed());
        assert_eq!((status, out.len(), err.len()), (0, 0, 0));
        h.remove(&id);
    }
    times.sort();
    report(&format!(
        "MEASURED {}: agent spawn to control connection {:?}; create+start+exit of `true` (cgroup {}): median {:?}, min {:?}, max {:?}",
        agent_bin(),
        h.ready_after,
        if h.cgroup().is_some() { "on" } else { "off" },
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    ));
}

#[test]
fn sysctl_is_applied_inside_the_container() {
    let h = Harness::start("sysctl", true);
    let mut s = spec(&["sh", "-c", "cat /proc/sys/kernel/domainname; echo x > /proc/sys/kernel/domainname || echo still-readonly"]);
    // kernel.domainname belongs to the container's own UTS namespace.
    s["linux"]["sysctl"] = json!({"kernel.domainname": "thaw.example"});
    let r = h.run("sysctl", &s, None);
    assert_eq!(
        r.out(),
        "thaw.example\nstill-readonly\n",
        "stderr: {}",
        r.err()
    );
    // The host's own value is untouched.
    assert_ne!(
        std::fs::read_to_string("/proc/sys/kernel/domainname")
            .unwrap()
            .trim(),
        "thaw.example"
    );
}

#[test]
fn stats_report_the_containers_cpu_time() {
    let h = Harness::start("stats", true);
    if h.cgroup().is_none() {
        skip("stats_report_the_containers_cpu_time: no cgroup v2 mount on this host");
        return;
    }
    let s = spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo busy-done; exec sleep 1000",
    ]);
    let io = h.stdio(false, true, false);
    h.create("busy", &s, &io).unwrap();
    let (_, out, _) = io.accept_raw();
    let mut out = out.unwrap();
    h.start_proc("busy", "").unwrap();
    assert_eq!(
        read_until(&mut out, "busy-done\n", Duration::from_secs(60)),
        "busy-done\n"
    );
    let mut req = ContainerRequest::new();
    req.container_id = "busy".into();
    let stats = h.client.stats(ctx(10), &req).unwrap();
    // cpu.stat is part of cgroup v2's core, so it is there even without the
    // cpu controller; memory/pids figures need their controllers.
    let cpu = stats.cpu.as_ref().unwrap();
    assert!(cpu.usage_usec > 10_000, "{cpu:?}");
    assert!(cpu.user_usec > 0, "{cpu:?}");
    h.signal("busy", "", libc::SIGKILL, true).unwrap();
    assert_eq!(h.wait("busy", ""), 137);
    h.remove("busy");
}
