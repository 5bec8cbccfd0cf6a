//! containerd's Task API (v2) for thaw: every method is answered; what thaw
//! does not support says so with UNIMPLEMENTED and a reason.
//!
//! Each method decodes its request, calls into the task model
//! ([`crate::task`]) and encodes the reply; errors become ttrpc statuses in
//! [`rpc`].

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, MessageField};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};

use crate::error::{Error, Result};
use crate::events::Events;
use crate::hooks::Stage;
use crate::metrics::metrics_from;
use crate::task::Tasks;

#[derive(Clone)]
pub struct Service {
    tasks: Arc<Tasks>,
}

impl Service {
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, events: Events) -> Service {
        Service {
            tasks: Arc::new(Tasks::new(namespace, exit, events)),
        }
    }

    /// The state of a deleted container's init: stopped, as it ended.
    fn deleted_state(&self, id: &str) -> Result<api::StateResponse> {
        let init = self.tasks.deleted_init(id)?;
        Ok(api::StateResponse {
            id: id.to_string(),
            bundle: init.bundle.display().to_string(),
            pid: init.state.pid,
            status: init.state.status.into(),
            exit_status: init.state.exit_status,
            exited_at: init
                .state
                .exited_at
                .map(MessageField::some)
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// `pause` and `resume`: the container's init goes running <-> paused.
    fn set_paused(&self, id: &str, pause: bool) -> Result<api::Empty> {
        let c = self.tasks.container(id)?;
        let sb = self.tasks.running_sandbox()?;
        c.init.set_paused(pause, sb.agent(), self.tasks.events())?;
        Ok(api::Empty::new())
    }
}

/// `runtimeoptions.v1.Options` (containerd's generic runtime options, as
/// `ctr run --runtime-config-path` and CRI's `options.ConfigPath` send
/// them): field 2 is `config_path`. Decoded by hand since the message is
/// not part of containerd-shim-protos.
fn config_path_from_options(opts: &MessageField<Any>) -> Option<PathBuf> {
    let any = opts.as_ref()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut is = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = is.read_string().ok();
        } else if is
            .skip_field(containerd_shim::protos::protobuf::rt::WireType::new(wire)?)
            .is_err()
        {
            break;
        }
    }
    path.filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Packs a message into an `Any` named by its full protobuf type name.
pub fn to_any(m: &dyn containerd_shim::protos::protobuf::MessageDyn) -> Result<Any> {
    let mut a = Any::new();
    a.type_url = m.descriptor_dyn().full_name().to_string();
    a.value = m
        .write_to_bytes_dyn()
        .map_err(|e| Error::Shim(format!("encoding {}: {e}", a.type_url)))?;
    Ok(a)
}

fn rpc<T>(what: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::debug!("{what}: {e}");
        e.into()
    })
}

impl Task for Service {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let r = (|| {
            let c = match self.tasks.container(&req.id) {
                Err(Error::NotFound(_)) if req.exec_id.is_empty() => {
                    return self.deleted_state(&req.id);
                }
                r => r?,
            };
            let p = c.process(&req.exec_id)?;
            let st = p.state();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.display().to_string(),
                pid: st.pid,
                status: st.status.into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: st.exit_status,
                exited_at: st.exited_at.map(MessageField::some).unwrap_or_default(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })();
        rpc("state", r)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        let config_path = config_path_from_options(&req.options);
        let r =
            self.tasks
                .create(&req, config_path.as_deref())
                .map(|pid| api::CreateTaskResponse {
                    pid,
                    ..Default::default()
                });
        rpc("create", r)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let r = (|| {
            let p = self.tasks.process(&req.id, &req.exec_id)?;
            let sb = self.tasks.running_sandbox()?;
            sb.connect_network()?;
            let container = self.tasks.container(&req.id)?;
            let init = req.exec_id.is_empty();
            if init {
                container.run_hooks(Stage::StartContainer, sb.pid())?;
            }
            let pid = p.start(
                sb.agent(),
                |agent_pid| sb.task_pid(agent_pid),
                self.tasks.events(),
            )?;
            if init {
                container.run_hooks_logged(Stage::Poststart, sb.pid());
            }
            Ok(api::StartResponse {
                pid,
                ..Default::default()
            })
        })();
        crate::heap::release_freed();
        rpc("start", r)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let r = self
            .tasks
            .delete(&req.id, &req.exec_id)
            .map(|st| api::DeleteResponse {
                pid: st.pid,
                exit_status: st.exit_status,
                exited_at: st.exited_at.map(MessageField::some).unwrap_or_default(),
                ..Default::default()
            });
        rpc("delete", r)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let r = (|| {
            self.tasks.container(&req.id)?;
            let sb = self.tasks.running_sandbox()?;
            let l = sb.agent().list_pids(&req.id)?;
            let mut out = api::PidsResponse::new();
            // In a VM every process maps to the VMM's pid: one entry for
            // the container and one per exec, so `ctr tasks ps` still
            // tells them apart by exec id, and no guest pid leaks out.
            let mut seen_plain = false;
            for p in l.processes {
                let pid = sb.task_pid(p.pid);
                if p.exec_id.is_empty() && pid != p.pid {
                    if seen_plain {
                        continue;
                    }
                    seen_plain = true;
                }
                let mut info = ProcessInfo::new();
                info.pid = pid;
                if !p.exec_id.is_empty() {
                    let d = ProcessDetails {
                        exec_id: p.exec_id.clone(),
                        ..Default::default()
                    };
                    info.info = MessageField::some(to_any(&d)?);
                }
                out.processes.push(info);
            }
            Ok(out)
        })();
        rpc("pids", r)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        rpc("pause", self.set_paused(&req.id, true))
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        rpc("resume", self.set_paused(&req.id, false))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        rpc(
            "checkpoint",
            Err(Error::Unimplemented(
                "checkpointing a task is not supported by thaw (VM snapshots are internal)".into(),
            )),
        )
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let r = (|| {
            let p = self.tasks.process(&req.id, &req.exec_id)?;
            let sb = self.tasks.live_sandbox();
            match p.kill(sb.as_ref().map(|s| s.agent()), req.signal, req.all) {
                Ok(()) => Ok(api::Empty::new()),
                // The VM died under the call (its exits are on their way):
                // for containerd the process is gone, which is what a kill
                // of a finished process says, so a StopPodSandbox racing a
                // VMM crash goes on instead of failing.
                Err(e)
                    if sb
                        .as_ref()
                        .is_some_and(|s| s.dies_within(std::time::Duration::from_secs(2))) =>
                {
                    log::info!("kill {}: the sandbox died ({e})", req.id);
                    Err(Error::NotFound(format!(
                        "process {}/{}: its sandbox died",
                        req.id, req.exec_id
                    )))
                }
                Err(e) => Err(e),
            }
        })();
        rpc("kill", r)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        rpc("exec", self.tasks.exec(&req).map(|_| api::Empty::new()))
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let r = (|| {
            let p = self.tasks.process(&req.id, &req.exec_id)?;
            if !p.stdio.terminal {
                return Err(Error::FailedPrecondition(format!(
                    "process {}/{} has no terminal",
                    req.id, req.exec_id
                )));
            }
            let sb = self.tasks.running_sandbox()?;
            sb.agent()
                .resize_tty(&req.id, &req.exec_id, req.width, req.height)?;
            Ok(api::Empty::new())
        })();
        rpc("resize_pty", r)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let r = (|| {
            let p = self.tasks.process(&req.id, &req.exec_id)?;
            if req.stdin {
                p.close_stdin();
            }
            Ok(api::Empty::new())
        })();
        rpc("close_io", r)
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let r = (|| {
            self.tasks.container(&req.id)?;
            // containerd sends OCI `LinuxResources` as JSON in an Any; the
            // agent applies it to the container's cgroup in the guest.
            let any = req
                .resources
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
            let json: serde_json::Value = serde_json::from_slice(&any.value).map_err(|e| {
                Error::InvalidArgument(format!(
                    "resources of type {} are not OCI LinuxResources JSON: {e}",
                    any.type_url
                ))
            })?;
            if !json.is_object() {
                return Err(Error::InvalidArgument(format!(
                    "resources of type {} are not a JSON object",
                    any.type_url
                )));
            }
            self.tasks
                .running_sandbox()?
                .agent()
                .update(&req.id, any.value.clone())?;
            Ok(api::Empty::new())
        })();
        rpc("update", r)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let r = (|| {
            let st = match self.tasks.process(&req.id, &req.exec_id) {
                Ok(p) => p.wait(),
                Err(Error::NotFound(_)) if req.exec_id.is_empty() => {
                    self.tasks.deleted_init(&req.id)?.state
                }
                Err(e) => return Err(e),
            };
            Ok(api::WaitResponse {
                exit_status: st.exit_status,
                exited_at: st.exited_at.map(MessageField::some).unwrap_or_default(),
                ..Default::default()
            })
        })();
        rpc("wait", r)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let r = (|| {
            self.tasks.container(&req.id)?;
            let sb = self.tasks.running_sandbox()?;
            let s = sb.agent().stats(&req.id)?;
            let mut out = api::StatsResponse::new();
            out.stats = MessageField::some(to_any(&metrics_from(&s))?);
            Ok(out)
        })();
        rpc("stats", r)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.tasks.sandbox_pid(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.tasks.shutdown();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_options_config_path_is_decoded() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/thaw/a.toml"}
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/etc/thaw/a.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(&MessageField::some(any)),
            Some(PathBuf::from("/etc/thaw/a.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'y'],
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&MessageField::some(other)), None);
        assert_eq!(config_path_from_options(&MessageField::none()), None);
    }
}
