//! A CRI client for the end-to-end tests, the way kubelet talks to
//! containerd: CRI v1 over gRPC on containerd's Unix socket (the `k8s-cri`
//! crate's tonic client, driven from a private tokio runtime so that tests
//! stay synchronous), and the streaming server's WebSocket protocol
//! (`v4.channel.k8s.io`) for Exec and Attach.

use std::future::Future;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;

pub use k8s_cri::v1 as api;

/// A connection to a CRI server. Every call has a deadline, sent to the
/// server as the gRPC timeout (as kubelet's `--runtime-request-timeout`
/// is) and enforced here too.
#[derive(Clone)]
pub struct Cri {
    rt: Arc<tokio::runtime::Runtime>,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

macro_rules! rpcs {
    ($($(#[$doc:meta])* $client:ident . $name:ident($req:ident) -> $resp:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self, req: api::$req) -> Result<api::$resp, Status> {
                let mut c = self.$client.clone();
                self.call(move |r| async move { c.$name(r).await }, req)
            }
        )*
    };
}

impl Cri {
    /// Connects to the CRI server on the Unix socket `socket`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is not used: every connection dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connecting to CRI at {}: {e}", socket.display()))?;
        Ok(Cri {
            rt: Arc::new(rt),
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout,
        })
    }

    /// The pod sandbox ("pause") image CRI is configured with, from a
    /// verbose Status reply's `info.config`.
    pub fn sandbox_image(status: &api::StatusResponse) -> Result<String, String> {
        let config: serde_json::Value = serde_json::from_str(
            status
                .info
                .get("config")
                .map(String::as_str)
                .unwrap_or("{}"),
        )
        .map_err(|e| format!("CRI Status info.config is not JSON: {e}"))?;
        config["sandboxImage"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "CRI Status info.config has no sandboxImage".to_string())
    }

    /// The same connection with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> Cri {
        Cri {
            timeout,
            ..self.clone()
        }
    }

    fn call<Q, T, F, Fut>(&self, f: F, req: Q) -> Result<T, Status>
    where
        F: FnOnce(Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut r = Request::new(req);
        r.set_timeout(self.timeout);
        let limit = self.timeout + Duration::from_secs(5);
        self.rt.block_on(async move {
            match tokio::time::timeout(limit, f(r)).await {
                Ok(res) => res.map(Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {limit:?} (client side)"
                ))),
            }
        })
    }

    rpcs! {
        runtime.version(VersionRequest) -> VersionResponse;
        runtime.status(StatusRequest) -> StatusResponse;
        runtime.run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        runtime.stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        runtime.remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        runtime.pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        runtime.list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        runtime.create_container(CreateContainerRequest) -> CreateContainerResponse;
        runtime.start_container(StartContainerRequest) -> StartContainerResponse;
        runtime.stop_container(StopContainerRequest) -> StopContainerResponse;
        runtime.remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        runtime.list_containers(ListContainersRequest) -> ListContainersResponse;
        runtime.container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        runtime.update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        runtime.reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        runtime.exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        runtime.exec(ExecRequest) -> ExecResponse;
        runtime.attach(AttachRequest) -> AttachResponse;
        runtime.port_forward(PortForwardRequest) -> PortForwardResponse;
        runtime.container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        runtime.list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        images.image_status(ImageStatusRequest) -> ImageStatusResponse;
        images.list_images(ListImagesRequest) -> ListImagesResponse;
    }
}

/// The channels of the `v4.channel.k8s.io` protocol: every binary message
/// starts with one of these bytes.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;

/// The subprotocol containerd's streaming server (kubelet's) speaks.
pub const STREAM_PROTOCOL: &str = "v4.channel.k8s.io";

/// What a streaming session received.
#[derive(Debug, Default, Clone)]
pub struct StreamOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel: a JSON `metav1.Status`; for exec it carries the
    /// exit code (`Success`, or `NonZeroExitCode` with the code in
    /// `details.causes`).
    pub error: String,
    /// Channel 0 from the server: in a port-forward session, the first
    /// port's data (after the 2-byte port number the server sends first).
    pub port_data: Vec<u8>,
    /// Whether the server closed the stream.
    pub closed: bool,
}

impl StreamOutput {
    /// The exit code the error channel reports (0 for `Success`).
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.error).ok()?;
        if v.get("status").and_then(|s| s.as_str()) == Some("Success") {
            return Some(0);
        }
        v.pointer("/details/causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .parse()
            .ok()
    }
}

/// A WebSocket session with the CRI streaming server (an Exec or Attach
/// URL), as `kubectl exec`/`kubectl attach` open it through the API server.
pub struct Stream {
    ws: tungstenite::WebSocket<TcpStream>,
    pub out: StreamOutput,
}

impl Stream {
    /// Opens the URL CRI's Exec or Attach returned (`http://host:port/...`).
    pub fn open(url: &str, timeout: Duration) -> Result<Stream, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("not an http:// URL: {url}"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let tcp = TcpStream::connect(hostport).map_err(|e| format!("connect {hostport}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut req = format!("ws://{rest}")
            .into_client_request()
            .map_err(|e| format!("request for {url}: {e}"))?;
        let h = req.headers_mut();
        h.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(STREAM_PROTOCOL),
        );
        let origin = HeaderValue::from_str(&format!("http://{hostport}"))
            .map_err(|e| format!("origin header: {e}"))?;
        h.insert("Origin", origin);
        let deadline = Instant::now() + timeout;
        let mut handshake = tungstenite::client(req, tcp);
        let (ws, resp) = loop {
            match handshake {
                Ok(ok) => break ok,
                Err(tungstenite::HandshakeError::Interrupted(mid)) => {
                    if Instant::now() > deadline {
                        return Err(format!("WebSocket handshake with {url} timed out"));
                    }
                    handshake = mid.handshake();
                }
                Err(tungstenite::HandshakeError::Failure(e)) => {
                    return Err(format!("WebSocket handshake with {url}: {e}"));
                }
            }
        };
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if proto != STREAM_PROTOCOL {
            return Err(format!(
                "the streaming server chose subprotocol {proto:?}, not {STREAM_PROTOCOL}"
            ));
        }
        Ok(Stream {
            ws,
            out: StreamOutput::default(),
        })
    }

    /// Sends `data` to the process's stdin.
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), String> {
        let mut m = Vec::with_capacity(data.len() + 1);
        m.push(STDIN);
        m.extend_from_slice(data);
        self.ws
            .send(Message::Binary(m.into()))
            .map_err(|e| format!("sending stdin: {e}"))
    }

    /// Reads until `done` holds for what arrived, the server closes the
    /// stream, or `timeout` passes (an error).
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&StreamOutput) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !done(&self.out) {
            if self.out.closed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "stream: nothing conclusive within {timeout:?}; so far stdout {:?}, stderr {:?}, error {:?}",
                    String::from_utf8_lossy(&self.out.stdout),
                    String::from_utf8_lossy(&self.out.stderr),
                    self.out.error
                ));
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => self.take(&b),
                Ok(Message::Text(t)) => self.take(t.as_bytes()),
                Ok(Message::Close(_)) => self.out.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => self.out.closed = true,
                Err(e) => return Err(format!("stream: {e}")),
            }
        }
        Ok(())
    }

    /// Reads until the server closes the stream.
    pub fn read_to_end(&mut self, timeout: Duration) -> Result<(), String> {
        self.read_until(timeout, |o| o.closed)
    }

    fn take(&mut self, msg: &[u8]) {
        let Some((&ch, data)) = msg.split_first() else {
            return;
        };
        match ch {
            STDIN => self.out.port_data.extend_from_slice(data),
            STDOUT => self.out.stdout.extend_from_slice(data),
            STDERR => self.out.stderr.extend_from_slice(data),
            ERROR => self.out.error.push_str(&String::from_utf8_lossy(data)),
            _ => {}
        }
    }

    /// Closes the session from this side (as a client that detaches).
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_from_the_error_channel() {
        let ok = StreamOutput {
            error: r#"{"metadata":{},"status":"Success"}"#.into(),
            ..Default::default()
        };
        assert_eq!(ok.exit_code(), Some(0));
        let failed = StreamOutput {
            error: r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#.into(),
            ..Default::default()
        };
        assert_eq!(failed.exit_code(), Some(3));
        assert_eq!(StreamOutput::default().exit_code(), None);
    }
}
