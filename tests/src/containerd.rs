//! A private containerd: own root, state, sockets and config in a temporary
//! directory, with the thaw shim found through PATH. Dropping it stops
//! containerd, kills anything the test left running, unmounts, detaches loop
//! devices and removes the directory, also when the test panicked.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::binaries::{binaries, Binaries};
use crate::cmd::{self, Output};
use crate::cri::{CriSetup, CRI_NAMESPACE};
use crate::image;

/// The runtime name users type.
pub const RUNTIME: &str = "io.containerd.thaw.v2";
/// containerd namespace the tests use.
pub const NAMESPACE: &str = "thaw-test";
/// Environment variable the shim reads its config path from (after the
/// runtime options' ConfigPath).
pub const CONFIG_ENV: &str = "THAW_CONFIG";

/// Which sandbox backend the shim under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The agent runs as a host process: no VM, no isolation (tests only).
    Host,
    /// A real micro-VM via thaw-vmm.
    Vm,
}

/// Tests start one containerd each and time things; run them one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct PrivateContainerd {
    dir: PathBuf,
    pub address: PathBuf,
    /// The shim's state dir (image cache, sandboxes).
    pub thaw_state: PathBuf,
    pub shim_config: PathBuf,
    pub bins: Binaries,
    /// Put into every test container's environment to find leaked processes.
    pub marker: String,
    child: Option<Child>,
    log: PathBuf,
    /// Set when containerd serves CRI (see [`PrivateContainerd::start_cri`]).
    pub cri: Option<CriSetup>,
    /// (namespace, id) of every task the test started, for the shim socket
    /// leak check.
    ids: Mutex<Vec<(String, String)>>,
    counter: Mutex<u32>,
    _serial: MutexGuard<'static, ()>,
}

fn hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    format!("{:x}", h.finalize())
}

/// TOML for the shim with the host backend, rooted in `state`.
pub fn host_config(state: &Path, agent: &Path) -> String {
    format!(
        "backend = \"host-unisolated\"\nstate_dir = \"{}\"\nrun_dir = \"{}/run\"\nlog_level = \"debug\"\n\n[host]\nagent = \"{}\"\n\n[image_cache]\nkeep_unused_mib = 64\n",
        state.display(),
        state.display(),
        agent.display()
    )
}

/// TOML for the shim with the VM backend.
pub fn vm_config(state: &Path, vmm: &Path, kernel: &Path, root: &Path) -> String {
    let boot = std::env::var("THAW_TEST_BOOT_TIMEOUT").unwrap_or_else(|_| "600".into());
    // On PVM hosts every guest kernel instruction is emulated: creating a
    // container takes ~10 s on a quiet machine and minutes on a loaded one.
    let agent = std::env::var("THAW_TEST_AGENT_TIMEOUT").unwrap_or_else(|_| "600".into());
    format!(
        "backend = \"vm\"\nstate_dir = \"{}\"\nrun_dir = \"{}/run\"\nlog_level = \"debug\"\n\n[vm]\nvmm = \"{}\"\nkernel = \"{}\"\nroot_image = \"{}\"\nvcpus = 1\nmemory_mib = 256\nboot_timeout_secs = {boot}\nserial = \"console.log\"\ntemplate_store = \"{}\"\n\n[agent]\nrequest_timeout_secs = {agent}\n\n[image_cache]\nkeep_unused_mib = 64\n",
        state.display(),
        state.display(),
        vmm.display(),
        kernel.display(),
        root.display(),
        crate::binaries::template_store().display(),
    )
}

impl PrivateContainerd {
    /// Starts containerd with the shim configured for `backend`.
    pub fn start(backend: Backend) -> Self {
        Self::start_with(backend, |c| c)
    }

    /// Like `start`, letting the test edit the shim config text first.
    pub fn start_with(backend: Backend, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_inner(backend, edit, false)
    }

    /// Starts containerd with its CRI plugin enabled, as a Kubernetes node
    /// runs it: the runtimes come from the CRI snippet in `shim/README.md`
    /// (read from there, so the documentation stays true; only its
    /// `ConfigPath` is replaced by this test's shim config), CNI from a
    /// private config directory (a `bridge` network that carries no host
    /// address), and pods' cgroups under a parent of this test's own.
    /// No image is imported: see [`Self::import_image_in`].
    pub fn start_cri(backend: Backend) -> Self {
        Self::start_inner(backend, |c| c, true)
    }

    /// `start_cri`, letting the caller edit the shim config text first.
    pub fn start_cri_with(backend: Backend, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_inner(backend, edit, true)
    }

    fn start_inner(backend: Backend, edit: impl FnOnce(String) -> String, cri: bool) -> Self {
        let serial = serial();
        let bins = binaries().clone();
        let dir = tempfile::Builder::new()
            .prefix("thaw-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir")
            .keep();
        let marker = format!(
            "THAW_TEST_MARK={}",
            &hex(dir.as_os_str().as_encoded_bytes())[..16]
        );
        let thaw_state = dir.join("thaw");
        let bin_dir = dir.join("bin");
        fs::create_dir_all(&bin_dir).unwrap();
        std::os::unix::fs::symlink(&bins.shim, bin_dir.join("containerd-shim-thaw-v2")).unwrap();

        let base = match backend {
            Backend::Host => host_config(&thaw_state, &bins.agent),
            Backend::Vm => {
                let a = crate::binaries::vm_assets();
                vm_config(&thaw_state, &bins.vmm, &a.kernel, &a.root_image)
            }
        };
        let shim_config = dir.join("thaw.toml");
        fs::write(&shim_config, edit(base)).unwrap();

        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ];
        let cri = if cri {
            Some(CriSetup::prepare(&dir, &marker, &shim_config))
        } else {
            disabled.insert(0, "io.containerd.grpc.v1.cri");
            None
        };
        let (snippet_top, snippet_tables) = match &cri {
            Some(c) => c.readme_snippet_parts(),
            None => ("version = 2".to_string(), String::new()),
        };
        let cri_tables = cri.as_ref().map(CriSetup::own_tables).unwrap_or_default();
        let disabled = disabled
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            &config,
            format!(
                r#"{snippet_top}
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "debug"
{cri_tables}
{snippet_tables}
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = address.display(),
            ),
        )
        .unwrap();

        let log = dir.join("containerd.log");
        let child = spawn_containerd(&dir);
        let mut me = PrivateContainerd {
            dir,
            address,
            thaw_state,
            shim_config,
            bins,
            marker,
            child: Some(child),
            log,
            cri,
            ids: Mutex::new(Vec::new()),
            counter: Mutex::new(0),
            _serial: serial,
        };
        let ready = cmd::wait_for(Duration::from_secs(30), || {
            me.ctr(&["version"]).success().then_some(())
        });
        if ready.is_none() {
            panic!("containerd did not come up:\n{}", me.containerd_log());
        }
        // Hand the marker to the shim too, so processes it starts count.
        let _ = &mut me;
        me
    }

    /// Stops containerd (SIGTERM; shims keep running, as in production)
    /// and starts it again on the same state.
    pub fn restart_containerd(&mut self) {
        self.stop_containerd();
        self.start_containerd();
    }

    /// Stops containerd only; its shims keep running.
    pub fn stop_containerd(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Starts containerd on the same state after [`Self::stop_containerd`].
    pub fn start_containerd(&mut self) {
        self.child = Some(spawn_containerd(&self.dir));
        let ready = cmd::wait_for(Duration::from_secs(30), || {
            self.ctr(&["version"]).success().then_some(())
        });
        assert!(
            ready.is_some(),
            "containerd did not come back:\n{}",
            self.containerd_log()
        );
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn containerd_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A fresh container id, remembered for the socket leak check.
    pub fn new_id(&self, prefix: &str) -> String {
        let mut c = self.counter.lock().unwrap();
        *c += 1;
        let id = format!("{prefix}-{}", *c);
        self.remember_id(&id);
        id
    }

    /// Records an id created outside `new_id` (e.g. a sandbox id).
    pub fn remember_id(&self, id: &str) {
        self.remember_id_in(NAMESPACE, id);
    }

    /// Records a task id of namespace `ns` (CRI's are in `k8s.io`).
    pub fn remember_id_in(&self, ns: &str, id: &str) {
        self.ids
            .lock()
            .unwrap()
            .push((ns.to_string(), id.to_string()));
    }

    fn ctr_command(&self) -> Command {
        self.ctr_command_in(NAMESPACE)
    }

    fn ctr_command_in(&self, ns: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(ns);
        c
    }

    /// `ctr <args>` in namespace `ns`.
    pub fn ctr_in(&self, ns: &str, args: &[&str], timeout: Duration) -> Output {
        let mut c = self.ctr_command_in(ns);
        c.args(args);
        cmd::run(&mut c, timeout)
    }

    /// `ctr <args>` with a 60 s deadline.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, Duration::from_secs(60))
    }

    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let mut c = self.ctr_command();
        c.args(args);
        cmd::run(&mut c, timeout)
    }

    /// A `ctr` command for tests that need to wire stdio themselves.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.ctr_command();
        c.args(args);
        c
    }

    /// Builds and imports the offline busybox image (and optionally the
    /// corrupt one).
    pub fn import_busybox(&self) {
        self.import_image(image::BUSYBOX_REF, false);
    }

    pub fn import_image(&self, name: &str, corrupt: bool) {
        self.import_image_in(NAMESPACE, name, |work| {
            image::build_image_tar(work, name, corrupt)
        });
    }

    /// Builds an image tar with `build` (given a scratch directory) and
    /// imports it into namespace `ns` under `name`.
    pub fn import_image_in(&self, ns: &str, name: &str, build: impl FnOnce(&Path) -> PathBuf) {
        let work = self.dir.join("image-build");
        fs::create_dir_all(&work).unwrap();
        let tar = build(&work);
        let out = self.ctr_in(
            ns,
            &["images", "import", tar.to_str().unwrap()],
            Duration::from_secs(120),
        );
        assert!(out.success(), "import: {}", out.describe());
        let ls = self.ctr_in(ns, &["images", "ls", "-q"], Duration::from_secs(60));
        assert!(
            ls.stdout.lines().any(|l| l.trim() == name),
            "image {name} not listed in namespace {ns}: {}",
            ls.describe()
        );
        let _ = fs::remove_dir_all(&work);
    }

    /// The arguments for `ctr run` with our runtime and the leak marker;
    /// append image, id and command.
    pub fn run_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["run", "--runtime", RUNTIME, "--env", self.marker.as_str()];
        // Debug aid: all capabilities, to tell capability handling apart
        // from everything else when a run fails.
        if std::env::var_os("THAW_TEST_PRIVILEGED").is_some() {
            v.push("--privileged");
        }
        v.extend_from_slice(extra);
        v
    }

    /// `ctr run --rm [extra...] busybox <new id> cmd...`.
    pub fn run_rm(&self, prefix: &str, extra: &[&str], cmd: &[&str], timeout: Duration) -> Output {
        let id = self.new_id(prefix);
        let mut args = self.run_args(&["--rm"]);
        args.extend_from_slice(extra);
        args.push(image::BUSYBOX_REF);
        args.push(&id);
        args.extend_from_slice(cmd);
        self.ctr_timeout(&args, timeout)
    }

    /// `ctr run -d` of busybox with `cmd`; returns the container id.
    pub fn run_detached(&self, prefix: &str, cmd: &[&str], timeout: Duration) -> String {
        let id = self.new_id(prefix);
        let mut args = self.run_args(&["-d"]);
        args.push(image::BUSYBOX_REF);
        args.push(&id);
        args.extend_from_slice(cmd);
        let out = self.ctr_timeout(&args, timeout);
        assert!(out.success(), "{}", out.describe());
        id
    }

    /// The task's status as `ctr tasks ls` shows it ("" if not listed).
    pub fn task_status(&self, id: &str) -> String {
        let out = self.ctr(&["tasks", "ls"]);
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }

    /// Shim daemons serving this containerd (their command line names our
    /// containerd socket).
    pub fn shim_daemons(&self) -> Vec<i32> {
        processes_matching(&self.address.display().to_string(), "-")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-thaw-v2") && cmd.contains("-socket"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// SIGKILLs the one shim daemon, waits until containerd has noticed
    /// (and run `containerd-shim-thaw-v2 delete`), then deletes what is left
    /// of container `id`.
    pub fn crash_shim(&self, id: &str) {
        let shims = self.shim_daemons();
        assert_eq!(shims.len(), 1, "shim daemons: {shims:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shims[0]),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let gone = cmd::wait_for(Duration::from_secs(60), || {
            let s = self.task_status(id);
            (s.is_empty() || s == "STOPPED").then_some(())
        });
        assert!(gone.is_some(), "task still {}", self.task_status(id));
        let _ = self.ctr(&["tasks", "delete", id]);
        let out = self.ctr(&["containers", "delete", id]);
        assert!(out.success(), "{}", out.describe());
    }

    /// SIGKILLs the task, waits (up to `timeout`) until it is stopped, then
    /// deletes the task and the container.
    pub fn kill_and_remove(&self, id: &str, timeout: Duration) {
        let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        cmd::wait_for(timeout, || {
            (self.task_status(id) == "STOPPED").then_some(())
        })
        .unwrap_or_else(|| panic!("SIGKILL did not stop {id}"));
        let out = self.ctr(&["tasks", "delete", id]);
        assert!(out.success(), "{}", out.describe());
        let out = self.ctr(&["containers", "delete", id]);
        assert!(out.success(), "{}", out.describe());
    }

    /// `ctr <args>` with a terminal of `rows` x `cols` as its stdin, stdout
    /// and stderr; returns how ctr ended and what the terminal showed.
    pub fn ctr_in_tty(
        &self,
        args: &[&str],
        rows: u16,
        cols: u16,
        timeout: Duration,
    ) -> (Output, String) {
        use std::io::Read;
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        let mut c = self.ctr_cmd(args);
        let slave = fs::File::from(pty.slave);
        c.stdin(slave.try_clone().expect("dup pty"))
            .stdout(slave.try_clone().expect("dup pty"))
            .stderr(slave);
        let start = Instant::now();
        let child = c.spawn().expect("spawning ctr");
        let mut master = fs::File::from(pty.master);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            // EIO once the last slave fd closes.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&all).into_owned()
        });
        let out = cmd::wait_with_deadline(child, start, timeout);
        // The command holds slave copies until dropped.
        drop(c);
        let text = reader.join().expect("tty reader");
        (out, text)
    }

    /// The tty check both backends run: `ctr run -t` gives the process a
    /// terminal of the client's size, and its output and exit status come
    /// back through it.
    pub fn check_tty_run(&self, prefix: &str, timeout: Duration) {
        let id = self.new_id(prefix);
        let mut args = self.run_args(&["--rm", "-t"]);
        args.extend([
            image::BUSYBOX_REF,
            id.as_str(),
            "sh",
            "-c",
            // ctr sends the client's size (ResizePty) only after Start:
            // wait up to 5 s for it instead of racing it (busybox's stty
            // fails while the size is 0x0).
            "test -t 0 && test -t 1 && echo IS-A-TTY; \
             for i in $(seq 50); do s=$(stty size 2>/dev/null); [ -n \"$s\" ] && break; sleep 0.1; done; \
             echo \"size $s\"; exit 7",
        ]);
        let (out, text) = self.ctr_in_tty(&args, 33, 101, timeout);
        assert_eq!(
            out.code(),
            Some(7),
            "{}\n--- tty ---\n{text}",
            out.describe()
        );
        assert!(text.contains("IS-A-TTY"), "tty output: {text:?}");
        assert!(text.contains("size 33 101"), "terminal size: {text:?}");
    }

    /// Every leak this test left behind, described for a human. Waits up to
    /// `grace` for shims and VMs that are still on their way out.
    pub fn leaks(&self, grace: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let l = self.leaks_now();
            if l.is_empty() || start.elapsed() > grace {
                return l;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts that no process, mount, loop device, socket or cache
    /// reference of this test is left.
    pub fn assert_no_leaks(&self) {
        let l = self.leaks(Duration::from_secs(10));
        assert!(
            l.is_empty(),
            "leaks after test:\n{}\n--- containerd log tail ---\n{}",
            l.join("\n"),
            tail(&self.containerd_log(), 60)
        );
    }

    fn leaks_now(&self) -> Vec<String> {
        let mut out = Vec::new();
        let dir = self.dir.to_string_lossy().to_string();
        let own = self.child.as_ref().map(|c| c.id() as i32);
        for (pid, desc) in processes_matching(&dir, &self.marker) {
            if Some(pid) != own {
                out.push(format!("process {pid}: {desc}"));
            }
        }
        for m in mounts_under(&self.dir) {
            out.push(format!("mount: {m}"));
        }
        for l in loops_under(&self.dir) {
            out.push(format!("loop device: {l}"));
        }
        for s in sockets_under(&self.thaw_state) {
            out.push(format!("socket: {}", s.display()));
        }
        for (ns, id) in self.ids.lock().unwrap().iter() {
            let p = shim_socket_path(&self.address, ns, id);
            if p.exists() {
                out.push(format!("shim socket for {ns}/{id}: {}", p.display()));
            }
        }
        if let Some(cri) = &self.cri {
            out.extend(cri.leaks());
        }
        for refs in self.image_ref_dirs() {
            out.push(format!("image cache reference: {}", refs.display()));
        }
        let sandboxes = self.thaw_state.join("run/sandboxes");
        if let Ok(rd) = fs::read_dir(&sandboxes) {
            for e in rd.flatten() {
                out.push(format!("sandbox state dir: {}", e.path().display()));
            }
        }
        out
    }

    /// The image cache's per-namespace directories (`images/ns/<ns>`) and
    /// `images/` itself (the flat layout of older shims).
    fn image_dirs(&self) -> Vec<PathBuf> {
        let images = self.thaw_state.join("images");
        let mut v = vec![images.clone()];
        if let Ok(rd) = fs::read_dir(images.join("ns")) {
            v.extend(rd.flatten().map(|e| e.path()));
        }
        v
    }

    /// One `refs/<key>` directory per referenced image, every namespace.
    pub fn image_ref_dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for d in self.image_dirs() {
            if let Ok(rd) = fs::read_dir(d.join("refs")) {
                v.extend(rd.flatten().map(|e| e.path()));
            }
        }
        v.sort();
        v
    }

    /// Image cache entries (`*.erofs`) currently on disk, every namespace.
    pub fn cache_entries(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for d in self.image_dirs() {
            if let Ok(rd) = fs::read_dir(d) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().map(|x| x == "erofs").unwrap_or(false) {
                        v.push(p);
                    }
                }
            }
        }
        v.sort();
        v
    }

    fn shutdown(&mut self) {
        // Remove what the test left through containerd first, so shims get
        // their Shutdown call and clean up the normal way.
        let mut namespaces = vec![NAMESPACE];
        if self.cri.is_some() {
            namespaces.push(CRI_NAMESPACE);
        }
        for ns in namespaces {
            let t10 = Duration::from_secs(10);
            let t20 = Duration::from_secs(20);
            let tasks = self.ctr_in(ns, &["tasks", "ls", "-q"], t10);
            for t in tasks.stdout.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.ctr_in(ns, &["tasks", "kill", "-a", "-s", "SIGKILL", t.trim()], t10);
                let _ = self.ctr_in(ns, &["tasks", "delete", "-f", t.trim()], t20);
            }
            let cs = self.ctr_in(ns, &["containers", "ls", "-q"], t10);
            for c in cs.stdout.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.ctr_in(ns, &["containers", "delete", c.trim()], t20);
            }
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = self.dir.to_string_lossy().to_string();
        for (pid, _) in processes_matching(&dir, &self.marker) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut mounts = mounts_under(&self.dir);
        mounts.reverse();
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for l in loops_under(&self.dir) {
            if let Some(dev) = l.split_whitespace().next() {
                let _ = Command::new("losetup").arg("-d").arg(dev).status();
            }
        }
        for (ns, id) in self.ids.lock().unwrap().iter() {
            let _ = fs::remove_file(shim_socket_path(&self.address, ns, id));
        }
        if let Some(cri) = &self.cri {
            cri.clean_up();
        }
        if std::env::var_os("THAW_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts containerd on the config in `dir`, logging to containerd.log
/// (appended, so a restart keeps the history).
fn spawn_containerd(dir: &Path) -> Child {
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .env("PATH", path)
        .env(CONFIG_ENV, dir.join("thaw.toml"))
        .envs(std::env::var_os("THAW_KEEP_SANDBOX_LOGS").map(|v| ("THAW_KEEP_SANDBOX_LOGS", v)))
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .expect("containerd must be installed")
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// containerd's shim socket formula: sha256 of `<address>/<ns>/<id>` under
/// /run/containerd/s.
pub fn shim_socket_path(address: &Path, ns: &str, id: &str) -> PathBuf {
    let key = address.join(ns).join(id);
    PathBuf::from("/run/containerd/s").join(hex(key.as_os_str().as_encoded_bytes()))
}

/// Processes whose command line mentions `dir` or whose environment holds
/// `marker`, as (pid, description).
pub fn processes_matching(dir: &str, marker: &str) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        if cmdline.is_empty() {
            continue; // kernel thread or zombie
        }
        let environ = fs::read(e.path().join("environ")).unwrap_or_default();
        let has_marker = environ.split(|c| *c == 0).any(|kv| kv == marker.as_bytes());
        if cmdline.contains(dir) || has_marker {
            v.push((pid, cmdline));
        }
    }
    v
}

/// Mount points under `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mount))
        .filter(|mp| mp.starts_with(&d))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Loop devices whose backing file is under `dir`, as "dev backing".
pub fn loops_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.trim().starts_with(&d) {
                    v.push(format!("/dev/{name} {}", b.trim()));
                }
            }
        }
    }
    v
}

/// Unix socket files anywhere under `dir`.
pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_socket() {
                v.push(e.path());
            }
        }
    }
    v
}
