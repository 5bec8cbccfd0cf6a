//! A pod: the UTS and IPC namespaces its containers share, its /dev/shm,
//! and the /etc files they all see.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;

use thaw_agent_protocol::agent::EtcFile;

use crate::error::{Error, Result};
use crate::runtime::rootfs::unmount_below;

#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub hostname: String,
    pub uts_ns: PathBuf,
    pub ipc_ns: PathBuf,
    pub shm: PathBuf,
    pub etc: EtcFiles,
}

/// Files bind-mounted on the container's /etc/{hosts,hostname,resolv.conf}.
#[derive(Debug, Clone)]
pub struct EtcFiles {
    pub hosts: PathBuf,
    pub hostname: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| Error::path("writing", path, e))
}

pub fn default_hosts(hostname: &str) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        s.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    s
}

/// The largest /etc file accepted from the host.
const MAX_ETC_FILE: usize = 64 * 1024;

impl EtcFiles {
    /// These files with some replaced by the host's copies (CreateContainer's
    /// `etc_files`), written into `dir`.
    pub fn with_overrides(&self, dir: &Path, files: &[EtcFile]) -> Result<EtcFiles> {
        let mut out = self.clone();
        if files.is_empty() {
            return Ok(out);
        }
        fs::create_dir_all(dir).map_err(|e| Error::path("creating directory", dir, e))?;
        for f in files {
            let field = format!("etc_files[{}]", f.name);
            if f.content.len() > MAX_ETC_FILE {
                return Err(Error::InvalidRequest(format!(
                    "{field}: {} bytes, more than {MAX_ETC_FILE}",
                    f.content.len()
                )));
            }
            let path = match f.name.as_str() {
                "hosts" | "hostname" | "resolv.conf" => dir.join(&f.name),
                other => {
                    return Err(Error::InvalidRequest(format!(
                        "{field}: {other:?} is not hosts, hostname or resolv.conf"
                    )))
                }
            };
            write_file(&path, &f.content)?;
            match f.name.as_str() {
                "hosts" => out.hosts = path,
                "hostname" => out.hostname = path,
                _ => out.resolv_conf = Some(path),
            }
        }
        Ok(out)
    }

    /// Writes the files into `dir`. Empty `hosts` gets a default; empty
    /// `resolv_conf` falls back to the guest's own, if any.
    pub fn write(dir: &Path, hostname: &str, hosts: &str, resolv_conf: &str) -> Result<EtcFiles> {
        fs::create_dir_all(dir).map_err(|e| Error::path("creating directory", dir, e))?;
        let files = EtcFiles {
            hosts: dir.join("hosts"),
            hostname: dir.join("hostname"),
            resolv_conf: None,
        };
        let hosts = if hosts.is_empty() {
            default_hosts(hostname)
        } else {
            hosts.to_string()
        };
        write_file(&files.hosts, &hosts)?;
        write_file(&files.hostname, &format!("{hostname}\n"))?;
        let resolv = if resolv_conf.is_empty() {
            fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        } else {
            resolv_conf.to_string()
        };
        let resolv_conf = if resolv.is_empty() {
            None
        } else {
            let p = dir.join("resolv.conf");
            write_file(&p, &resolv)?;
            Some(p)
        };
        Ok(EtcFiles {
            resolv_conf,
            ..files
        })
    }
}

/// Creates UTS+IPC namespaces on a short-lived thread and pins them with
/// bind mounts (a namespace lives while something refers to it).
fn make_namespaces(hostname: &str, uts: &Path, ipc: &Path) -> Result<()> {
    for p in [uts, ipc] {
        fs::write(p, b"").map_err(|e| Error::path("creating", p, e))?;
    }
    let (hostname, uts2, ipc2) = (hostname.to_string(), uts.to_path_buf(), ipc.to_path_buf());
    let worker = std::thread::spawn(move || -> Result<()> {
        // unshare on a thread changes only this thread's namespaces.
        nix::sched::unshare(CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
            .map_err(|e| Error::errno("unshare(UTS|IPC) for the sandbox", e))?;
        if !hostname.is_empty() {
            nix::unistd::sethostname(&hostname)
                .map_err(|e| Error::errno(format!("sethostname {hostname:?}"), e))?;
        }
        for (name, target) in [("uts", &uts2), ("ipc", &ipc2)] {
            let src = format!("/proc/thread-self/ns/{name}");
            mount(
                Some(src.as_str()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                Error::errno(
                    format!("pinning {name} namespace on {}", target.display()),
                    e,
                )
            })?;
        }
        Ok(())
    });
    worker
        .join()
        .map_err(|_| Error::Internal("sandbox namespace thread panicked".into()))?
}

impl Sandbox {
    pub fn create(
        id: &str,
        dir: PathBuf,
        hostname: &str,
        hosts: &str,
        resolv_conf: &str,
    ) -> Result<Sandbox> {
        fs::create_dir_all(dir.join("ns")).map_err(|e| Error::path("creating", &dir, e))?;
        let r = Self::create_inner(id, &dir, hostname, hosts, resolv_conf);
        if r.is_err() {
            unmount_below(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
        r
    }

    fn create_inner(
        id: &str,
        dir: &Path,
        hostname: &str,
        hosts: &str,
        resolv_conf: &str,
    ) -> Result<Sandbox> {
        let etc = EtcFiles::write(&dir.join("etc"), hostname, hosts, resolv_conf)?;
        let uts_ns = dir.join("ns/uts");
        let ipc_ns = dir.join("ns/ipc");
        make_namespaces(hostname, &uts_ns, &ipc_ns)?;
        let shm = dir.join("shm");
        fs::create_dir_all(&shm).map_err(|e| Error::path("creating", &shm, e))?;
        mount(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        )
        .map_err(|e| Error::errno(format!("mounting tmpfs on {}", shm.display()), e))?;
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            hostname: hostname.to_string(),
            uts_ns,
            ipc_ns,
            shm,
            etc,
        })
    }

    pub fn destroy(&self) {
        for p in [&self.shm, &self.uts_ns, &self.ipc_ns] {
            let _ = umount2(p.as_path(), MntFlags::MNT_DETACH);
        }
        unmount_below(&self.dir);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::warn!("removing {}: {e}", self.dir.display());
        }
    }
}
