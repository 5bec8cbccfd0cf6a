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

/// How long the daemon may take, once its last container is gone and
/// everything it owned is released, to stop its ttrpc server. The sync
/// server of ttrpc 0.9 can wait forever for a connection accepted while
/// it shuts down (its handler misses the quit flag and blocks on its own
/// control channel); past this the daemon exits without it.
const SERVER_SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);

/// Whether a shim already serves `address` (a pod's sandbox shim).
///
/// Looks for a listening socket at the path instead of connecting: every
/// connection costs the daemon a handful of ttrpc threads, and one that
/// arrives while it shuts down can keep it from exiting (see
/// [`SERVER_SHUTDOWN_LIMIT`]). containerd runs `delete` exactly then.
fn shim_alive(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    match std::fs::read_to_string("/proc/net/unix") {
        Ok(table) => unix_socket_listening(&table, path),
        Err(e) => {
            log::warn!("reading /proc/net/unix: {e}; probing {path} by connecting");
            std::os::unix::net::UnixStream::connect(path).is_ok()
        }
    }
}

/// Whether `table` (the text of `/proc/net/unix`) holds a listening
/// socket bound to `path`.
fn unix_socket_listening(table: &str, path: &str) -> bool {
    // "Num RefCount Protocol Flags Type St Inode Path"; Flags has
    // __SO_ACCEPTCON (0x10000) once listen() was called.
    const ACCEPTING: u32 = 0x10000;
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let flags = fields.nth(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        let bound = fields.nth(3);
        matches!(flags, Some(f) if f & ACCEPTING != 0) && bound == Some(path)
    })
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
        // The crate stops its server once this returns.
        std::thread::spawn(|| {
            std::thread::sleep(SERVER_SHUTDOWN_LIMIT);
            log::warn!(
                "the ttrpc server did not stop within {SERVER_SHUTDOWN_LIMIT:?}; exiting without it"
            );
            std::process::exit(0);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixListener};

    #[test]
    fn a_listening_socket_is_alive_and_a_stale_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let address = format!("unix://{}", path.display());
        let listener = UnixListener::bind(&path).unwrap();
        assert!(shim_alive(&address));
        assert!(shim_alive(path.to_str().unwrap()));
        // What a killed daemon leaves: the file, with nothing listening.
        drop(listener);
        assert!(path.exists());
        assert!(!shim_alive(&address));
    }

    #[test]
    fn a_bound_socket_that_does_not_listen_is_not_a_shim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dgram.sock");
        let _sock = UnixDatagram::bind(&path).unwrap();
        assert!(!shim_alive(path.to_str().unwrap()));
    }

    #[test]
    fn the_socket_table_is_matched_by_whole_path_and_listen_flag() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/s/abc\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 101 /run/s/def\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 102\n";
        assert!(unix_socket_listening(table, "/run/s/abc"));
        assert!(!unix_socket_listening(table, "/run/s/ab"));
        assert!(!unix_socket_listening(table, "/run/s/def"));
        assert!(!unix_socket_listening(table, ""));
    }
}
