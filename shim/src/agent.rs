//! The shim's side of the agent's control connection: a ttrpc client on
//! the socket the agent dialed, with a deadline on every request so a
//! silent or hostile guest cannot block a containerd call forever.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use thaw_agent_protocol::agent_ttrpc::AgentClient;
use thaw_agent_protocol::ttrpc::{self, context, Code};
use thaw_agent_protocol::{agent, transport, PROTOCOL_VERSION};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    timeout: Duration,
}

/// Turns an agent failure into the shim's error, keeping the agent's
/// status code where containerd gives it meaning.
fn map_err(what: &str, e: ttrpc::Error) -> Error {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg = format!("{what}: {}", s.message());
            match s.code() {
                Code::NOT_FOUND => Error::NotFound(msg),
                Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                Code::ALREADY_EXISTS => Error::AlreadyExists(msg),
                Code::UNIMPLEMENTED => Error::Unimplemented(msg),
                _ => Error::Agent(msg),
            }
        }
        other => Error::Agent(format!("{what}: {other}")),
    }
}

impl Agent {
    /// Builds the client on an accepted control connection and checks the
    /// agent speaks our protocol revision.
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Agent> {
        let client = transport::sync_client(stream).map_err(|e| map_err("ttrpc client", e))?;
        let a = Agent { client, timeout };
        let h = a.health()?;
        if h.protocol_version != PROTOCOL_VERSION {
            return Err(Error::Agent(format!(
                "agent {} speaks protocol {}, the shim speaks {PROTOCOL_VERSION}",
                h.agent_version, h.protocol_version
            )));
        }
        Ok(a)
    }

    fn ctx(&self) -> context::Context {
        context::with_timeout(self.timeout.as_nanos() as i64)
    }

    pub fn health(&self) -> Result<agent::HealthResponse> {
        self.client
            .health(self.ctx(), &agent::HealthRequest::new())
            .map_err(|e| map_err("Health", e))
    }

    pub fn set_time(&self, t: std::time::SystemTime) -> Result<()> {
        let mut r = agent::SetTimeRequest::new();
        r.unix_time_ns = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        self.client
            .set_time(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("SetTime", e))
    }

    /// Sends 64 bytes from the host's RNG for the guest to mix in.
    pub fn add_entropy(&self) -> Result<()> {
        let mut r = agent::AddEntropyRequest::new();
        r.data = host_random(64)?;
        self.client
            .add_entropy(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("AddEntropy", e))
    }

    /// Gives the guest its own hostname and machine id.
    pub fn set_identity(&self, hostname: &str, machine_id: &str) -> Result<()> {
        let mut r = agent::SetIdentityRequest::new();
        r.hostname = hostname.into();
        r.machine_id = machine_id.into();
        self.client
            .set_identity(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("SetIdentity", e))
    }

    /// Has the agent connect to `port` on the guest's loopback and dial
    /// the stream back to host port `host_port`.
    pub fn forward_port(&self, port: u32, host_port: u32) -> Result<()> {
        let mut r = agent::ForwardPortRequest::new();
        r.port = port;
        r.host_port = host_port;
        self.client
            .forward_port(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("ForwardPort", e))
    }

    /// Mounts the sandbox's host share in the guest.
    pub fn mount_share(&self) -> Result<()> {
        self.client
            .mount_share(self.ctx(), &agent::Empty::new())
            .map(|_| ())
            .map_err(|e| map_err("MountShare", e))
    }

    /// Mounts a guest tmpfs for a memory-backed emptyDir (idempotent).
    pub fn mount_ephemeral(&self, name: &str, size_bytes: u64, mode: u32) -> Result<()> {
        let mut r = agent::MountEphemeralRequest::new();
        r.name = name.into();
        r.size_bytes = size_bytes;
        r.mode = mode;
        self.client
            .mount_ephemeral(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("MountEphemeral", e))
    }

    /// Gives the guest NIC the pod's network.
    pub fn configure_network(&self, req: &agent::ConfigureNetworkRequest) -> Result<()> {
        self.client
            .configure_network(self.ctx(), req)
            .map(|_| ())
            .map_err(|e| map_err("ConfigureNetwork", e))
    }

    pub fn create_sandbox(&self, req: &agent::CreateSandboxRequest) -> Result<()> {
        self.client
            .create_sandbox(self.ctx(), req)
            .map(|_| ())
            .map_err(|e| map_err("CreateSandbox", e))
    }

    pub fn destroy_sandbox(&self, id: &str) -> Result<()> {
        let mut r = agent::DestroySandboxRequest::new();
        r.sandbox_id = id.into();
        self.client
            .destroy_sandbox(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("DestroySandbox", e))
    }

    pub fn create_container(&self, req: &agent::CreateContainerRequest) -> Result<u32> {
        self.client
            .create_container(self.ctx(), req)
            .map(|r| r.pid)
            .map_err(|e| map_err("CreateContainer", e))
    }

    pub fn exec_process(&self, req: &agent::ExecProcessRequest) -> Result<u32> {
        self.client
            .exec_process(self.ctx(), req)
            .map(|r| r.pid)
            .map_err(|e| map_err("ExecProcess", e))
    }

    pub fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let mut r = agent::StartProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        self.client
            .start_process(self.ctx(), &r)
            .map(|r| r.pid)
            .map_err(|e| map_err("StartProcess", e))
    }

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut r = agent::SignalProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.signal = signal;
        r.all = all;
        self.client
            .signal_process(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("SignalProcess", e))
    }

    /// Blocks until the process exited; no deadline (used as a fallback
    /// when exit events were missed).
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<agent::WaitProcessResponse> {
        let mut r = agent::WaitProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        self.client
            .wait_process(context::with_timeout(0), &r)
            .map_err(|e| map_err("WaitProcess", e))
    }

    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let mut r = agent::DeleteProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        self.client
            .delete_process(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("DeleteProcess", e))
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut r = agent::RemoveContainerRequest::new();
        r.container_id = id.into();
        self.client
            .remove_container(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("RemoveContainer", e))
    }

    fn container_req(id: &str) -> agent::ContainerRequest {
        let mut r = agent::ContainerRequest::new();
        r.container_id = id.into();
        r
    }

    pub fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let mut r = agent::UpdateContainerRequest::new();
        r.container_id = id.to_string();
        r.resources_json = resources_json;
        self.client
            .update_container(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("UpdateContainer", e))
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        self.client
            .pause_container(self.ctx(), &Self::container_req(id))
            .map(|_| ())
            .map_err(|e| map_err("PauseContainer", e))
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        self.client
            .resume_container(self.ctx(), &Self::container_req(id))
            .map(|_| ())
            .map_err(|e| map_err("ResumeContainer", e))
    }

    pub fn resize_tty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let mut r = agent::ResizeTtyRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.width = width;
        r.height = height;
        self.client
            .resize_tty(self.ctx(), &r)
            .map(|_| ())
            .map_err(|e| map_err("ResizeTty", e))
    }

    pub fn stats(&self, id: &str) -> Result<agent::StatsResponse> {
        self.client
            .stats(self.ctx(), &Self::container_req(id))
            .map_err(|e| map_err("Stats", e))
    }

    pub fn list_pids(&self, id: &str) -> Result<agent::ListPidsResponse> {
        self.client
            .list_pids(self.ctx(), &Self::container_req(id))
            .map_err(|e| map_err("ListPids", e))
    }

    /// Long poll for events after `after_seq`, waiting up to `wait`.
    pub fn get_events(&self, after_seq: u64, wait: Duration) -> Result<agent::GetEventsResponse> {
        let mut r = agent::GetEventsRequest::new();
        r.after_seq = after_seq;
        r.timeout_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        let ctx = context::with_timeout((wait + self.timeout).as_nanos() as i64);
        self.client
            .get_events(ctx, &r)
            .map_err(|e| map_err("GetEvents", e))
    }
}

/// `len` bytes from the host's RNG.
pub fn host_random(len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut f =
        std::fs::File::open("/dev/urandom").map_err(|e| Error::io("opening /dev/urandom", e))?;
    std::io::Read::read_exact(&mut f, &mut buf)
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(buf)
}
