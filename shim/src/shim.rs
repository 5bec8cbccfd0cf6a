//! The shim binary's lifecycle verbs as containerd runs them:
//! `start` (spawn or find the daemon, print its address), the daemon
//! itself, and `delete` (clean up after a daemon that died).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_address;
use containerd_shim::{socket_address, spawn, Config, ExitSignal, Flags, Shim, StartOpts};

use crate::child;
use crate::events::Events;
use crate::image_cache;
use crate::record::{process_matches, ContainerRecord};
use crate::service::Service;
use crate::spec::{self, PodRole};

pub struct ThawShim {
    namespace: String,
    id: String,
    /// The daemon's listening socket (`-socket`), empty for start/delete.
    socket: String,
    exit: Arc<ExitSignal>,
}

/// Whether a shim already serves `address` (a pod's sandbox shim).
fn shim_alive(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl Shim for ThawShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ThawShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // `start` runs in the bundle directory.
        let annotations = spec::annotations(Path::new("."));
        let role = spec::pod_role(&annotations, &opts.id);
        let grouping = role.grouping(&opts.id).to_string();
        if let PodRole::Member { sandbox_id } = &role {
            // containerd's own formula: the pod's shim is found, not stored.
            let address = socket_address(&opts.address, &opts.namespace, sandbox_id);
            if !shim_alive(&address) {
                return Err(containerd_shim::Error::Other(format!(
                    "pod sandbox {sandbox_id} has no running thaw shim at {address}"
                )));
            }
            write_address(&address)?;
            return Ok(address);
        }
        let (_pid, address) = spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = Path::new(".");
        match ContainerRecord::read(bundle) {
            Ok(Some(rec)) => cleanup_after_crash(&rec, bundle),
            Ok(None) => {}
            Err(e) => log::warn!("delete {}: {e}", self.id),
        }
        // A killed daemon cannot remove its socket; nobody else would.
        if let Ok(address) = containerd_shim::util::read_address() {
            let path = address
                .trim()
                .strip_prefix("unix://")
                .unwrap_or(address.trim());
            if !path.is_empty() && !shim_alive(path) {
                let _ = std::fs::remove_file(path);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The crate removes the socket using the bundle's `address` file,
        // which containerd may already have deleted with the bundle: remove
        // it here from what we were started with.
        let path = self.socket.strip_prefix("unix://").unwrap_or(&self.socket);
        if !path.is_empty() {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("removing shim socket {path}: {e}");
                }
            }
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        // From here on the crate's SIGCHLD handler reaps our children.
        child::set_reaper_active();
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let events = Events::new(
            crate::events::ContainerdSink::new(address, publisher),
            self.namespace.clone(),
        );
        Service::new(&self.namespace, self.exit.clone(), events)
    }
}

/// Releases what a dead shim held for one container. If the shim is still
/// alive it owns the cleanup and nothing is done here.
fn cleanup_after_crash(rec: &ContainerRecord, bundle: &Path) {
    if process_matches(rec.shim_pid, "containerd-shim-thaw-v2") {
        log::info!(
            "delete {}: shim {} is alive and cleans up itself",
            rec.id,
            rec.shim_pid
        );
        return;
    }
    let dir = rec.sandbox_dir.display().to_string();
    if process_matches(rec.sandbox_pid, &dir) {
        log::warn!(
            "delete {}: killing orphaned sandbox process {}",
            rec.id,
            rec.sandbox_pid
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(rec.sandbox_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..50 {
            if !process_matches(rec.sandbox_pid, &dir) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(cg) = &rec.sandbox_cgroup {
        crate::sandbox::kill_cgroup(cg);
    }
    if !process_matches(rec.sandbox_pid, &dir) {
        crate::sandbox::remove_cgroups(&rec.vmm_cgroups);
        if let Some(netns) = &rec.pod_netns {
            crate::sandbox::network::unlink(netns);
        }
        crate::sandbox::share::remove_in(&rec.sandbox_dir);
        let _ = std::fs::remove_dir_all(&rec.sandbox_dir);
    }
    if let Some(image) = &rec.image {
        if let Err(e) = image_cache::release_ref(image) {
            log::warn!("delete {}: releasing image {}: {e}", rec.id, image.key);
        }
    }
    ContainerRecord::remove(bundle);
}
