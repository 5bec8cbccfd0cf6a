//! The ttrpc service, served on connections the agent dials to the host.
//!
//! ttrpc's async server takes its connections from any stream of sockets,
//! so instead of listening, the agent hands it a stream that dials the host
//! control port, yields the connection, waits until ttrpc drops it, and dials
//! again. The host only ever accepts; a new connection means "agent ready"
//! (at boot, after a snapshot restore reset vsock, after a shim restart).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use thaw_agent_protocol::agent::*;
use thaw_agent_protocol::agent_ttrpc_async::{create_agent, Agent};
use thaw_agent_protocol::PROTOCOL_VERSION;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::sync::oneshot;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::TtrpcContext;

use crate::error::{Error, Result};
use crate::guest;
use crate::host::HostAddr;
use crate::runtime::Runtime;

/// The control connection, which tells the dialer when it is dropped.
pub struct ControlStream {
    inner: Inner,
    _closed: oneshot::Sender<()>,
}

enum Inner {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Unix(s) => Pin::new(s).poll_flush(cx),
            Inner::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

async fn connect(host: &HostAddr, port: u32) -> io::Result<Inner> {
    match host {
        HostAddr::Vsock { cid } => Ok(Inner::Vsock(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, port)).await?,
        )),
        HostAddr::Unix { prefix } => {
            let path = thaw_agent_protocol::transport::host_socket_path(prefix, port);
            Ok(Inner::Unix(tokio::net::UnixStream::connect(path).await?))
        }
    }
}

/// Dials `port` until it connects, backing off from 1 ms to 1 s.
async fn dial_until_connected(host: &HostAddr, port: u32) -> Inner {
    let mut delay = Duration::from_millis(1);
    let mut last_log: Option<Instant> = None;
    loop {
        match connect(host, port).await {
            Ok(s) => {
                log::info!("control connection to {} established", host.describe(port));
                return s;
            }
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    log::info!("dialing {}: {e}; retrying", host.describe(port));
                    last_log = Some(Instant::now());
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A second handle on a vsock control connection that wakes on socket
/// errors. A transport reset (every snapshot restore) only sets EPOLLERR on
/// the guest's socket; tokio wakes a reader on readable or read-closed, not
/// on errors, so ttrpc's read would wait forever and the agent would never
/// dial again.
fn reset_watch(inner: &Inner) -> Option<AsyncFd<OwnedFd>> {
    let Inner::Vsock(s) = inner else {
        // A reset Unix socket reports a hang-up, which readers do see.
        return None;
    };
    let watch = s.as_fd().try_clone_to_owned().and_then(|fd| {
        // SAFETY: an OwnedFd stays open and unchanged until the AsyncFd
        // that owns it is dropped.
        unsafe { AsyncFd::register_with_interest(fd, Interest::ERROR) }.map_err(io::Error::from)
    });
    match watch {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("cannot watch the control connection for resets: {e}");
            None
        }
    }
}

/// Resolves when ttrpc has dropped the connection. On a socket error it
/// shuts the socket down first: the hang-up wakes ttrpc's reader, which
/// then drops the connection.
async fn wait_closed(mut closed: oneshot::Receiver<()>, watch: Option<AsyncFd<OwnedFd>>) {
    if let Some(fd) = watch {
        tokio::select! {
            _ = &mut closed => return,
            ready = fd.ready(Interest::ERROR) => {
                if ready.is_ok() {
                    log::info!("control connection reset; closing it");
                    let _ = nix::sys::socket::shutdown(
                        fd.as_raw_fd(),
                        nix::sys::socket::Shutdown::Both,
                    );
                }
            }
        }
        // Dropped before waiting: this handle alone would keep the socket open.
        drop(fd);
    }
    let _ = closed.await;
}

type Previous = Option<(oneshot::Receiver<()>, Option<AsyncFd<OwnedFd>>)>;

/// A ttrpc listener that dials out, one connection at a time.
pub fn dialing_listener(host: HostAddr, port: u32) -> Listener {
    let stream = futures::stream::unfold(
        (host, Previous::None),
        move |(host, previous): (HostAddr, Previous)| async move {
            if let Some((closed, watch)) = previous {
                wait_closed(closed, watch).await;
                log::info!("control connection closed; dialing again");
            }
            let inner = dial_until_connected(&host, port).await;
            let watch = reset_watch(&inner);
            let (tx, rx) = oneshot::channel();
            let conn = ControlStream { inner, _closed: tx };
            Some((Ok::<_, io::Error>(conn), (host, Some((rx, watch)))))
        },
    );
    Listener::new(stream)
}

pub struct AgentService {
    rt: Arc<Runtime>,
}

/// Runs blocking runtime work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ttrpc::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| {
            log::info!("request failed: {e}");
            e.into()
        }),
        Err(e) => Err(Error::Internal(format!("worker failed: {e}")).into()),
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn health(&self, _: &TtrpcContext, _: HealthRequest) -> ttrpc::Result<HealthResponse> {
        let mut r = HealthResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.protocol_version = PROTOCOL_VERSION;
        r.uptime_ns = guest::boottime_ns();
        r.pid1 = self.rt.config().pid1;
        (r.hostname, r.machine_id) = guest::identity();
        Ok(r)
    }

    async fn set_identity(
        &self,
        _: &TtrpcContext,
        req: SetIdentityRequest,
    ) -> ttrpc::Result<Empty> {
        let pid1 = self.rt.config().pid1;
        blocking(move || guest::set_identity(&req.hostname, &req.machine_id, pid1)).await?;
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        let pid1 = self.rt.config().pid1;
        blocking(move || crate::network::configure(&req, pid1)).await?;
        Ok(Empty::new())
    }

    async fn mount_share(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        let pid1 = self.rt.config().pid1;
        blocking(move || crate::share::mount_share(pid1)).await?;
        Ok(Empty::new())
    }

    async fn mount_ephemeral(
        &self,
        _: &TtrpcContext,
        req: MountEphemeralRequest,
    ) -> ttrpc::Result<Empty> {
        let pid1 = self.rt.config().pid1;
        let e = crate::ephemeral::Ephemeral::parse(&req.name, req.size_bytes, req.mode)?;
        blocking(move || crate::ephemeral::mount_ephemeral(&e, pid1)).await?;
        Ok(Empty::new())
    }

    async fn forward_port(
        &self,
        _: &TtrpcContext,
        req: ForwardPortRequest,
    ) -> ttrpc::Result<Empty> {
        let host = self.rt.config().host.clone();
        blocking(move || crate::forward::forward(&host, req.port, req.host_port)).await?;
        Ok(Empty::new())
    }

    async fn set_time(&self, _: &TtrpcContext, req: SetTimeRequest) -> ttrpc::Result<Empty> {
        let pid1 = self.rt.config().pid1;
        blocking(move || guest::set_time(req.unix_time_ns, pid1)).await?;
        Ok(Empty::new())
    }

    async fn add_entropy(&self, _: &TtrpcContext, req: AddEntropyRequest) -> ttrpc::Result<Empty> {
        blocking(move || guest::add_entropy(&req.data)).await?;
        Ok(Empty::new())
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.create_sandbox(&req)).await?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.destroy_sandbox(&req.sandbox_id)).await?;
        Ok(Empty::new())
    }

    async fn mount_rootfs(
        &self,
        _: &TtrpcContext,
        req: MountRootfsRequest,
    ) -> ttrpc::Result<MountRootfsResponse> {
        let rt = self.rt.clone();
        let path = blocking(move || {
            let r = req
                .rootfs
                .as_ref()
                .ok_or_else(|| Error::InvalidRequest("rootfs is required".into()))?;
            rt.mount_rootfs(&req.container_id, r)
        })
        .await?;
        let mut r = MountRootfsResponse::new();
        r.path = path.to_string_lossy().into_owned();
        Ok(r)
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let rt = self.rt.clone();
        let pid = blocking(move || rt.create_container(&req)).await?;
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let rt = self.rt.clone();
        let pid = blocking(move || rt.exec_process(&req)).await?;
        let mut r = ExecProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_process(
        &self,
        _: &TtrpcContext,
        req: StartProcessRequest,
    ) -> ttrpc::Result<StartProcessResponse> {
        let rt = self.rt.clone();
        let pid = blocking(move || rt.start_process(&req.container_id, &req.exec_id)).await?;
        let mut r = StartProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.signal_process(&req.container_id, &req.exec_id, req.signal, req.all))
            .await?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let proc = self
            .rt
            .process_handle(&req.container_id, &req.exec_id)
            .map_err(ttrpc::Error::from)?;
        let mut rx = proc.subscribe();
        let info = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Error::Internal("process record dropped".into()))?
            .ok_or_else(|| Error::Internal("exit missing".into()))?;
        let mut r = WaitProcessResponse::new();
        r.exit_status = info.status;
        r.exited_at_unix_ns = info.unix_ns();
        r.termination_message = proc.termination_message();
        Ok(r)
    }

    async fn delete_process(
        &self,
        _: &TtrpcContext,
        req: DeleteProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.delete_process(&req.container_id, &req.exec_id)).await?;
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.remove_container(&req.container_id)).await?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.update(&req.container_id, &req.resources_json)).await?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.pause(&req.container_id, true)).await?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.pause(&req.container_id, false)).await?;
        Ok(Empty::new())
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.resize_tty(&req.container_id, &req.exec_id, req.width, req.height))
            .await?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        let rt = self.rt.clone();
        blocking(move || rt.close_stdin(&req.container_id, &req.exec_id)).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsResponse> {
        let rt = self.rt.clone();
        blocking(move || rt.stats(&req.container_id)).await
    }

    async fn list_pids(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        let rt = self.rt.clone();
        let procs = blocking(move || rt.pids(&req.container_id)).await?;
        let mut r = ListPidsResponse::new();
        r.processes = procs;
        Ok(r)
    }

    async fn get_events(
        &self,
        _: &TtrpcContext,
        req: GetEventsRequest,
    ) -> ttrpc::Result<GetEventsResponse> {
        let timeout = Duration::from_millis(u64::from(req.timeout_ms.min(600_000)));
        Ok(self.rt.events.get(req.after_seq, timeout).await)
    }
}

/// Serves the agent API forever on connections dialed to `port`.
pub async fn serve(rt: Arc<Runtime>, port: u32) -> Result<()> {
    let host = rt.config().host.clone();
    let service: Arc<dyn Agent + Send + Sync> = Arc::new(AgentService { rt });
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(dialing_listener(host, port))
        .register_service(create_agent(service));
    server
        .start()
        .await
        .map_err(|e| Error::Internal(format!("starting ttrpc server: {e}")))?;
    // start() returns once the accept loop runs; it never ends by itself.
    std::future::pending::<()>().await;
    Ok(())
}
