//! The CRI conformance suite (issue 11): a private containerd with its CRI
//! plugin enabled exactly as a Kubernetes node runs it (the runtimes from
//! `shim/README.md`'s snippet), driven over CRI v1 the way kubelet drives
//! it, against the runtime handlers `runc` and `thaw` in the same run.
//!
//! Every check runs against both handlers and creates its own pods, so one
//! failure does not hide another; where a check's later steps need an
//! earlier one, the table says "skip: depends on ...". The suite prints a
//! table (check | runc | thaw), the pass count per handler, every failure's
//! exact error, and RunPodSandbox -> first container running p50/p99.
//!
//! It fails if any check fails for runc (then the harness is wrong) or for
//! thaw (then the shim has work to do: the printed errors are that list),
//! except for the checks `KNOWN_THAW_GAPS` names with the open issue that
//! owns each; those print as "FAIL (known)".
//!
//! Groups follow critest's (cri-tools `pkg/validate`): pod sandbox,
//! network, container lifecycle, exec and streaming, logs, stats,
//! resources, security context, CRI-written files.
//!
//! Environment: THAW_CRI_LATENCY_RUNS (default 5) pods per handler for the
//! latency figures; THAW_TEST_AGENT_TIMEOUT (seconds, default 600) bounds
//! the slow CRI calls (pod and container start) as it bounds the shim's;
//! THAW_CRI_CHECK_SECS (default 600) bounds one check, all its calls
//! together, so that a hung call fails its check and the suite goes on;
//! THAW_CRI_ONLY=<text>[|<text>...] runs only the checks whose name
//! contains one of them.

// Test code: a failed setup step panics with its message. (The workspace
// denies unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_cri::api::{self, ContainerState, NamespaceMode, PodSandboxState, RunPodSandboxRequest};
use thaw_cri::{Cri, Stream};
use thaw_tests::containerd::tail;
use thaw_tests::cri::{CriSetup, CRI_NAMESPACE, POD_SUBNET_PREFIX};
use thaw_tests::image::{build_image_tar, build_pause_image_tar, BUSYBOX_REF};
use thaw_tests::{Backend, PrivateContainerd};

/// The runtime handlers, as a RuntimeClass names them.
const HANDLERS: [&str; 2] = ["runc", "thaw"];
/// Deadline of the quick CRI calls (status, list, exec ...).
const QUICK: Duration = Duration::from_secs(120);
/// The Kubernetes namespace of the suite's pods.
const POD_NS: &str = "thaw-cri";

fn slow_timeout() -> Duration {
    let secs = std::env::var("THAW_TEST_AGENT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// How long one check may take, all its calls together
/// (THAW_CRI_CHECK_SECS, default 600: a first thaw pod may build the VM
/// template, a cold boot).
fn check_budget() -> Duration {
    let secs = std::env::var("THAW_CRI_CHECK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

type Res<T = ()> = Result<T, String>;

/// Prints past libtest's output capture (which catches only the print
/// macros), so progress and the table show in scripts/test.sh's logs
/// whether the test passes or fails.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

fn st(what: &str, s: tonic::Status) -> String {
    format!("{what}: {:?}: {}", s.code(), s.message())
}

/// Checks that fail for thaw for a reason an open issue owns. Such a check
/// still runs and its error still prints, marked "known"; the suite does
/// not fail for it, but does fail when it passes (then the entry is stale
/// and must go).
const KNOWN_THAW_GAPS: &[(&str, &str)] = &[];

fn known_gap(name: &str) -> Option<&'static str> {
    KNOWN_THAW_GAPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

/// One cell of the table.
#[derive(Debug, Clone)]
enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
    /// A failure [`KNOWN_THAW_GAPS`] lists: reported, not counted.
    Known(String, &'static str),
    /// Left out by THAW_CRI_ONLY.
    NotRun,
}

impl Outcome {
    fn from(r: Res) -> Outcome {
        match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        }
    }

    fn cell(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "skip",
            Outcome::Known(..) => "FAIL (known)",
            Outcome::NotRun => "-",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Outcome::Pass | Outcome::NotRun => None,
            Outcome::Fail(e) | Outcome::Skip(e) => Some(e.clone()),
            Outcome::Known(e, why) => Some(format!("{e} ({why})")),
        }
    }
}

/// What a check runs against: one handler of the shared containerd.
struct Ctx<'a> {
    c: &'a PrivateContainerd,
    setup: &'a CriSetup,
    /// The connection with the quick deadline, and with the slow one
    /// (pod and container start): use [`Ctx::quick`] and [`Ctx::slow`],
    /// which also keep within the check's own deadline.
    base_quick: Cri,
    base_slow: Cri,
    /// When the running check must be over: a hung call fails the check
    /// (with the call named in the error), not the whole suite.
    deadline: std::cell::Cell<Instant>,
    handler: &'static str,
    seq: std::cell::Cell<u32>,
}

#[derive(Default, Clone)]
struct PodOpts {
    /// A network namespace of the pod's own (CNI) instead of the node's.
    own_netns: bool,
    /// The node's PID namespace (hostPID).
    host_pid: bool,
    hostname: String,
    dns: Option<api::DnsConfig>,
    /// The sum of the containers' memory limits, as kubelet reports it in
    /// the sandbox config (0: none).
    memory_limit: i64,
    /// The pod's sysctls (securityContext.sysctls).
    sysctls: Vec<(String, String)>,
}

/// A pod; stopped and removed when dropped, as kubelet does when a pod is
/// deleted (errors there show up in the leak check).
struct Pod {
    id: String,
    config: api::PodSandboxConfig,
    log_dir: PathBuf,
    opts: PodOpts,
    cri: Cri,
}

impl Pod {
    /// The pod's uid, as kubelet names its cgroup.
    fn uid(&self) -> String {
        self.config
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.cri.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        });
        let _ = self.cri.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        });
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn namespaces(o: &PodOpts) -> api::NamespaceOption {
    api::NamespaceOption {
        network: if o.own_netns {
            NamespaceMode::Pod
        } else {
            NamespaceMode::Node
        } as i32,
        pid: if o.host_pid {
            NamespaceMode::Node
        } else {
            NamespaceMode::Container
        } as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl Ctx<'_> {
    /// Time left for the running check (at least a second, so that a call
    /// made after the deadline fails by itself rather than hangs).
    fn left(&self) -> Duration {
        self.deadline
            .get()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1))
    }

    fn quick(&self) -> Cri {
        self.base_quick.with_timeout(QUICK.min(self.left()))
    }

    fn slow(&self) -> Cri {
        self.base_slow.with_timeout(slow_timeout().min(self.left()))
    }

    fn next(&self) -> u32 {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        n
    }

    /// A pod config as kubelet builds one (metadata, labels, log directory,
    /// cgroup parent, namespaces).
    fn pod_config(&self, name: &str, opts: &PodOpts) -> (api::PodSandboxConfig, PathBuf) {
        let n = self.next();
        let name = format!("{name}-{}-{n}", self.handler);
        let uid = format!("{:016x}-{}", now_ns(), n);
        let log_dir = self.setup.log_root.join(format!("{POD_NS}_{name}_{uid}"));
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                POD_NS.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
            ("thaw-cri/handler".to_string(), self.handler.to_string()),
        ]);
        let cfg = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name,
                uid: uid.clone(),
                namespace: POD_NS.into(),
                attempt: 0,
            }),
            hostname: opts.hostname.clone(),
            log_directory: log_dir.display().to_string(),
            dns_config: opts.dns.clone(),
            labels,
            linux: Some(api::LinuxPodSandboxConfig {
                resources: (opts.memory_limit > 0).then(|| api::LinuxContainerResources {
                    memory_limit_in_bytes: opts.memory_limit,
                    ..Default::default()
                }),
                cgroup_parent: self.setup.pod_cgroup(&uid),
                sysctls: opts.sysctls.iter().cloned().collect(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(opts)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        (cfg, log_dir)
    }

    fn run_pod(&self, name: &str, opts: PodOpts) -> Res<Pod> {
        let (config, log_dir) = self.pod_config(name, &opts);
        fs::create_dir_all(&log_dir).map_err(|e| format!("log dir: {e}"))?;
        let id = self
            .slow()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.handler.into(),
            })
            .map_err(|e| st("RunPodSandbox", e))?
            .pod_sandbox_id;
        self.c.remember_id_in(CRI_NAMESPACE, &id);
        Ok(Pod {
            id,
            config,
            log_dir,
            opts,
            cri: self.base_quick.clone(),
        })
    }

    /// A container config as kubelet builds one: the pod's namespaces, the
    /// log path `<name>/0.log` under the pod's log directory, the leak
    /// marker in the environment.
    fn container_config(&self, pod: &Pod, name: &str, cmd: &[&str]) -> api::ContainerConfig {
        let (k, v) = self
            .c
            .marker
            .split_once('=')
            .unwrap_or(("THAW_TEST_MARK", ""));
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: BUSYBOX_REF.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            envs: vec![api::KeyValue {
                key: k.into(),
                value: v.into(),
            }],
            log_path: format!("{name}/0.log"),
            linux: Some(api::LinuxContainerConfig {
                resources: None,
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces(&pod.opts)),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    fn create(&self, pod: &Pod, config: api::ContainerConfig) -> Res<String> {
        if let Some(m) = &config.metadata {
            fs::create_dir_all(pod.log_dir.join(&m.name)).map_err(|e| format!("log dir: {e}"))?;
        }
        let id = self
            .slow()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .map_err(|e| st("CreateContainer", e))?
            .container_id;
        self.c.remember_id_in(CRI_NAMESPACE, &id);
        Ok(id)
    }

    fn start(&self, id: &str) -> Res {
        self.slow()
            .start_container(api::StartContainerRequest {
                container_id: id.into(),
            })
            .map_err(|e| st("StartContainer", e))?;
        Ok(())
    }

    /// Creates and starts a container running `cmd`, after `edit` has
    /// changed its config.
    fn run(
        &self,
        pod: &Pod,
        name: &str,
        cmd: &[&str],
        edit: impl FnOnce(&mut api::ContainerConfig),
    ) -> Res<String> {
        let mut cfg = self.container_config(pod, name, cmd);
        edit(&mut cfg);
        let id = self.create(pod, cfg)?;
        self.start(&id)?;
        Ok(id)
    }

    fn sleeper(&self, pod: &Pod, name: &str) -> Res<String> {
        self.run(pod, name, &["sleep", "100000"], |_| {})
    }

    fn status(&self, id: &str) -> Res<api::ContainerStatus> {
        self.quick()
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .map_err(|e| st("ContainerStatus", e))?
            .status
            .ok_or_else(|| "ContainerStatus: no status".to_string())
    }

    /// The pod's IP, checked to be from the CNI subnet.
    fn pod_ip(&self, pod: &Pod) -> Res<String> {
        let ip = self
            .pod_status(&pod.id)?
            .network
            .map(|n| n.ip)
            .unwrap_or_default();
        ensure(ip.starts_with(POD_SUBNET_PREFIX), || {
            format!("pod IP {ip:?} is not from the CNI subnet")
        })?;
        Ok(ip)
    }

    /// The path of the pod's network namespace (verbose PodSandboxStatus).
    fn pod_netns(&self, pod: &Pod) -> Res<String> {
        let info = self
            .quick()
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: true,
            })
            .map_err(|e| st("PodSandboxStatus", e))?
            .info;
        let json = info.get("info").cloned().unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| format!("verbose pod info: {e}"))?;
        v.pointer("/runtimeSpec/linux/namespaces")
            .and_then(|n| n.as_array())
            .and_then(|list| {
                list.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
            })
            .map(str::to_string)
            .ok_or_else(|| format!("no network namespace path in the pod's info: {json}"))
    }

    fn pod_status(&self, id: &str) -> Res<api::PodSandboxStatus> {
        self.quick()
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .map_err(|e| st("PodSandboxStatus", e))?
            .status
            .ok_or_else(|| "PodSandboxStatus: no status".to_string())
    }

    fn wait_exited(&self, id: &str) -> Res<api::ContainerStatus> {
        let deadline = Instant::now() + self.left();
        loop {
            let s = self.status(id)?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("container {id} did not exit; state {}", s.state));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// ExecSync: (stdout, stderr, exit code).
    fn exec(&self, id: &str, cmd: &[&str]) -> Res<(String, String, i32)> {
        let r = self
            .slow()
            .exec_sync(api::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 0,
            })
            .map_err(|e| st(&format!("ExecSync {cmd:?}"), e))?;
        Ok((
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.exit_code,
        ))
    }

    /// ExecSync of a shell script that must succeed; its stdout.
    fn sh(&self, id: &str, script: &str) -> Res<String> {
        let (out, err, code) = self.exec(id, &["sh", "-c", script])?;
        if code != 0 {
            return Err(format!(
                "`{script}` exited {code}: stdout {out:?} stderr {err:?}"
            ));
        }
        Ok(out)
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Res {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

// ---------------------------------------------------------------- checks

/// Pod sandbox: RunPodSandbox, PodSandboxStatus, ListPodSandbox,
/// StopPodSandbox, RemovePodSandbox, one pod through its whole life.
fn pod_lifecycle(x: &Ctx) -> Vec<Outcome> {
    let skip = |what: &str| Outcome::Skip(format!("depends on {what}"));
    let t0 = now_ns();
    let pod = match x.run_pod("lifecycle", PodOpts::default()) {
        Ok(p) => p,
        Err(e) => {
            return vec![
                Outcome::Fail(e),
                skip("RunPodSandbox"),
                skip("RunPodSandbox"),
                skip("RunPodSandbox"),
                skip("RunPodSandbox"),
            ]
        }
    };
    let status = Outcome::from((|| {
        let s = x.pod_status(&pod.id)?;
        ensure(s.state == PodSandboxState::SandboxReady as i32, || {
            format!("state {} after RunPodSandbox, want READY", s.state)
        })?;
        ensure(s.metadata == pod.config.metadata, || {
            format!("metadata {:?}", s.metadata)
        })?;
        ensure(s.runtime_handler == x.handler, || {
            format!("runtime_handler {:?}", s.runtime_handler)
        })?;
        ensure(
            s.created_at >= t0 - 1_000_000_000 && s.created_at <= now_ns(),
            || format!("created_at {} not between {t0} and now", s.created_at),
        )?;
        let net = s
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .map(|o| o.network);
        ensure(net == Some(NamespaceMode::Node as i32), || {
            format!("network namespace mode {net:?}, want NODE")
        })
    })());
    let listed = |filter: api::PodSandboxFilter| -> Res<Vec<api::PodSandbox>> {
        Ok(x.quick()
            .list_pod_sandbox(api::ListPodSandboxRequest {
                filter: Some(filter),
            })
            .map_err(|e| st("ListPodSandbox", e))?
            .items)
    };
    let list = Outcome::from((|| {
        let by_id = listed(api::PodSandboxFilter {
            id: pod.id.clone(),
            ..Default::default()
        })?;
        ensure(
            by_id.len() == 1 && by_id[0].state == PodSandboxState::SandboxReady as i32,
            || format!("by id: {by_id:?}"),
        )?;
        let by_label = listed(api::PodSandboxFilter {
            label_selector: HashMap::from([(
                "io.kubernetes.pod.uid".to_string(),
                pod.config
                    .metadata
                    .as_ref()
                    .map(|m| m.uid.clone())
                    .unwrap_or_default(),
            )]),
            ..Default::default()
        })?;
        ensure(by_label.iter().map(|p| &p.id).eq([&pod.id]), || {
            format!("by label: {by_label:?}")
        })?;
        let not_ready = listed(api::PodSandboxFilter {
            state: Some(api::PodSandboxStateValue {
                state: PodSandboxState::SandboxNotready as i32,
            }),
            ..Default::default()
        })?;
        ensure(!not_ready.iter().any(|p| p.id == pod.id), || {
            "a READY pod is listed as NOTREADY".into()
        })
    })());
    let stop = Outcome::from((|| {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        x.slow()
            .stop_pod_sandbox(req.clone())
            .map_err(|e| st("StopPodSandbox", e))?;
        let s = x.pod_status(&pod.id)?;
        ensure(s.state == PodSandboxState::SandboxNotready as i32, || {
            format!("state {} after StopPodSandbox, want NOTREADY", s.state)
        })?;
        // kubelet stops pods again after a restart: it must be idempotent.
        x.slow()
            .stop_pod_sandbox(req)
            .map_err(|e| st("second StopPodSandbox", e))?;
        Ok(())
    })());
    let remove = if matches!(stop, Outcome::Pass) {
        Outcome::from((|| {
            let req = api::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            };
            x.slow()
                .remove_pod_sandbox(req.clone())
                .map_err(|e| st("RemovePodSandbox", e))?;
            match x.quick().pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: false,
            }) {
                Err(e) if e.code() == tonic::Code::NotFound => {}
                other => return Err(format!("status after remove: {other:?}")),
            }
            let all = listed(api::PodSandboxFilter::default())?;
            ensure(!all.iter().any(|p| p.id == pod.id), || {
                "removed pod still listed".into()
            })?;
            x.slow()
                .remove_pod_sandbox(req)
                .map_err(|e| st("second RemovePodSandbox", e))?;
            Ok(())
        })())
    } else {
        skip("StopPodSandbox")
    };
    vec![Outcome::Pass, status, list, stop, remove]
}

/// A pod with a network namespace of its own: CRI runs CNI (a bridge
/// network) before the sandbox starts.
fn netns_pod(x: &Ctx) -> Vec<Outcome> {
    let opts = PodOpts {
        own_netns: true,
        hostname: "thaw-cri-netns".into(),
        ..Default::default()
    };
    let pod = match x.run_pod("netns", opts) {
        Ok(p) => p,
        Err(e) => {
            return vec![
                Outcome::Fail(e),
                Outcome::Skip("depends on RunPodSandbox with own netns".into()),
            ]
        }
    };
    let ip = match x.pod_ip(&pod) {
        Ok(ip) => ip,
        Err(e) => {
            return vec![
                Outcome::Fail(e),
                Outcome::Skip("depends on the pod IP".into()),
            ]
        }
    };
    let inside = Outcome::from((|| {
        let id = x.sleeper(&pod, "net")?;
        let addr = x.sh(&id, "ip -4 -o addr show eth0")?;
        ensure(addr.contains(&format!("inet {ip}/")), || {
            format!("the container's eth0 has {addr:?}, not the pod IP {ip}")
        })?;
        let host = x.sh(&id, "hostname")?;
        ensure(host.trim() == "thaw-cri-netns", || {
            format!("hostname {host:?}, want the pod's thaw-cri-netns")
        })
    })());
    vec![Outcome::Pass, inside]
}

/// The port the network checks' servers listen on in the pods.
const ECHO_PORT: u16 = 7000;

/// A pod on the CNI bridge with a server answering every TCP connection
/// on [`ECHO_PORT`] with `hello-from-<hostname>`.
fn echo_pod(x: &Ctx, name: &str) -> Res<(Pod, String, String)> {
    let opts = PodOpts {
        own_netns: true,
        hostname: format!("thaw-{name}"),
        ..Default::default()
    };
    let pod = x.run_pod(name, opts)?;
    let ip = x.pod_ip(&pod)?;
    let script = format!("while true; do echo hello-from-$(hostname) | nc -l -p {ECHO_PORT}; done");
    let id = x.run(&pod, "echo", &["sh", "-c", &script], |_| {})?;
    Ok((pod, ip, id))
}

/// Connects to `ip:port` from a container, retrying while the server is
/// not listening yet, and returns what the server said.
fn fetch_from(x: &Ctx, container: &str, ip: &str, port: u16) -> Res<String> {
    let script = format!(
        "for i in $(seq 50); do out=$(nc -w 3 {ip} {port} </dev/null) && [ -n \"$out\" ] && \
         {{ echo \"$out\"; exit 0; }}; sleep 0.2; done; exit 1"
    );
    x.sh(container, &script).map(|s| s.trim().to_string())
}

/// Two pods on one bridge reach each other over TCP, the host reaches a
/// pod's IP, and a pod reaches the host through its gateway.
fn pod_traffic(x: &Ctx) -> Vec<Outcome> {
    let pods = echo_pod(x, "net-a").and_then(|a| Ok((a, echo_pod(x, "net-b")?)));
    let ((_pod_a, ip_a, srv_a), (_pod_b, ip_b, srv_b)) = match pods {
        Ok(p) => p,
        Err(e) => {
            return vec![
                Outcome::Fail(e),
                Outcome::Skip("depends on two pods with servers".into()),
            ]
        }
    };
    let between = Outcome::from((|| {
        let got = fetch_from(x, &srv_b, &ip_a, ECHO_PORT)?;
        ensure(got == "hello-from-thaw-net-a", || {
            format!("pod b -> {ip_a}:{ECHO_PORT} read {got:?}")
        })?;
        let got = fetch_from(x, &srv_a, &ip_b, ECHO_PORT)?;
        ensure(got == "hello-from-thaw-net-b", || {
            format!("pod a -> {ip_b}:{ECHO_PORT} read {got:?}")
        })
    })());
    let host = Outcome::from((|| {
        let got = fetch_from_host(&ip_a, ECHO_PORT)?;
        ensure(got == "hello-from-thaw-net-a", || {
            format!("host -> {ip_a}:{ECHO_PORT} read {got:?}")
        })?;
        let gateway = format!("{POD_SUBNET_PREFIX}1");
        let listener = std::net::TcpListener::bind((gateway.as_str(), 0))
            .map_err(|e| format!("listening on the gateway {gateway}: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let server = std::thread::spawn(move || -> Result<(), String> {
            use std::io::Write;
            let (mut s, peer) = listener.accept().map_err(|e| e.to_string())?;
            s.write_all(b"hello-from-host\n")
                .map_err(|e| e.to_string())?;
            ensure(peer.ip().to_string() == ip_a, || {
                format!("the host saw the connection from {peer}, not {ip_a}")
            })
        });
        let got = fetch_from(x, &srv_a, &gateway, port)?;
        server
            .join()
            .map_err(|_| "the host's server panicked".to_string())??;
        ensure(got == "hello-from-host", || {
            format!("pod a -> host {gateway}:{port} read {got:?}")
        })
    })());
    vec![between, host]
}

/// What the server at `ip:port` says to the host, retrying while it is
/// not listening yet.
fn fetch_from_host(ip: &str, port: u16) -> Res<String> {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let mut last = String::new();
    for _ in 0..50 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut out = String::new();
                match s.read_to_string(&mut out) {
                    Ok(_) if !out.trim().is_empty() => return Ok(out.trim().to_string()),
                    Ok(_) => last = "empty reply".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("host -> {addr}: {last}"))
}

/// CRI PortForward (what `kubectl port-forward` uses) reaches a server
/// listening in the pod.
fn port_forward(x: &Ctx) -> Res {
    let (pod, _ip, _srv) = echo_pod(x, "net-fwd")?;
    let want = "hello-from-thaw-net-fwd";
    let mut last = String::new();
    // The server may not listen yet: a refused connection closes the
    // session with an error, so try again.
    for _ in 0..20 {
        let url = x
            .quick()
            .port_forward(api::PortForwardRequest {
                pod_sandbox_id: pod.id.clone(),
                port: vec![i32::from(ECHO_PORT)],
            })
            .map_err(|e| st("PortForward", e))?
            .url;
        let mut s = Stream::open(&format!("{url}?port={ECHO_PORT}"), QUICK)?;
        let r = s.read_until(Duration::from_secs(20), |o| {
            String::from_utf8_lossy(&o.port_data).contains(want)
        });
        let got = String::from_utf8_lossy(&s.out.port_data).to_string();
        if got.contains(want) {
            s.close();
            return Ok(());
        }
        last = format!("{r:?}: data {got:?}, error channel {:?}", s.out.stdout);
        s.close();
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(format!(
        "port-forward to {ECHO_PORT} never read {want:?}: {last}"
    ))
}

/// Removing a pod leaves no network namespace, tap or bridge port; also
/// when its sandbox process (runc's pause, thaw's VMM) was killed first.
fn network_cleanup(x: &Ctx) -> Res {
    let before = thaw_tests::cri::host_links();
    for crash in [false, true] {
        let (pod, _ip, _srv) = echo_pod(x, if crash { "net-crash" } else { "net-gone" })?;
        let netns = x.pod_netns(&pod)?;
        if crash {
            let uid = pod.uid();
            let procs = x.setup.pod_processes(&uid);
            let want = if x.handler == "thaw" {
                "thaw-vmm"
            } else {
                "sleep infinity"
            };
            let (pid, _) = procs
                .iter()
                .find(|(_, cmd)| cmd.contains(want))
                .ok_or_else(|| format!("no {want} in the pod's cgroup: {procs:?}"))?;
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        // As kubelet does: stop (retried while it fails), then remove.
        let mut errors = Vec::new();
        for _ in 0..3 {
            match x.slow().stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }) {
                Ok(_) => break,
                Err(e) => errors.push(format!("StopPodSandbox: {}", e.message())),
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        if let Err(e) = x.slow().remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        }) {
            errors.push(format!("RemovePodSandbox: {}", e.message()));
        }
        if !errors.is_empty() {
            eprintln!("network cleanup (crash: {crash}): {errors:?}");
        }
        drop(pod);
        ensure(!Path::new(&netns).exists(), || {
            format!(
                "{netns} still exists after RemovePodSandbox (crash: {crash}; errors: {errors:?})"
            )
        })?;
        let after = thaw_tests::cri::host_links();
        // The bridge is CNI's, made by the first pod on it and kept.
        let new: Vec<&String> = after
            .difference(&before)
            .filter(|l| **l != x.setup.bridge)
            .collect();
        ensure(new.is_empty(), || {
            format!("host interfaces left after RemovePodSandbox (crash: {crash}): {new:?}")
        })?;
    }
    Ok(())
}

/// Two containers in one pod, both running, listed under the pod.
fn two_containers(x: &Ctx) -> Res {
    let pod = x.run_pod("two", PodOpts::default())?;
    let a = x.sleeper(&pod, "first")?;
    let b = x.sleeper(&pod, "second")?;
    for id in [&a, &b] {
        let s = x.status(id)?;
        ensure(s.state == ContainerState::ContainerRunning as i32, || {
            format!("container {id}: state {} after start", s.state)
        })?;
        ensure(s.started_at > 0 && s.started_at >= s.created_at, || {
            format!("created_at {} started_at {}", s.created_at, s.started_at)
        })?;
    }
    let list = x
        .quick()
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            }),
        })
        .map_err(|e| st("ListContainers", e))?
        .containers;
    let mut ids: Vec<&str> = list.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort();
    ensure(ids == want, || format!("ListContainers by pod: {ids:?}"))?;
    ensure(
        list.iter()
            .all(|c| c.state == ContainerState::ContainerRunning as i32),
        || format!("not all running: {list:?}"),
    )
}

/// ContainerStatus after exit: exit code, reason, timestamps.
fn exit_codes(x: &Ctx) -> Res {
    let pod = x.run_pod("exit", PodOpts::default())?;
    for (name, script, code, reason) in [
        ("fails", "exit 3", 3, "Error"),
        ("succeeds", "true", 0, "Completed"),
    ] {
        let id = x.run(&pod, name, &["sh", "-c", script], |_| {})?;
        let s = x.wait_exited(&id)?;
        ensure(s.exit_code == code, || {
            format!("`{script}`: exit code {}, want {code}", s.exit_code)
        })?;
        ensure(s.reason == reason, || {
            format!("`{script}`: reason {:?}, want {reason}", s.reason)
        })?;
        // All three set; finished_at may precede started_at by a hair for
        // a container this quick (CRI stamps the start after the task has
        // started, the exit with the shim's exit time), also with runc.
        ensure(
            s.created_at > 0 && s.started_at >= s.created_at && s.finished_at >= s.created_at,
            || {
                format!(
                    "created_at {} started_at {} finished_at {}",
                    s.created_at, s.started_at, s.finished_at
                )
            },
        )?;
    }
    Ok(())
}

/// StopContainer: SIGTERM first; SIGKILL once the grace period is over.
fn stop_grace(x: &Ctx) -> Res {
    let pod = x.run_pod("stop", PodOpts::default())?;
    let polite = x.run(
        &pod,
        "polite",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 0.1; done",
        ],
        |_| {},
    )?;
    let stubborn = x.run(
        &pod,
        "stubborn",
        &["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
        |_| {},
    )?;
    let stop = |id: &str, grace: i64| -> Res<Duration> {
        let t = Instant::now();
        x.slow()
            .stop_container(api::StopContainerRequest {
                container_id: id.into(),
                timeout: grace,
            })
            .map_err(|e| st("StopContainer", e))?;
        Ok(t.elapsed())
    };
    let took = stop(&polite, 60)?;
    let s = x.status(&polite)?;
    ensure(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code == 0,
        || {
            format!(
                "a container that exits on SIGTERM: state {} exit {} (want EXITED 0)",
                s.state, s.exit_code
            )
        },
    )?;
    ensure(took < Duration::from_secs(60), || {
        format!("a container that exits on SIGTERM took {took:?} to stop (grace 60 s)")
    })?;
    let took = stop(&stubborn, 2)?;
    let s = x.status(&stubborn)?;
    ensure(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code == 137,
        || {
            format!(
                "a container ignoring SIGTERM: state {} exit {} (want EXITED 137)",
                s.state, s.exit_code
            )
        },
    )?;
    ensure(took >= Duration::from_millis(1900), || {
        format!("a container ignoring SIGTERM was killed after {took:?}, before its 2 s grace")
    })
}

/// RemoveContainer of an exited and of a running container.
fn remove_container(x: &Ctx) -> Res {
    let pod = x.run_pod("remove", PodOpts::default())?;
    let done = x.run(&pod, "done", &["true"], |_| {})?;
    x.wait_exited(&done)?;
    let running = x.sleeper(&pod, "running")?;
    for id in [&done, &running] {
        x.slow()
            .remove_container(api::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .map_err(|e| st("RemoveContainer", e))?;
        match x.quick().container_status(api::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        }) {
            Err(e) if e.code() == tonic::Code::NotFound => {}
            other => return Err(format!("status after RemoveContainer: {other:?}")),
        }
    }
    let left = x
        .quick()
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            }),
        })
        .map_err(|e| st("ListContainers", e))?
        .containers;
    ensure(left.is_empty(), || format!("still listed: {left:?}"))
}

/// A new container in a pod whose first container has exited (a restart,
/// or the next init container).
fn after_exit(x: &Ctx) -> Res {
    let pod = x.run_pod("next", PodOpts::default())?;
    let first = x.run(&pod, "init", &["sh", "-c", "echo first"], |_| {})?;
    let s = x.wait_exited(&first)?;
    ensure(s.exit_code == 0, || {
        format!("first container exited {}", s.exit_code)
    })?;
    let second = x.sleeper(&pod, "main")?;
    let s = x.status(&second)?;
    ensure(s.state == ContainerState::ContainerRunning as i32, || {
        format!("second container: state {}", s.state)
    })?;
    let out = x.sh(&second, "echo second")?;
    ensure(out == "second\n", || format!("exec in the second: {out:?}"))
}

/// ExecSync returns stdout, stderr and the exit code apart.
fn exec_sync(x: &Ctx) -> Res {
    let pod = x.run_pod("execsync", PodOpts::default())?;
    let id = x.sleeper(&pod, "c")?;
    let (out, err, code) = x.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"])?;
    ensure(out == "out\n" && err == "err\n" && code == 7, || {
        format!("stdout {out:?} stderr {err:?} exit {code} (want out, err, 7)")
    })
}

/// Exec through the streaming server's URL, over WebSocket, as `kubectl
/// exec -i` gets there: stdin in, stdout and stderr apart, exit code.
fn exec_stream(x: &Ctx) -> Res {
    let pod = x.run_pod("exec", PodOpts::default())?;
    let id = x.sleeper(&pod, "c")?;
    let url = x
        .quick()
        .exec(api::ExecRequest {
            container_id: id.clone(),
            cmd: ["sh", "-c", "read l; echo \"got:$l\"; echo err >&2; exit 3"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .map_err(|e| st("Exec", e))?
        .url;
    let mut s = Stream::open(&url, QUICK.min(x.left()))?;
    s.send_stdin(b"hello\n")?;
    s.read_to_end(x.left())?;
    let (out, err) = (
        String::from_utf8_lossy(&s.out.stdout).into_owned(),
        String::from_utf8_lossy(&s.out.stderr).into_owned(),
    );
    ensure(
        out == "got:hello\n" && err == "err\n" && s.out.exit_code() == Some(3),
        || {
            format!(
                "stdout {out:?} stderr {err:?} status {:?} (want got:hello, err, exit 3)",
                s.out.error
            )
        },
    )
}

/// Attach to a running container's stdin/stdout over WebSocket; detaching
/// leaves it running.
fn attach_stream(x: &Ctx) -> Res {
    let pod = x.run_pod("attach", PodOpts::default())?;
    let id = x.run(
        &pod,
        "echo",
        &["sh", "-c", "while read l; do echo \"echo:$l\"; done"],
        |c| c.stdin = true,
    )?;
    let url = x
        .quick()
        .attach(api::AttachRequest {
            container_id: id.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .map_err(|e| st("Attach", e))?
        .url;
    let mut s = Stream::open(&url, QUICK.min(x.left()))?;
    s.send_stdin(b"ping\n")?;
    s.read_until(x.left(), |o| {
        String::from_utf8_lossy(&o.stdout).contains("echo:ping")
    })?;
    let out = String::from_utf8_lossy(&s.out.stdout).into_owned();
    ensure(out.contains("echo:ping"), || {
        format!("attach: stdout {out:?}, status {:?}", s.out.error)
    })?;
    s.close();
    std::thread::sleep(Duration::from_millis(500));
    let st = x.status(&id)?;
    ensure(st.state == ContainerState::ContainerRunning as i32, || {
        format!("after detaching: state {}", st.state)
    })
}

/// A CRI log line: `<RFC 3339 time> <stream> <F|P> <text>`.
fn parse_log_line(l: &str) -> Res<(&str, &str, &str)> {
    let mut it = l.splitn(4, ' ');
    let (Some(ts), Some(stream), Some(tag), Some(text)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(format!("not a CRI log line: {l:?}"));
    };
    let ts_ok = ts.len() >= 20
        && ts.as_bytes()[4] == b'-'
        && ts.as_bytes()[10] == b'T'
        && (ts.ends_with('Z') || ts[19..].contains('+') || ts[19..].contains('-'));
    ensure(ts_ok, || format!("bad timestamp {ts:?} in {l:?}"))?;
    ensure(stream == "stdout" || stream == "stderr", || {
        format!("bad stream in {l:?}")
    })?;
    ensure(tag == "F" || tag == "P", || format!("bad tag in {l:?}"))?;
    Ok((ts, stream, text))
}

fn container_log(pod: &Pod, name: &str) -> PathBuf {
    pod.log_dir.join(name).join("0.log")
}

/// The container's output in the log file CRI was given, in CRI format.
fn log_file(x: &Ctx) -> Res {
    let pod = x.run_pod("logs", PodOpts::default())?;
    let id = x.run(
        &pod,
        "talker",
        &["sh", "-c", "echo line1; echo err1 >&2; echo line2"],
        |_| {},
    )?;
    x.wait_exited(&id)?;
    let path = container_log(&pod, "talker");
    let s = x.status(&id)?;
    ensure(Path::new(&s.log_path) == path, || {
        format!(
            "ContainerStatus.log_path {:?}, want {}",
            s.log_path,
            path.display()
        )
    })?;
    // The log is complete once the container is reported exited.
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut got = Vec::new();
    for l in text.lines() {
        let (_, stream, msg) = parse_log_line(l)?;
        got.push(format!("{stream} {msg}"));
    }
    let want = ["stdout line1", "stderr err1", "stdout line2"];
    let stdout: Vec<&String> = got.iter().filter(|l| l.starts_with("stdout")).collect();
    ensure(
        want.iter().all(|w| got.iter().any(|g| g == w))
            && stdout == ["stdout line1", "stdout line2"],
        || format!("log lines {got:?}, want {want:?}\n{text}"),
    )?;
    ensure(
        text.lines().all(|l| l.split(' ').nth(2) == Some("F")),
        || format!("short lines must be full (F):\n{text}"),
    )
}

/// ReopenContainerLog: after the file is rotated away, the container's
/// output goes to a new file at the same path.
fn reopen_log(x: &Ctx) -> Res {
    let pod = x.run_pod("reopen", PodOpts::default())?;
    let id = x.run(
        &pod,
        "ticker",
        &[
            "sh",
            "-c",
            "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done",
        ],
        |_| {},
    )?;
    let path = container_log(&pod, "ticker");
    let has_ticks = |p: &Path| fs::read_to_string(p).is_ok_and(|t| t.contains("stdout F tick"));
    let wait = |p: &Path| -> Res {
        let deadline = Instant::now() + x.left();
        while !has_ticks(p) {
            if Instant::now() > deadline {
                return Err(format!("no tick lines in {}", p.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    wait(&path)?;
    let rotated = path.with_extension("log.1");
    fs::rename(&path, &rotated).map_err(|e| format!("rotate: {e}"))?;
    x.quick()
        .reopen_container_log(api::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .map_err(|e| st("ReopenContainerLog", e))?;
    wait(&path)?;
    let before = fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let after = fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
    ensure(before == after, || {
        format!("the rotated file still grows after ReopenContainerLog ({before} -> {after} bytes)")
    })
}

/// CPU and memory numbers a kubelet could act on.
fn sane_stats(s: &api::ContainerStats, id: &str) -> Res {
    let attr_id = s.attributes.as_ref().map(|a| a.id.as_str()).unwrap_or("");
    ensure(attr_id == id, || {
        format!("stats for {attr_id:?}, want {id}")
    })?;
    let cpu = s.cpu.as_ref().ok_or("no cpu stats")?;
    let used = cpu
        .usage_core_nano_seconds
        .as_ref()
        .map(|v| v.value)
        .unwrap_or(0);
    ensure(used > 0, || format!("cpu usage_core_nano_seconds {used}"))?;
    let age = now_ns() - cpu.timestamp;
    ensure((0..600_000_000_000).contains(&age), || {
        format!("cpu timestamp {} is {age} ns old", cpu.timestamp)
    })?;
    let mem = s.memory.as_ref().ok_or("no memory stats")?;
    let ws = mem.working_set_bytes.as_ref().map(|v| v.value).unwrap_or(0);
    ensure(ws > 0 && ws < 1 << 30, || {
        format!("memory working_set_bytes {ws} (want 0 < ws < 1 GiB)")
    })
}

/// A container that has burnt some CPU and sleeps.
fn busy_sleeper(x: &Ctx, pod: &Pod, name: &str) -> Res<String> {
    let id = x.run(
        pod,
        name,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo warm; sleep 100000",
        ],
        |_| {},
    )?;
    let deadline = Instant::now() + x.left();
    let log = container_log(pod, name);
    while !fs::read_to_string(&log).is_ok_and(|t| t.contains("warm")) {
        if Instant::now() > deadline {
            return Err("the CPU burner never finished".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(id)
}

fn container_stats(x: &Ctx) -> Res {
    let pod = x.run_pod("stats", PodOpts::default())?;
    let id = busy_sleeper(x, &pod, "busy")?;
    let s = x
        .quick()
        .container_stats(api::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .map_err(|e| st("ContainerStats", e))?
        .stats
        .ok_or("ContainerStats: no stats")?;
    sane_stats(&s, &id)
}

fn list_container_stats(x: &Ctx) -> Res {
    let pod = x.run_pod("liststats", PodOpts::default())?;
    let a = busy_sleeper(x, &pod, "a")?;
    let b = busy_sleeper(x, &pod, "b")?;
    let all = x
        .quick()
        .list_container_stats(api::ListContainerStatsRequest {
            filter: Some(api::ContainerStatsFilter {
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            }),
        })
        .map_err(|e| st("ListContainerStats", e))?
        .stats;
    for id in [&a, &b] {
        let s = all
            .iter()
            .find(|s| s.attributes.as_ref().is_some_and(|at| &at.id == id))
            .ok_or_else(|| format!("container {id} missing from ListContainerStats"))?;
        sane_stats(s, id)?;
    }
    // The unfiltered list (what kubelet's summary API asks) must work too.
    x.quick()
        .list_container_stats(api::ListContainerStatsRequest { filter: None })
        .map_err(|e| st("ListContainerStats without filter", e))?;
    Ok(())
}

/// A shell script printing the first readable file of the container's
/// cgroup: `v2` (relative to its cgroup v2 directory, which is `/` inside a
/// cgroup namespace and the full path without one) or `v1` (the v1
/// controller file runc mounts at the container's own directory).
fn cgroup_file(v2: &str, v1: &str) -> String {
    format!(
        "p=$(sed -n 's/^0:://p' /proc/self/cgroup); \
         for f in /sys/fs/cgroup$p/{v2} /sys/fs/cgroup/{v2} /sys/fs/cgroup/{v1}; do \
         [ -r \"$f\" ] && exec cat \"$f\"; done; echo no cgroup file {v2} or {v1} >&2; exit 1"
    )
}

/// UpdateContainerResources: the new memory limit and CPU quota are what
/// the container's cgroup says.
fn update_resources(x: &Ctx) -> Res {
    let pod = x.run_pod("resources", PodOpts::default())?;
    let res = |mib: i64, quota: i64| api::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: quota,
        cpu_shares: 256,
        memory_limit_in_bytes: mib << 20,
        ..Default::default()
    };
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        if let Some(l) = c.linux.as_mut() {
            l.resources = Some(res(128, 50_000));
        }
    })?;
    let mem_limit = cgroup_file("memory.max", "memory/memory.limit_in_bytes");
    let cpu_quota = cgroup_file("cpu.max", "cpu/cpu.cfs_quota_us");
    let mem = x.sh(&id, &mem_limit)?;
    ensure(mem.trim() == (128i64 << 20).to_string(), || {
        format!("memory limit at create {mem:?}, want {}", 128i64 << 20)
    })?;
    x.quick()
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(res(256, 150_000)),
            ..Default::default()
        })
        .map_err(|e| st("UpdateContainerResources", e))?;
    let mem = x.sh(&id, &mem_limit)?;
    ensure(mem.trim() == (256i64 << 20).to_string(), || {
        format!("memory limit after update {mem:?}, want {}", 256i64 << 20)
    })?;
    let cpu = x.sh(&id, &cpu_quota)?;
    ensure(cpu.split_whitespace().next() == Some("150000"), || {
        format!("cpu quota after update {cpu:?}, want 150000")
    })
}

fn with_security(
    c: &mut api::ContainerConfig,
    f: impl FnOnce(&mut api::LinuxContainerSecurityContext),
) {
    if let Some(sc) = c.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        f(sc);
    }
}

fn run_as_user(x: &Ctx) -> Res {
    let pod = x.run_pod("user", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.run_as_user = Some(api::Int64Value { value: 1234 });
            sc.run_as_group = Some(api::Int64Value { value: 4321 });
        })
    })?;
    let ids = x.sh(&id, "id -u; id -g; grep -E '^(Uid|Gid):' /proc/1/status")?;
    let mut lines = ids.lines();
    ensure(
        lines.next() == Some("1234") && lines.next() == Some("4321"),
        || format!("exec runs as {ids:?}, want uid 1234 gid 4321"),
    )?;
    ensure(
        ids.contains("Uid:\t1234\t1234\t1234\t1234")
            && ids.contains("Gid:\t4321\t4321\t4321\t4321"),
        || format!("the container's PID 1: {ids:?}"),
    )
}

fn readonly_rootfs(x: &Ctx) -> Res {
    let pod = x.run_pod("readonly", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| sc.readonly_rootfs = true)
    })?;
    let (out, err, code) = x.exec(&id, &["touch", "/probe"])?;
    ensure(code != 0 && err.contains("Read-only file system"), || {
        format!("touch /probe: exit {code} stdout {out:?} stderr {err:?}")
    })
}

fn supplemental_groups(x: &Ctx) -> Res {
    let pod = x.run_pod("groups", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.run_as_user = Some(api::Int64Value { value: 1234 });
            sc.supplemental_groups = vec![2345, 3456];
        })
    })?;
    let groups = x.sh(&id, "id -G")?;
    let got: Vec<&str> = groups.split_whitespace().collect();
    ensure(got.contains(&"2345") && got.contains(&"3456"), || {
        format!("id -G is {groups:?}, want 2345 and 3456 among them")
    })
}

/// The seccomp mode PID 1 runs under (/proc/1/status "Seccomp:").
fn seccomp_mode(x: &Ctx, id: &str) -> Res<String> {
    let line = x.sh(id, "grep '^Seccomp:' /proc/1/status")?;
    Ok(line.split_whitespace().nth(1).unwrap_or("").to_string())
}

/// RuntimeDefault filters (mode 2), Unconfined does not (0), and a
/// Localhost profile from the node is what the container gets: here one
/// that denies mkdir.
fn seccomp_profiles(x: &Ctx) -> Res {
    let pod = x.run_pod("seccomp", PodOpts::default())?;
    let profile = |t: api::security_profile::ProfileType, r: &str| api::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: r.into(),
    };
    use api::security_profile::ProfileType;
    let default = x.run(&pod, "default", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.seccomp = Some(profile(ProfileType::RuntimeDefault, ""))
        })
    })?;
    let mode = seccomp_mode(x, &default)?;
    ensure(mode == "2", || {
        format!("RuntimeDefault: Seccomp mode {mode:?}, want 2")
    })?;
    let open = x.run(&pod, "unconfined", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.seccomp = Some(profile(ProfileType::Unconfined, ""))
        })
    })?;
    let mode = seccomp_mode(x, &open)?;
    ensure(mode == "0", || {
        format!("Unconfined: Seccomp mode {mode:?}, want 0")
    })?;
    let file = pod.log_dir.join("no-mkdir.json");
    fs::write(
        &file,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .map_err(|e| format!("{}: {e}", file.display()))?;
    let local = x.run(&pod, "localhost", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.seccomp = Some(profile(ProfileType::Localhost, &file.display().to_string()))
        })
    })?;
    let (out, err, code) = x.exec(&local, &["mkdir", "/tmp/denied"])?;
    ensure(code != 0 && err.contains("Operation not permitted"), || {
        format!("mkdir under a profile that denies it: exit {code} stdout {out:?} stderr {err:?}")
    })
}

/// The /proc paths kubelet masks and makes read-only (its defaults, sent
/// in every container's security context), plus /proc/uptime as a masked
/// path every kernel has (kubelet's list names files a kernel may lack).
fn masked_paths(x: &Ctx) -> Res {
    let pod = x.run_pod("masked", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.masked_paths = [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
                "/proc/uptime",
            ]
            .map(String::from)
            .to_vec();
            sc.readonly_paths = [
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
            .map(String::from)
            .to_vec();
        })
    })?;
    let uptime = x.sh(&id, "wc -c < /proc/uptime")?;
    ensure(uptime.trim() == "0", || {
        format!("/proc/uptime is not masked: {} bytes", uptime.trim())
    })?;
    let (out, err, code) = x.exec(
        &id,
        &["sh", "-c", "echo 1 > /proc/sys/kernel/shm_rmid_forced"],
    )?;
    ensure(code != 0 && err.contains("Read-only file system"), || {
        format!("writing /proc/sys: exit {code} stdout {out:?} stderr {err:?}")
    })
}

/// A namespaced sysctl the pod sets is what its containers read.
fn sysctls(x: &Ctx) -> Res {
    let opts = PodOpts {
        sysctls: vec![("kernel.shm_rmid_forced".into(), "1".into())],
        ..Default::default()
    };
    let pod = x.run_pod("sysctl", opts)?;
    let id = x.sleeper(&pod, "c")?;
    let v = x.sh(&id, "cat /proc/sys/kernel/shm_rmid_forced")?;
    ensure(v.trim() == "1", || {
        format!(
            "kernel.shm_rmid_forced is {:?} in the container, want 1",
            v.trim()
        )
    })
}

/// What thaw cannot serve is refused with a CRI error that names it, where
/// runc runs it; the suite's leak check then finds nothing left behind.
fn refused_by_thaw(x: &Ctx, attempt: Res, names: &[&str]) -> Res {
    match (x.handler, attempt) {
        ("thaw", Ok(())) => Err("thaw ran it; it must be refused with a clear error".into()),
        ("thaw", Err(e)) => ensure(names.iter().all(|n| e.contains(n)), || {
            format!("refused, but the error does not name {names:?}: {e}")
        }),
        (_, r) => r,
    }
}

/// A container with host directories (or files) mounted as kubelet mounts
/// volumes: `(host path, container path, read-only)`.
fn volume_container(x: &Ctx, pod: &Pod, mounts: &[(&Path, &str, bool)]) -> Res<String> {
    x.run(pod, "c", &["sleep", "100000"], |c| {
        for (host, path, ro) in mounts {
            c.mounts.push(api::Mount {
                container_path: (*path).into(),
                host_path: host.display().to_string(),
                readonly: *ro,
                ..Default::default()
            });
        }
    })
}

/// A hostPath (or disk emptyDir) volume, read-write: a host file is seen
/// in the container, a write in the container on the host, and a host
/// change after that in the container again.
fn volume_read_write(x: &Ctx) -> Res {
    let pod = x.run_pod("volume", PodOpts::default())?;
    let dir = pod.log_dir.join("volume");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::write(dir.join("probe"), "from the host\n").map_err(|e| format!("probe: {e}"))?;
    let id = volume_container(x, &pod, &[(&dir, "/data", false)])?;
    let got = x.sh(&id, "cat /data/probe")?;
    ensure(got == "from the host\n", || {
        format!("/data/probe holds {got:?}")
    })?;
    x.sh(
        &id,
        "mkdir /data/sub && echo from-the-container > /data/sub/new",
    )?;
    let back =
        fs::read_to_string(dir.join("sub/new")).map_err(|e| format!("sub/new on the host: {e}"))?;
    ensure(back == "from-the-container\n", || {
        format!("the host reads {back:?}")
    })?;
    fs::write(dir.join("sub/new"), "changed-on-the-host\n").map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = x.sh(&id, "cat /data/sub/new")?;
        if got == "changed-on-the-host\n" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "2 s after the host's write the container reads {got:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A read-only volume: reads work, every kind of write is refused, and
/// the host directory is unchanged.
fn volume_read_only(x: &Ctx) -> Res {
    let pod = x.run_pod("volume-ro", PodOpts::default())?;
    let dir = pod.log_dir.join("volume-ro");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::write(dir.join("probe"), "read me\n").map_err(|e| format!("probe: {e}"))?;
    let id = volume_container(x, &pod, &[(&dir, "/ro", true)])?;
    ensure(x.sh(&id, "cat /ro/probe")? == "read me\n", || {
        "read failed".into()
    })?;
    for write in [
        "echo x > /ro/new",
        "echo x >> /ro/probe",
        "mkdir /ro/d",
        "rm /ro/probe",
        "mv /ro/probe /ro/moved",
        "touch /ro/probe",
    ] {
        let (_, err, code) = x.exec(&id, &["sh", "-c", write])?;
        ensure(code != 0, || {
            format!("`{write}` succeeded on a read-only volume")
        })?;
        ensure(err.contains("Read-only file system"), || {
            format!("`{write}`: {err:?}, not EROFS")
        })?;
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure(names == ["probe"], || {
        format!("the host directory now holds {names:?}")
    })?;
    let probe = fs::read_to_string(dir.join("probe")).map_err(|e| e.to_string())?;
    ensure(probe == "read me\n", || {
        format!("probe changed to {probe:?}")
    })
}

/// A ConfigMap volume as kubelet writes it (files are links through the
/// `..data` link to a timestamped directory, updated by swapping `..data`
/// atomically), mounted read-only: the update is seen within 2 s, and a
/// subPath mount of one file (kubelet resolves it and binds the file)
/// reads it too.
fn volume_configmap(x: &Ctx) -> Res {
    let pod = x.run_pod("configmap", PodOpts::default())?;
    let dir = pod.log_dir.join("configmap");
    let write_version = |name: &str, value: &str| -> Res {
        let v = dir.join(name);
        fs::create_dir_all(&v).map_err(|e| e.to_string())?;
        fs::write(v.join("key"), value).map_err(|e| e.to_string())?;
        let tmp = dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(|e| e.to_string())?;
        fs::rename(&tmp, dir.join("..data")).map_err(|e| e.to_string())
    };
    write_version("..2026_12_01_v1", "one")?;
    let link = dir.join("key");
    if !link.exists() {
        std::os::unix::fs::symlink("..data/key", &link).map_err(|e| e.to_string())?;
    }
    let single = pod.log_dir.join("subpath-file");
    fs::write(&single, "just this file\n").map_err(|e| e.to_string())?;
    let id = volume_container(
        x,
        &pod,
        &[(&dir, "/config", true), (&single, "/etc/single.conf", true)],
    )?;
    ensure(x.sh(&id, "cat /config/key")? == "one", || {
        "first version not read".into()
    })?;
    ensure(
        x.sh(&id, "cat /etc/single.conf")? == "just this file\n",
        || "the subPath file is not read".into(),
    )?;
    write_version("..2026_12_01_v2", "two")?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = x.sh(&id, "cat /config/key")?;
        if got == "two" {
            return Ok(());
        }
        ensure(got == "one", || {
            format!("mid-update the container read {got:?}")
        })?;
        if Instant::now() > deadline {
            return Err("the ConfigMap update was not seen within 2 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A memory-backed emptyDir as kubelet makes it (a tmpfs sized by
/// `sizeLimit` at `pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`,
/// bound into each container): a tmpfs in the container, shared by the
/// pod's containers, full at its size. runc uses the host tmpfs itself;
/// thaw a tmpfs in the guest, so the host one stays empty.
fn volume_memory(x: &Ctx) -> Res {
    /// Unmounts the stand-in for kubelet's tmpfs however the check ends.
    struct Tmpfs(PathBuf);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let pod = x.run_pod("memvol", PodOpts::default())?;
    let dir = pod
        .log_dir
        .join("pods/uid/volumes/kubernetes.io~empty-dir/cache");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m,mode=777"),
    )
    .map_err(|e| format!("tmpfs on {}: {e}", dir.display()))?;
    let _tmpfs = Tmpfs(dir.clone());
    let mount = |c: &mut api::ContainerConfig| {
        c.mounts.push(api::Mount {
            container_path: "/cache".into(),
            host_path: dir.display().to_string(),
            ..Default::default()
        });
    };
    let a = x.run(&pod, "a", &["sleep", "100000"], mount)?;
    let b = x.run(&pod, "b", &["sleep", "100000"], mount)?;
    let mounts = x.sh(&a, "grep ' /cache ' /proc/mounts")?;
    ensure(mounts.split(' ').nth(2) == Some("tmpfs"), || {
        format!("/cache is not a tmpfs: {mounts:?}")
    })?;
    x.sh(&a, "echo from-a > /cache/probe")?;
    let got = x.sh(&b, "cat /cache/probe")?;
    ensure(
        got == "from-a
",
        || format!("the second container reads {got:?}"),
    )?;
    let (_, err, code) = x.exec(
        &b,
        &["dd", "if=/dev/zero", "of=/cache/big", "bs=1M", "count=6"],
    )?;
    ensure(code != 0 && err.contains("No space left"), || {
        format!("6 MiB into a 4 MiB volume: exit {code}, {err:?}")
    })?;
    let on_host = dir.join("probe").exists();
    match x.handler {
        "thaw" => ensure(!on_host, || {
            "the pod's data is in the host tmpfs, not the VM's memory".into()
        }),
        _ => ensure(on_host, || "runc: the host tmpfs lacks the probe".into()),
    }
}

/// A link planted in a volume that points at a host file resolves in the
/// container's own tree, never on the host; `..` stays inside the volume.
fn volume_escape(x: &Ctx) -> Res {
    let pod = x.run_pod("escape", PodOpts::default())?;
    let dir = pod.log_dir.join("escape");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let secret = pod.log_dir.join("host-secret");
    fs::write(&secret, "host-only-secret\n").map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(&secret, dir.join("link")).map_err(|e| e.to_string())?;
    let id = volume_container(x, &pod, &[(&dir, "/vol", false)])?;
    let (out, _, _) = x.exec(
        &id,
        &[
            "sh",
            "-c",
            "cat /vol/link; cat /vol/../../../../..$(readlink /vol/link); ls /vol/../",
        ],
    )?;
    ensure(!out.contains("host-only-secret"), || {
        format!("the container read a host file through the volume: {out:?}")
    })?;
    // Writing through the link must not reach the host either.
    let _ = x.exec(&id, &["sh", "-c", "echo overwritten > /vol/link"])?;
    let after = fs::read_to_string(&secret).map_err(|e| e.to_string())?;
    ensure(after == "host-only-secret\n", || {
        format!("the host file changed to {after:?}")
    })
}

/// A pod larger than the largest VM shape: refused by thaw, naming the
/// annotation that carried its size.
fn oversized_pod(x: &Ctx) -> Res {
    let opts = PodOpts {
        memory_limit: 64 << 30,
        ..Default::default()
    };
    let attempt = x
        .run_pod("huge", opts)
        .and_then(|pod| x.sleeper(&pod, "c").map(drop));
    refused_by_thaw(x, attempt, &["io.kubernetes.cri.sandbox-memory"])
}

/// Effective capabilities of PID 1 and of an exec'd process.
fn cap_eff(x: &Ctx, id: &str) -> Res<(u64, u64)> {
    let out = x.sh(
        id,
        "grep CapEff /proc/1/status; grep CapEff /proc/self/status",
    )?;
    let caps: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect();
    match caps[..] {
        [a, b] => Ok((a, b)),
        _ => Err(format!("CapEff lines: {out:?}")),
    }
}

fn capabilities_drop(x: &Ctx) -> Res {
    const CHOWN: u64 = 1 << 0;
    const KILL: u64 = 1 << 5;
    let pod = x.run_pod("caps", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| {
            sc.capabilities = Some(api::Capability {
                drop_capabilities: vec!["CHOWN".into()],
                ..Default::default()
            })
        })
    })?;
    let (pid1, exec) = cap_eff(x, &id)?;
    for (who, caps) in [("PID 1", pid1), ("exec", exec)] {
        ensure(caps & CHOWN == 0, || {
            format!("{who}: CapEff {caps:x} still has CAP_CHOWN")
        })?;
        ensure(caps & KILL != 0, || {
            format!("{who}: CapEff {caps:x} lacks CAP_KILL, which was not dropped")
        })?;
    }
    let (out, err, code) = x.exec(&id, &["sh", "-c", "touch /tmp/f && chown 1234 /tmp/f"])?;
    ensure(code != 0 && err.contains("Operation not permitted"), || {
        format!("chown without CAP_CHOWN: exit {code} stdout {out:?} stderr {err:?}")
    })
}

fn no_new_privs(x: &Ctx) -> Res {
    let pod = x.run_pod("nnp", PodOpts::default())?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        with_security(c, |sc| sc.no_new_privs = true)
    })?;
    let out = x.sh(
        &id,
        "grep NoNewPrivs /proc/1/status; grep NoNewPrivs /proc/self/status",
    )?;
    ensure(
        out.lines().count() == 2
            && out
                .lines()
                .all(|l| l.split_whitespace().nth(1) == Some("1")),
        || format!("NoNewPrivs: {out:?}"),
    )
}

/// hostPID: runc shares the node's PID namespace; thaw cannot (the pod is
/// in a VM) and must refuse with an error that says so.
fn host_pid(x: &Ctx) -> Res {
    let opts = PodOpts {
        host_pid: true,
        ..Default::default()
    };
    let attempt = (|| -> Res<String> {
        let pod = x.run_pod("hostpid", opts)?;
        let id = x.sleeper(&pod, "c")?;
        let ns = x.sh(&id, "readlink /proc/self/ns/pid")?;
        drop(pod);
        Ok(ns)
    })();
    if x.handler == "thaw" {
        return match attempt {
            Ok(ns) => Err(format!(
                "thaw ran a hostPID pod: its container got PID namespace {} (its VM's \
                 own, not the node's); hostPID must be refused with a clear error",
                ns.trim()
            )),
            Err(e) => {
                let l = e.to_lowercase();
                ensure(
                    l.contains("pid namespace") || l.contains("host pid") || l.contains("hostpid"),
                    || format!("refused, but the error does not name the host PID namespace: {e}"),
                )
            }
        };
    }
    let ns = attempt?;
    // The node's PID namespace: this test's, which is containerd's.
    let host = fs::read_link("/proc/self/ns/pid").map_err(|e| format!("host pid ns: {e}"))?;
    ensure(ns.trim() == host.to_string_lossy(), || {
        format!("container pid namespace {ns:?}, host's {host:?}")
    })
}

/// /etc/hostname, /etc/hosts and /etc/resolv.conf in the container are
/// the files CRI wrote for the pod (with the pod's DNS config).
fn cri_files(x: &Ctx) -> Res {
    let opts = PodOpts {
        dns: Some(api::DnsConfig {
            servers: vec!["127.0.0.53".into()],
            searches: vec!["cri.thaw.test".into()],
            options: vec!["ndots:2".into()],
        }),
        ..Default::default()
    };
    let pod = x.run_pod("files", opts)?;
    let id = x.sleeper(&pod, "c")?;
    let dir = x.setup.sandbox_dir(&pod.id);
    for f in ["hostname", "hosts", "resolv.conf"] {
        let want = fs::read_to_string(dir.join(f))
            .map_err(|e| format!("CRI's {}: {e}", dir.join(f).display()))?;
        let got = x.sh(&id, &format!("cat /etc/{f}"))?;
        ensure(got == want, || {
            format!("/etc/{f} in the container:\n{got}\nCRI wrote:\n{want}")
        })?;
    }
    let resolv = fs::read_to_string(dir.join("resolv.conf")).unwrap_or_default();
    ensure(
        resolv.contains("nameserver 127.0.0.53") && resolv.contains("search cri.thaw.test"),
        || format!("CRI's resolv.conf lacks the pod's DNS config:\n{resolv}"),
    )
}

/// /dev/shm is a tmpfs, and the pod's containers share it (one IPC
/// namespace per pod).
fn dev_shm(x: &Ctx) -> Res {
    let pod = x.run_pod("shm", PodOpts::default())?;
    let a = x.sleeper(&pod, "a")?;
    let b = x.sleeper(&pod, "b")?;
    let mounts = x.sh(&a, "grep ' /dev/shm ' /proc/mounts")?;
    ensure(
        mounts.lines().last().and_then(|l| l.split(' ').nth(2)) == Some("tmpfs"),
        || format!("/dev/shm is not a tmpfs: {mounts:?}"),
    )?;
    x.sh(&a, "echo shared > /dev/shm/probe")?;
    let got = x.sh(&b, "cat /dev/shm/probe")?;
    ensure(got == "shared\n", || {
        format!("the second container reads {got:?} from /dev/shm/probe")
    })
}

/// The pod's sandbox process runs in the pod's cgroup, so kubelet's
/// accounting and pod limits cover it: runc's pause process (here busybox
/// sleep, see the offline pause image); thaw's VMM, which holds the whole
/// VM.
fn pod_cgroup(x: &Ctx) -> Res {
    let pod = x.run_pod("cgroup", PodOpts::default())?;
    let uid = pod.uid();
    let want = if x.handler == "thaw" {
        "thaw-vmm"
    } else {
        "sleep infinity"
    };
    // Right after RunPodSandbox, runc's process may still be on its way
    // to exec the pause command (its command line reads empty then).
    let mut procs = Vec::new();
    let found = thaw_tests::cmd::wait_for(Duration::from_secs(10), || {
        procs = x.setup.pod_processes(&uid);
        procs
            .iter()
            .any(|(_, cmd)| cmd.contains(want))
            .then_some(())
    });
    ensure(found.is_some(), || {
        format!(
            "no {want} process in the pod's cgroup {}; it holds: {procs:?}",
            x.setup.pod_cgroup(&uid)
        )
    })
}

/// A pod whose containers' limits add up to 600 MiB gets the memory to
/// hold them: thaw sizes the VM for the pod (a 256 MiB VM would not).
fn pod_memory(x: &Ctx) -> Res {
    const LIMIT: i64 = 600 << 20;
    let pod = x.run_pod(
        "sized",
        PodOpts {
            memory_limit: LIMIT,
            ..Default::default()
        },
    )?;
    let id = x.run(&pod, "c", &["sleep", "100000"], |c| {
        if let Some(l) = c.linux.as_mut() {
            l.resources = Some(api::LinuxContainerResources {
                memory_limit_in_bytes: LIMIT,
                ..Default::default()
            });
        }
    })?;
    let meminfo = x.sh(&id, "grep MemTotal /proc/meminfo")?;
    let kib: i64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no MemTotal in {meminfo:?}"))?;
    ensure(kib * 1024 >= LIMIT, || {
        format!(
            "the pod's limit is {} MiB but MemTotal is {} MiB",
            LIMIT >> 20,
            kib >> 10
        )
    })
}

/// /dev/termination-log: kubelet binds a host file there (made 0666, so a
/// non-root container can write it) and reads it once the container has
/// exited. What the container wrote must be in the host file by the time
/// CRI reports the exit.
fn termination_log(x: &Ctx) -> Res {
    let pod = x.run_pod("termlog", PodOpts::default())?;
    let dir = pod.log_dir.join("termination");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let host = dir.join("termination-log");
    fs::write(&host, "").map_err(|e| format!("{}: {e}", host.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&host, fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("{}: {e}", host.display()))?;
    }
    let message = "the end: exit 3\n";
    let script = format!(
        "printf '{}' > /dev/termination-log; exit 3",
        message.replace('\n', "\\n")
    );
    let id = x.run(&pod, "dying", &["sh", "-c", &script], |c| {
        c.mounts.push(api::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: host.display().to_string(),
            ..Default::default()
        });
    })?;
    let s = x.wait_exited(&id)?;
    ensure(s.exit_code == 3, || {
        format!("exit code {}, want 3", s.exit_code)
    })?;
    let got = fs::read_to_string(&host).map_err(|e| format!("{}: {e}", host.display()))?;
    ensure(got == message, || {
        format!("the host's termination log holds {got:?} after the exit, want {message:?}")
    })
}

// ------------------------------------------------------------ the runner

type Many = fn(&Ctx) -> Vec<Outcome>;
type One = fn(&Ctx) -> Res;

enum Check {
    One(&'static str, One),
    Many(&'static [&'static str], Many),
}

fn checks() -> Vec<Check> {
    use Check::{Many, One};
    vec![
        Many(
            &[
                "pod: RunPodSandbox (hostNetwork)",
                "pod: PodSandboxStatus",
                "pod: ListPodSandbox (id, label, state filters)",
                "pod: StopPodSandbox (twice)",
                "pod: RemovePodSandbox (twice)",
            ],
            pod_lifecycle,
        ),
        One(
            "pod: the sandbox process is in the pod's cgroup",
            pod_cgroup,
        ),
        Many(
            &[
                "network: own netns via CNI: RunPodSandbox, pod IP",
                "network: container sees pod IP and hostname",
            ],
            netns_pod,
        ),
        Many(
            &[
                "network: two pods exchange TCP both ways",
                "network: host reaches a pod IP, a pod reaches the host via its gateway",
            ],
            pod_traffic,
        ),
        One(
            "network: CRI PortForward reaches a server in the pod",
            port_forward,
        ),
        One(
            "network: no netns, tap or bridge port left after RemovePodSandbox (also after a crash)",
            network_cleanup,
        ),
        One(
            "container: two containers in one pod running",
            two_containers,
        ),
        One("container: ContainerStatus exit code/reason", exit_codes),
        One("container: StopContainer grace period", stop_grace),
        One(
            "container: RemoveContainer (exited, running)",
            remove_container,
        ),
        One("container: new container after one exited", after_exit),
        One("exec: ExecSync output and exit code", exec_sync),
        One("exec: streaming Exec (WebSocket, stdin)", exec_stream),
        One("exec: streaming Attach (WebSocket)", attach_stream),
        One("logs: CRI-format log file at log_path", log_file),
        One("logs: ReopenContainerLog", reopen_log),
        One("stats: ContainerStats", container_stats),
        One("stats: ListContainerStats", list_container_stats),
        One("resources: UpdateContainerResources", update_resources),
        One(
            "resources: the pod's memory fits in its sandbox",
            pod_memory,
        ),
        One("security: RunAsUser/RunAsGroup", run_as_user),
        One("security: readOnlyRootFilesystem", readonly_rootfs),
        One("security: capabilities drop", capabilities_drop),
        One("security: NoNewPrivs", no_new_privs),
        One("security: hostPID (runc: shared; thaw: refused)", host_pid),
        One("security: supplemental groups", supplemental_groups),
        One(
            "security: seccomp RuntimeDefault, Unconfined, Localhost",
            seccomp_profiles,
        ),
        One("security: masked and read-only /proc paths", masked_paths),
        One("security: namespaced sysctls", sysctls),
        One(
            "volumes: hostPath read-write, both ways",
            volume_read_write,
        ),
        One("volumes: read-only volume refuses writes", volume_read_only),
        One(
            "volumes: ConfigMap update within 2 s, subPath file",
            volume_configmap,
        ),
        One(
            "volumes: memory emptyDir is a shared tmpfs of its sizeLimit",
            volume_memory,
        ),
        One(
            "volumes: a planted link does not reach the host",
            volume_escape,
        ),
        One(
            "bad input: pod beyond the largest VM (runc: runs; thaw: refused)",
            oversized_pod,
        ),
        One(
            "files: /etc/hostname, hosts, resolv.conf from CRI",
            cri_files,
        ),
        One("files: /dev/shm tmpfs shared in the pod", dev_shm),
        One(
            "files: /dev/termination-log on the host at exit",
            termination_log,
        ),
    ]
}

/// Runs `f`; a panic becomes `on_panic(message)`, so one check's panic
/// does not end the suite.
fn guarded<T>(f: impl FnOnce() -> T, on_panic: impl FnOnce(String) -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            on_panic(format!("the check panicked: {msg}"))
        }
    }
}

/// Runs every check against one handler; one outcome per row name.
/// THAW_CRI_ONLY=<text> (a debugging aid) runs only the checks whose name
/// contains it; the others show as not run ("-").
fn run_checks(x: &Ctx, list: &[Check]) -> Vec<(String, Outcome)> {
    let only = std::env::var("THAW_CRI_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    for check in list {
        let names = match check {
            Check::One(n, _) => vec![*n],
            Check::Many(ns, _) => ns.to_vec(),
        };
        if !names.iter().any(|n| only.split('|').any(|o| n.contains(o))) {
            for n in names {
                rows.push((n.to_string(), Outcome::NotRun));
            }
            continue;
        }
        x.deadline.set(Instant::now() + check_budget());
        match check {
            Check::One(name, f) => {
                let t = Instant::now();
                let o = guarded(|| Outcome::from(f(x)), Outcome::Fail);
                say!(
                    "cri: {:<5} {:<50} {:<9} {:>7.1?}",
                    x.handler,
                    name,
                    o.cell(),
                    t.elapsed()
                );
                rows.push((name.to_string(), o));
            }
            Check::Many(names, f) => {
                let t = Instant::now();
                let mut os = guarded(|| f(x), |e| vec![Outcome::Fail(e)]);
                os.resize(names.len(), Outcome::Skip("the check ended early".into()));
                for (name, o) in names.iter().zip(os) {
                    say!(
                        "cri: {:<5} {:<50} {:<9} {:>7.1?}",
                        x.handler,
                        name,
                        o.cell(),
                        t.elapsed()
                    );
                    rows.push((name.to_string(), o));
                }
            }
        }
    }
    rows
}

/// RunPodSandbox -> first container running, once.
fn time_to_running(x: &Ctx) -> Res<Duration> {
    let t = Instant::now();
    let pod = x.run_pod("latency", PodOpts::default())?;
    let id = x.sleeper(&pod, "c")?;
    let took = t.elapsed();
    let s = x.status(&id)?;
    ensure(s.state == ContainerState::ContainerRunning as i32, || {
        format!("state {} after StartContainer", s.state)
    })?;
    Ok(took)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Imports an image into CRI's namespace and waits until CRI sees it (CRI
/// would otherwise try to pull it, and there is no network here).
fn import_for_cri(
    c: &PrivateContainerd,
    cri: &Cri,
    name: &str,
    build: impl FnOnce(&Path) -> PathBuf,
) {
    c.import_image_in(CRI_NAMESPACE, name, build);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = cri
            .image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .map(|r| r.image.is_some());
        if matches!(seen, Ok(true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CRI does not see the imported image {name}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cri_conformance_runc_and_thaw() {
    let c = PrivateContainerd::start_cri(Backend::Vm);
    let setup = c.cri.as_ref().expect("started with CRI");
    let cri = Cri::connect(&c.address, QUICK).expect("CRI client");
    let slow = cri.with_timeout(slow_timeout());

    // The node as kubelet first sees it.
    let version = cri
        .version(api::VersionRequest {
            version: "v1".into(),
        })
        .expect("CRI Version");
    let status = cri
        .status(api::StatusRequest { verbose: true })
        .expect("CRI Status");
    let conditions: Vec<String> = status
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .map(|c| {
            format!(
                "{}={}{}",
                c.r#type,
                c.status,
                if c.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.message)
                }
            )
        })
        .collect();
    say!(
        "cri: {} {} (CRI {}), conditions: {}",
        version.runtime_name,
        version.runtime_version,
        version.runtime_api_version,
        conditions.join(", ")
    );
    assert!(
        status
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .filter(|c| c.r#type == "RuntimeReady" || c.r#type == "NetworkReady")
            .all(|c| c.status),
        "the node is not ready: {conditions:?}\n{}",
        tail(&c.containerd_log(), 40)
    );
    let sandbox_image = Cri::sandbox_image(&status).expect("CRI sandbox image");
    say!("cri: sandbox image {sandbox_image} (built offline: busybox sleep)");
    let marker = c.marker.clone();
    import_for_cri(&c, &cri, &sandbox_image, |w| {
        build_pause_image_tar(w, &sandbox_image, &[marker.as_str()])
    });
    import_for_cri(&c, &cri, BUSYBOX_REF, |w| {
        build_image_tar(w, BUSYBOX_REF, false)
    });

    let ctx = |handler| Ctx {
        c: &c,
        setup,
        base_quick: cri.clone(),
        base_slow: slow.clone(),
        deadline: std::cell::Cell::new(Instant::now() + check_budget()),
        handler,
        seq: std::cell::Cell::new(0),
    };
    let list = checks();
    let mut results: HashMap<&str, Vec<(String, Outcome)>> = HashMap::new();
    for h in HANDLERS {
        let mut outcomes = run_checks(&ctx(h), &list);
        if h == "thaw" {
            for (name, o) in &mut outcomes {
                if let (Outcome::Fail(e), Some(why)) = (&*o, known_gap(name)) {
                    *o = Outcome::Known(e.clone(), why);
                }
            }
        }
        results.insert(h, outcomes);
    }

    // RunPodSandbox -> first container running, interleaved.
    let runs: usize = std::env::var("THAW_CRI_LATENCY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut lat: HashMap<&str, (Vec<Duration>, Vec<String>)> = HashMap::new();
    for _ in 0..runs {
        for h in HANDLERS {
            let r = guarded(|| time_to_running(&ctx(h)), Err);
            let e = lat.entry(h).or_default();
            match r {
                Ok(d) => e.0.push(d),
                Err(err) => e.1.push(err),
            }
        }
    }

    // Whatever a check left (a pod whose stop failed), removed the way
    // kubelet would, then nothing may be left.
    if let Ok(l) = cri.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }) {
        for p in l.items {
            let _ = slow.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            });
            let _ = slow.remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            });
        }
    }
    let leftover = cri
        .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
        .map(|l| l.items.len())
        .unwrap_or(0);
    let leaks = c.leaks(Duration::from_secs(30));

    // The table.
    let width = list
        .iter()
        .flat_map(|ch| match ch {
            Check::One(n, _) => vec![*n],
            Check::Many(ns, _) => ns.to_vec(),
        })
        .map(str::len)
        .max()
        .unwrap_or(10);
    let rows = results["runc"].len();
    let mut table = format!("\n{:<width$} | {:<9} | {:<9}\n", "check", "runc", "thaw");
    table.push_str(&format!(
        "{}-+-{}-+-{}\n",
        "-".repeat(width),
        "-".repeat(9),
        "-".repeat(9)
    ));
    for ((name, runc), (_, thaw)) in results["runc"].iter().zip(&results["thaw"]) {
        table.push_str(&format!(
            "{:<width$} | {:<9} | {:<9}\n",
            name,
            runc.cell(),
            thaw.cell()
        ));
    }
    let passed = |h: &str| {
        results[h]
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Pass))
            .count()
    };
    table.push_str(&format!(
        "{:<width$} | {:<9} | {:<9}\n",
        "passed",
        format!("{}/{rows}", passed("runc")),
        format!("{}/{rows}", passed("thaw"))
    ));
    say!("{table}");
    let mut details = String::new();
    for h in HANDLERS {
        for (name, o) in &results[h] {
            if let Some(d) = o.detail() {
                details.push_str(&format!("[{h}] {name}: {}: {d}\n", o.cell()));
            }
        }
    }
    if !details.is_empty() {
        say!("not passed, with the error CRI returned:\n{details}");
    }
    for (name, why) in KNOWN_THAW_GAPS {
        say!("known gap for thaw: {name}: {why}");
    }
    say!("RunPodSandbox -> first container running ({runs} runs per handler, interleaved):");
    for h in HANDLERS {
        let (mut ok, errs) = lat.remove(h).unwrap_or_default();
        ok.sort();
        if ok.is_empty() {
            say!(
                "  {h:<5} no successful run; first error: {}",
                errs.first().map(String::as_str).unwrap_or("-")
            );
        } else {
            say!(
                "  {h:<5} p50 {:.3?}  p99 {:.3?}  ({} ok, {} failed)",
                percentile(&ok, 50.0),
                percentile(&ok, 99.0),
                ok.len(),
                errs.len()
            );
        }
    }

    assert!(
        leaks.is_empty() && leftover == 0,
        "left behind after the suite ({leftover} pods still listed):\n{}\n--- containerd log tail ---\n{}",
        leaks.join("\n"),
        tail(&c.containerd_log(), 60)
    );
    let runc_bad: Vec<&String> = results["runc"]
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Pass | Outcome::NotRun))
        .map(|(n, _)| n)
        .collect();
    assert!(
        runc_bad.is_empty(),
        "checks failed for runc, so the harness is wrong (errors above): {runc_bad:?}"
    );
    let thaw_bad: Vec<&String> = results["thaw"]
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Pass | Outcome::Known(..) | Outcome::NotRun))
        .map(|(n, _)| n)
        .collect();
    let stale: Vec<&String> = results["thaw"]
        .iter()
        .filter(|(n, o)| matches!(o, Outcome::Pass) && known_gap(n).is_some())
        .map(|(n, _)| n)
        .collect();
    assert!(
        stale.is_empty(),
        "checks listed in KNOWN_THAW_GAPS pass for thaw now; remove them from the list: {stale:?}"
    );
    assert!(
        thaw_bad.is_empty(),
        "{} of {rows} CRI checks fail for thaw (the shim's to-do list; errors above): {thaw_bad:?}",
        thaw_bad.len()
    );
}
