//! Publishes task events to containerd from one thread, in the order they
//! were queued, so TaskCreate < TaskStart < TaskExit and so on hold even
//! though RPC handlers and exit watchers run on different threads.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

enum Msg {
    Event(&'static str, Box<dyn MessageDyn>),
    Flush(Sender<()>),
}

/// Where events go: containerd, or (tests) a channel.
pub trait Sink: Send + 'static {
    fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String>;
}

/// containerd's event endpoint, reconnected when containerd restarted
/// (the old connection is dead then and every publish would fail).
pub struct ContainerdSink {
    address: String,
    publisher: std::cell::RefCell<Option<RemotePublisher>>,
}

impl ContainerdSink {
    pub fn new(address: String, publisher: RemotePublisher) -> Self {
        ContainerdSink {
            address,
            publisher: std::cell::RefCell::new(Some(publisher)),
        }
    }
}

impl Sink for ContainerdSink {
    fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        let mut slot = self.publisher.borrow_mut();
        if let Some(p) = slot.as_ref() {
            match p.publish(Context::default(), topic, namespace, event.clone_box()) {
                Ok(()) => return Ok(()),
                Err(e) => log::info!("publishing {topic}: {e}; reconnecting to containerd"),
            }
        }
        *slot = None;
        let p = RemotePublisher::new(&self.address).map_err(|e| e.to_string())?;
        let r = p
            .publish(Context::default(), topic, namespace, event)
            .map_err(|e| e.to_string());
        *slot = Some(p);
        r
    }
}

pub struct Events {
    tx: Mutex<Option<Sender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Events {
    pub fn new(sink: impl Sink, namespace: String) -> Events {
        let (tx, rx) = channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for m in rx {
                    match m {
                        Msg::Event(topic, ev) => {
                            if let Err(e) = sink.publish(topic, &namespace, ev) {
                                log::warn!("publishing {topic}: {e}");
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|e| log::error!("spawning the events thread: {e}"))
            .ok();
        Events {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
        }
    }

    pub fn publish(&self, topic: &'static str, event: impl MessageDyn) {
        if let Ok(g) = self.tx.lock() {
            if let Some(tx) = g.as_ref() {
                if tx.send(Msg::Event(topic, Box::new(event))).is_err() {
                    log::warn!("event {topic} dropped: publisher stopped");
                }
            }
        }
    }

    /// Waits until everything queued so far was sent (or `timeout`).
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = channel();
        let sent = self
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|t| t.send(Msg::Flush(tx)).is_ok()))
            .unwrap_or(false);
        if sent {
            let _ = rx.recv_timeout(timeout);
        }
    }

    /// Sends what is queued and stops the thread.
    pub fn close(&self, timeout: Duration) {
        self.flush(timeout);
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        let deadline = Instant::now() + timeout;
        if let Ok(mut t) = self.thread.lock() {
            if let Some(h) = t.take() {
                while !h.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if h.is_finished() {
                    let _ = h.join();
                }
            }
        }
    }
}
