//! The shim's side of the agent's control connection: a ttrpc client on
//! the socket the agent dialed, with a deadline on every request so a
//! silent or hostile guest cannot block a containerd call forever.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use thaw_agent_protocol::agent_ttrpc::AgentClient;
use thaw_agent_protocol::ttrpc::{self, context, Code};
use thaw_agent_protocol::{agent, transport, PROTOCOL_VERSION};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    timeout: Duration,
    /// A duplicate of the connection, only polled: the ttrpc client does
    /// not say when its connection died, and a call without a deadline
    /// would then wait forever.
    conn: Arc<UnixStream>,
    /// How long each renewal of a deadline-less call waits
    /// ([`Agent::wait_process`]).
    wait_slice: Duration,
}

/// See [`Agent::wait_process`]. The agent's ttrpc server ends (and logs)
/// each slice's handler when it runs out.
const WAIT_SLICE: Duration = Duration::from_secs(60);

/// Turns an agent failure into the shim's error, keeping the agent's
/// status code where containerd gives it meaning. Failures of the
/// connection itself (no answer before the deadline, a reply over ttrpc's
/// size limit) are the agent's fault, not the caller's, whatever status
/// the ttrpc client dressed them in.
fn map_err(what: &str, e: ttrpc::Error) -> Error {
    match e {
        ttrpc::Error::RpcStatus(s) if s.message().contains("exceed maximum message size") => {
            Error::Agent(format!(
                "{what}: the agent's reply is too large: {}",
                s.message()
            ))
        }
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
        ttrpc::Error::Others(m) if is_deadline(&m) => Error::Agent(format!(
            "{what}: the agent did not answer before the deadline"
        )),
        other => Error::Agent(format!("{what}: {other}")),
    }
}

/// Is this how ttrpc's sync client words a call whose deadline passed?
fn is_deadline(message: &str) -> bool {
    message.starts_with("Receive packet from Receiver timeout") && message.contains("timed out")
}

impl Agent {
    /// Builds the client on an accepted control connection and checks the
    /// agent speaks our protocol revision. [`Error::AgentClosed`] if the
    /// connection closed before the agent answered.
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Agent> {
        let conn = stream
            .try_clone()
            .map_err(|e| Error::io("duplicating the agent connection", e))?;
        let client = transport::sync_client(stream).map_err(|e| map_err("ttrpc client", e))?;
        let a = Agent {
            client,
            timeout,
            conn: Arc::new(conn),
            wait_slice: WAIT_SLICE,
        };
        let h = a.health().map_err(|e| match e {
            Error::Agent(m) if a.connection_lost() => Error::AgentClosed(m),
            e => e,
        })?;
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
    /// when exit events were missed). The call is renewed every
    /// `wait_slice` (60 s) while the connection lives, so a dead or half-closed
    /// connection (whose reply can never come) ends it with an error.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<agent::WaitProcessResponse> {
        let mut r = agent::WaitProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        loop {
            if self.connection_lost() {
                return Err(Error::Agent(
                    "WaitProcess: the agent connection is closed".into(),
                ));
            }
            let ctx = context::with_timeout(self.wait_slice.as_nanos() as i64);
            match self.client.wait_process(ctx, &r) {
                Ok(r) => return Ok(r),
                // Our deadline, or the agent's server applying it first.
                Err(ttrpc::Error::Others(m)) if is_deadline(&m) => continue,
                Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED => continue,
                Err(e) => return Err(map_err("WaitProcess", e)),
            }
        }
    }

    /// Has the agent closed (or half-closed) the connection, or has it
    /// failed? Nothing is consumed: the ttrpc client owns the data.
    fn connection_lost(&self) -> bool {
        let mut fds = [PollFd::new(self.conn.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
        // Flags nix does not know (POLLRDHUP) make `revents` None.
        let hup = PollFlags::POLLHUP | PollFlags::POLLERR;
        if fds[0].revents().is_none_or(|r| r.intersects(hup)) {
            return true;
        }
        // Readable: at the end of the stream if a peek finds nothing.
        let mut b = [0u8; 1];
        let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        matches!(recv(self.conn.as_raw_fd(), &mut b, peek), Ok(0))
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

/// A hostile or broken agent, scripted: the peer speaks the real wire
/// format (ttrpc frames over a socket pair) and answers, or does not, the
/// way each test says.
#[cfg(test)]
pub(crate) mod hostile_agent_tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use thaw_agent_protocol::protobuf::Message;
    use thaw_agent_protocol::ttrpc::proto::{
        Codec, MessageHeader, Request, Response, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX,
    };

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);
    /// Long: a starved test thread must not pass for a lost reply (the
    /// two concurrent-call tests once failed at 10 s, only on a machine
    /// loaded by several VM suites at once; 540 runs since, 40 of them
    /// beside four CPU burners on two cores, never did).
    const PATIENT: Duration = Duration::from_secs(60);

    /// The shim's client on one end; the other end is the fake agent.
    /// Calls that should time out get [`TIMEOUT`]; tests then give calls
    /// that should succeed [`PATIENT`], so a loaded machine cannot fail
    /// them.
    fn pair() -> (Agent, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let conn = Arc::new(ours.try_clone().unwrap());
        let client = transport::sync_client(ours).unwrap();
        (
            Agent {
                client,
                timeout: TIMEOUT,
                conn,
                wait_slice: TIMEOUT,
            },
            theirs,
        )
    }

    /// Reads one request frame; returns its stream id and request.
    pub(crate) fn read_request(peer: &mut UnixStream) -> (u32, Request) {
        let mut h = [0u8; MESSAGE_HEADER_LENGTH];
        peer.read_exact(&mut h).unwrap();
        let mh = MessageHeader::from(&h);
        let mut body = vec![0u8; mh.length as usize];
        peer.read_exact(&mut body).unwrap();
        (mh.stream_id, Request::decode(&body).unwrap())
    }

    pub(crate) fn health_reply(version: &str) -> Vec<u8> {
        let mut h = agent::HealthResponse::new();
        h.protocol_version = PROTOCOL_VERSION;
        h.agent_version = version.into();
        let mut res = Response::new();
        res.payload = h.write_to_bytes().unwrap();
        res.encode().unwrap()
    }

    pub(crate) fn send_frame(peer: &mut UnixStream, stream_id: u32, body: &[u8]) {
        let mh = MessageHeader::new_response(stream_id, body.len() as u32);
        let h: Vec<u8> = mh.into();
        peer.write_all(&h).unwrap();
        peer.write_all(body).unwrap();
    }

    /// Runs `script` as the agent on its own thread.
    fn agent_script(
        mut peer: UnixStream,
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<UnixStream> {
        std::thread::spawn(move || {
            script(&mut peer);
            peer
        })
    }

    /// Fails unless `f` returns within the call deadline plus slack.
    fn within_deadline<T>(f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        assert!(
            start.elapsed() < TIMEOUT + Duration::from_secs(2),
            "call took {:?}",
            start.elapsed()
        );
        out
    }

    fn vm_size_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn a_connection_closed_before_the_first_answer_says_so() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        match Agent::new(ours, TIMEOUT) {
            Err(Error::AgentClosed(_)) => {}
            Err(e) => panic!("not reported as closed: {e}"),
            Ok(_) => panic!("a closed connection passed the health check"),
        }
    }

    #[test]
    fn honest_agent_answers() {
        let (mut agent, peer) = pair();
        agent.timeout = PATIENT;
        let t = agent_script(peer, |p| {
            let (id, req) = read_request(p);
            assert_eq!(req.method, "Health");
            send_frame(p, id, &health_reply("ok"));
        });
        assert_eq!(agent.health().unwrap().agent_version, "ok");
        t.join().unwrap();
    }

    #[test]
    fn no_reply_times_out_with_a_clear_error() {
        let (agent, peer) = pair();
        let t = agent_script(peer, |p| {
            read_request(p);
            std::thread::sleep(TIMEOUT * 3);
        });
        let err = within_deadline(|| agent.health()).unwrap_err().to_string();
        assert!(
            err.contains("Health") && err.contains("did not answer"),
            "{err}"
        );
        t.join().unwrap();
    }

    #[test]
    fn reply_with_a_bogus_stream_id_is_ignored() {
        let (mut agent, peer) = pair();
        agent.timeout = PATIENT;
        let t = agent_script(peer, |p| {
            let (id, _) = read_request(p);
            // Unknown ids (never asked, and even: client ids are odd) and
            // then the real answer.
            for bogus in [id + 2, id + 1, 0, u32::MAX] {
                send_frame(p, bogus, &health_reply("bogus"));
            }
            send_frame(p, id, &health_reply("real"));
        });
        assert_eq!(agent.health().unwrap().agent_version, "real");
        t.join().unwrap();
    }

    #[test]
    fn only_a_bogus_stream_id_times_out() {
        let (agent, peer) = pair();
        let t = agent_script(peer, |p| {
            let (id, _) = read_request(p);
            send_frame(p, id.wrapping_add(100), &health_reply("bogus"));
            std::thread::sleep(TIMEOUT * 3);
        });
        let err = within_deadline(|| agent.health()).unwrap_err().to_string();
        assert!(err.contains("did not answer"), "{err}");
        t.join().unwrap();
    }

    #[test]
    fn repeated_and_late_replies_do_not_answer_the_next_call() {
        let (mut agent, peer) = pair();
        let t = agent_script(peer, |p| {
            // First call: answered after its deadline, twice.
            let (first, _) = read_request(p);
            std::thread::sleep(TIMEOUT + Duration::from_millis(200));
            send_frame(p, first, &health_reply("late"));
            send_frame(p, first, &health_reply("late again"));
            // Second call: its own answer.
            let (second, _) = read_request(p);
            assert_ne!(first, second);
            send_frame(p, first, &health_reply("late a third time"));
            send_frame(p, second, &health_reply("second"));
        });
        assert!(within_deadline(|| agent.health()).is_err());
        agent.timeout = PATIENT;
        assert_eq!(agent.health().unwrap().agent_version, "second");
        t.join().unwrap();
    }

    #[test]
    fn out_of_order_replies_reach_their_callers() {
        let (mut agent, peer) = pair();
        agent.timeout = PATIENT;
        let t = agent_script(peer, |p| {
            let a = read_request(p);
            let b = read_request(p);
            // Each reply carries the id of the request it answers, in the
            // agent version; answered in reverse order.
            for (id, _) in [b, a] {
                send_frame(p, id, &health_reply(&id.to_string()));
            }
        });
        let (a2, b2) = (agent.clone(), agent.clone());
        let h1 = std::thread::spawn(move || a2.health().map(|h| h.agent_version));
        let h2 = std::thread::spawn(move || b2.health().map(|h| h.agent_version));
        let (v1, v2) = (h1.join().unwrap(), h2.join().unwrap());
        let (v1, v2) = (v1.unwrap(), v2.unwrap());
        assert_ne!(v1, v2, "two calls got the same reply");
        t.join().unwrap();
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        let (agent, peer) = pair();
        let before = vm_size_kib();
        let t = agent_script(peer, move |p| {
            let (id, _) = read_request(p);
            // Claims 4 GiB and sends a little of it.
            let mh = MessageHeader::new_response(id, u32::MAX - 16);
            let h: Vec<u8> = mh.into();
            p.write_all(&h).unwrap();
            p.write_all(&[0u8; 4096]).unwrap();
            std::thread::sleep(TIMEOUT);
            let grown = vm_size_kib().saturating_sub(before);
            assert!(grown < 512 * 1024, "address space grew by {grown} KiB");
            std::thread::sleep(TIMEOUT * 2);
        });
        assert!(within_deadline(|| agent.health()).is_err());
        t.join().unwrap();
    }

    #[test]
    fn oversized_reply_is_an_agent_error_and_the_connection_survives() {
        let (mut agent, peer) = pair();
        agent.timeout = PATIENT;
        let t = agent_script(peer, |p| {
            let (id, _) = read_request(p);
            let body = vec![0u8; MESSAGE_LENGTH_MAX + 1];
            send_frame(p, id, &body);
            let (id, _) = read_request(p);
            send_frame(p, id, &health_reply("after"));
        });
        match agent.health() {
            Err(Error::Agent(m)) => assert!(m.contains("too large"), "{m}"),
            other => panic!("expected an agent error, got {other:?}"),
        }
        assert_eq!(agent.health().unwrap().agent_version, "after");
        t.join().unwrap();
    }

    #[test]
    fn garbage_replies_are_errors() {
        let (agent, peer) = pair();
        let t = agent_script(peer, |p| {
            // Not a ttrpc Response at all.
            let (id, _) = read_request(p);
            send_frame(p, id, &[0xff; 64]);
            // A Response whose payload is not a HealthResponse.
            let (id, _) = read_request(p);
            let mut res = Response::new();
            res.payload = vec![0xff; 64];
            send_frame(p, id, &res.encode().unwrap());
            // A frame that is not a response, on the call's stream.
            let (id, _) = read_request(p);
            let mh = MessageHeader::new_request(id, 4);
            let h: Vec<u8> = mh.into();
            p.write_all(&h).unwrap();
            p.write_all(&[1, 2, 3, 4]).unwrap();
            // Random bytes where a header should be; then hang up.
            read_request(p);
            p.write_all(&[0x5a; 37]).unwrap();
        });
        for _ in 0..4 {
            assert!(within_deadline(|| agent.health()).is_err());
        }
        t.join().unwrap();
    }

    #[test]
    fn hangup_fails_pending_and_later_calls_promptly() {
        let (agent, mut peer) = pair();
        // The agent reads the request and is gone.
        let t = std::thread::spawn(move || {
            read_request(&mut peer);
        });
        // The pending call fails...
        let err = within_deadline(|| agent.health()).unwrap_err().to_string();
        assert!(!err.contains("did not answer"), "{err}");
        t.join().unwrap();
        // ...and so do later ones, even without a deadline.
        let start = Instant::now();
        assert!(agent.wait_process("c", "").is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn half_closed_agent_does_not_hang_a_call_without_deadline() {
        let (agent, peer) = pair();
        // The agent stops sending (EOF for the client) but keeps reading.
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(agent.wait_process("c", "").is_err());
        });
        let failed = rx.recv_timeout(Duration::from_secs(3));
        drop(peer);
        assert_eq!(failed, Ok(true), "WaitProcess hung on a dead connection");
    }

    #[test]
    fn wait_process_is_renewed_after_each_slice() {
        let (agent, mut peer) = pair();
        // Answers by request count until the client hangs up: nothing,
        // then the server's own deadline answer, then the exit (to every
        // later request too: a loaded machine may renew more often).
        let t = std::thread::spawn(move || {
            let mut n = 0;
            loop {
                let mut h = [0u8; MESSAGE_HEADER_LENGTH];
                if peer.read_exact(&mut h).is_err() {
                    return n;
                }
                let mh = MessageHeader::from(&h);
                let mut body = vec![0u8; mh.length as usize];
                peer.read_exact(&mut body).unwrap();
                assert_eq!(Request::decode(&body).unwrap().method, "WaitProcess");
                n += 1;
                let mut res = Response::new();
                match n {
                    1 => continue,
                    2 => {
                        let mut status = thaw_agent_protocol::ttrpc::proto::Status::new();
                        status.set_code(Code::DEADLINE_EXCEEDED);
                        res.set_status(status);
                    }
                    _ => {
                        let mut w = agent::WaitProcessResponse::new();
                        w.exit_status = 7;
                        res.payload = w.write_to_bytes().unwrap();
                    }
                }
                let _ = peer.write_all(&{
                    let body = res.encode().unwrap();
                    let mut f: Vec<u8> =
                        MessageHeader::new_response(mh.stream_id, body.len() as u32).into();
                    f.extend_from_slice(&body);
                    f
                });
            }
        });
        assert_eq!(agent.wait_process("c", "").unwrap().exit_status, 7);
        drop(agent);
        assert!(t.join().unwrap() >= 3);
    }
}
