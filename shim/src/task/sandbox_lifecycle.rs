//! The shim's sandbox over its life: started (with the config loaded) by
//! the first `create`, its death turned into exits of every task, and
//! stopped, together with the shim, once the last container is deleted.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::agent_events::start_event_loop;
use super::process::now;
use super::{lock, Tasks};
use crate::error::{Error, Result};
use crate::sandbox::{PodCgroup, PodNetns, Sandbox};
use crate::spec::{self, PodRole};
use thaw_config::{BackendKind, Config};

/// Exit status of processes whose sandbox died under them.
pub const SANDBOX_DIED_STATUS: u32 = 255;

/// containerd sends Shutdown right after a task delete. A shim left with
/// no container and no Shutdown this long after (containerd gave up on a
/// slow delete and never retried, or went away) has nothing left to
/// serve, and exits on its own; containerd cleans up after a shim that
/// went.
const EXIT_UNASKED_AFTER: Duration = Duration::from_secs(30);

fn set_log_level(level: &str) {
    log::set_max_level(match level {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    });
}

impl Tasks {
    /// Returns the running sandbox, starting it for the first container
    /// (`id`); true when it was started here. `config_path` is the config
    /// file the runtime options name, if any.
    pub(super) fn ensure_sandbox(
        self: &Arc<Self>,
        id: &str,
        config_path: Option<&Path>,
        bundle_spec: &spec::BundleSpec,
        role: &PodRole,
    ) -> Result<(Arc<Sandbox>, Config, bool)> {
        let _g = lock(&self.starting);
        if let Some(sb) = lock(&self.sandbox).clone() {
            if sb.is_dead() {
                return Err(Error::Sandbox(format!(
                    "sandbox {} has died; its shim accepts no new containers",
                    sb.id
                )));
            }
            let cfg = lock(&self.config).clone().unwrap_or_default();
            return Ok((sb, cfg, false));
        }
        if let PodRole::Member { sandbox_id } = role {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not running in this shim; create it first"
            )));
        }
        let (cfg, path) = Config::load(config_path)?;
        set_log_level(&cfg.log_level);
        log::info!("config {} (backend {:?})", path.display(), cfg.backend);
        if cfg.backend == BackendKind::HostUnisolated {
            log::warn!("backend host-unisolated: containers are NOT isolated in a VM");
        }
        let vm = cfg.vm_for_pod(&bundle_spec.annotations)?;
        if cfg.backend == BackendKind::Vm {
            log::info!(
                "sandbox {id}: a VM of {} vCPUs and {} MiB",
                vm.vcpus,
                vm.memory_mib
            );
        }
        let grouping = role.grouping(id).to_string();
        let pod_cgroup = PodCgroup::from_spec(&bundle_spec.json)?;
        let netns = PodNetns::from_spec(&bundle_spec.json)?;
        let sb = Arc::new(Sandbox::start(
            &cfg,
            &vm,
            &self.namespace,
            &grouping,
            pod_cgroup,
            netns,
        )?);
        let weak = Arc::downgrade(self);
        sb.on_death(move |why| {
            if let Some(tasks) = weak.upgrade() {
                tasks.sandbox_died(&why);
            }
        });
        *lock(&self.sandbox) = Some(sb.clone());
        *lock(&self.config) = Some(cfg.clone());
        start_event_loop(Arc::downgrade(self), sb.clone());
        Ok((sb, cfg, true))
    }

    /// Every process still running ends with status 255.
    pub(super) fn sandbox_died(self: &Arc<Self>, why: &str) {
        log::error!("sandbox died, its tasks exit with {SANDBOX_DIED_STATUS}: {why}");
        for c in self.all_containers() {
            for p in c.all_processes() {
                p.on_exit(SANDBOX_DIED_STATUS, now(), &[], &self.events);
            }
        }
    }

    /// Stops the sandbox and lets the shim exit, once no container is
    /// left; before that, only remembers that it was asked.
    pub fn shutdown(&self) {
        self.exit_when_empty.store(true, Ordering::SeqCst);
        self.shutdown_if_asked();
    }

    /// Plans the shim's exit in [`EXIT_UNASKED_AFTER`] if no container
    /// is left, called off by any create in between.
    pub(super) fn exit_if_left_empty(self: &Arc<Self>) {
        if !lock(&self.containers).is_empty() {
            return;
        }
        let creates = self.creates.load(Ordering::SeqCst);
        let tasks = Arc::downgrade(self);
        let planned = std::thread::Builder::new()
            .name("exit-unasked".into())
            .spawn(move || {
                std::thread::sleep(EXIT_UNASKED_AFTER);
                let Some(tasks) = tasks.upgrade() else {
                    return;
                };
                if tasks.creates.load(Ordering::SeqCst) == creates
                    && lock(&tasks.containers).is_empty()
                    && lock(&tasks.creating).is_empty()
                {
                    log::warn!(
                        "no container and no Shutdown for {EXIT_UNASKED_AFTER:?}; exiting unasked"
                    );
                    tasks.shutdown();
                }
            });
        if let Err(e) = planned {
            log::warn!("cannot plan the shim's exit once empty: {e}");
        }
    }

    /// [`Tasks::shutdown`] if containerd asked for it and no container is
    /// left.
    pub(super) fn shutdown_if_asked(&self) {
        if !self.exit_when_empty.load(Ordering::SeqCst) {
            return;
        }
        {
            let containers = lock(&self.containers);
            if !containers.is_empty() || !lock(&self.creating).is_empty() {
                return;
            }
        }
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("last container gone; stopping the sandbox and the shim");
        let sb = lock(&self.sandbox).take();
        if let Some(sb) = sb {
            sb.stop();
        }
        self.events.close(Duration::from_secs(5));
        self.exit.signal();
    }
}
