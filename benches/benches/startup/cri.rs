//! RunPodSandbox -> CreateContainer -> StartContainer -> running, through
//! containerd's CRI plugin as kubelet drives it: a pod with its own network
//! namespace on the harness's CNI bridge, one busybox container, for the
//! RuntimeClass handlers `runc` and `thaw` of `shim/README.md`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_cri::api::{self, ContainerState, NamespaceMode};
use thaw_cri::Cri;
use thaw_tests::cri::{CriSetup, CRI_NAMESPACE};
use thaw_tests::image::{build_image_tar, build_pause_image_tar, BUSYBOX_REF};
use thaw_tests::PrivateContainerd;

const POD_NS: &str = "thaw-bench";

pub struct CriBench<'a> {
    c: &'a PrivateContainerd,
    setup: &'a CriSetup,
    cri: Cri,
    seq: std::cell::Cell<u32>,
}

impl<'a> CriBench<'a> {
    /// Connects to containerd's CRI and imports the sandbox ("pause")
    /// image CRI is configured with and busybox into CRI's namespace.
    pub fn new(c: &'a PrivateContainerd, timeout: Duration) -> Result<CriBench<'a>, String> {
        let setup = c.cri.as_ref().ok_or("containerd was started without CRI")?;
        let cri = Cri::connect(&c.address, timeout)?;
        let status = cri
            .status(api::StatusRequest { verbose: true })
            .map_err(|e| format!("CRI Status: {e}"))?;
        let pause = Cri::sandbox_image(&status)?;
        let marker = c.marker.clone();
        c.import_image_in(CRI_NAMESPACE, &pause, |w| {
            build_pause_image_tar(w, &pause, &[marker.as_str()])
        });
        c.import_image_in(CRI_NAMESPACE, BUSYBOX_REF, |w| {
            build_image_tar(w, BUSYBOX_REF, false)
        });
        let me = CriBench {
            c,
            setup,
            cri,
            seq: std::cell::Cell::new(0),
        };
        for image in [pause.as_str(), BUSYBOX_REF] {
            me.wait_for_image(image)?;
        }
        Ok(me)
    }

    fn wait_for_image(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.cri.image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
                verbose: false,
            });
            if matches!(&seen, Ok(r) if r.image.is_some()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "CRI does not see the imported image {name}: {seen:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One pod start for `handler`, timed from RunPodSandbox until
    /// StartContainer returned, with the container then seen running.
    /// The pod is stopped and removed afterwards (not timed).
    pub fn pod_start(&self, handler: &str) -> Result<Duration, String> {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("start-{handler}-{n}");
        let uid = format!("{now:016x}-{n}");
        let log_dir: PathBuf = self.setup.log_root.join(format!("{POD_NS}_{name}_{uid}"));
        std::fs::create_dir_all(log_dir.join("c")).map_err(|e| format!("log dir: {e}"))?;
        let ns = api::NamespaceOption {
            network: NamespaceMode::Pod as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: POD_NS.into(),
                attempt: 0,
            }),
            log_directory: log_dir.display().to_string(),
            labels: HashMap::from([("io.kubernetes.pod.uid".to_string(), uid.clone())]),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.setup.pod_cgroup(&uid),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (k, v) = self
            .c
            .marker
            .split_once('=')
            .unwrap_or(("THAW_TEST_MARK", ""));
        let container = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: BUSYBOX_REF.into(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "100000".into()],
            envs: vec![api::KeyValue {
                key: k.into(),
                value: v.into(),
            }],
            log_path: "c/0.log".into(),
            linux: Some(api::LinuxContainerConfig {
                resources: None,
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };

        let started = Instant::now();
        let pod = self
            .cri
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
            .pod_sandbox_id;
        self.c.remember_id_in(CRI_NAMESPACE, &pod);
        let result = (|| {
            let id = self
                .cri
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(container),
                    sandbox_config: Some(config),
                })
                .map_err(|e| format!("CreateContainer: {}", e.message()))?
                .container_id;
            self.c.remember_id_in(CRI_NAMESPACE, &id);
            self.cri
                .start_container(api::StartContainerRequest {
                    container_id: id.clone(),
                })
                .map_err(|e| format!("StartContainer: {}", e.message()))?;
            let took = started.elapsed();
            let state = self
                .cri
                .container_status(api::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .map_err(|e| format!("ContainerStatus: {}", e.message()))?
                .status
                .map(|s| s.state);
            if state != Some(ContainerState::ContainerRunning as i32) {
                return Err(format!("container state {state:?} after StartContainer"));
            }
            Ok(took)
        })();
        let _ = self.cri.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        });
        let removed = self.cri.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        });
        let _ = std::fs::remove_dir_all(&log_dir);
        match (result, removed) {
            (Ok(_), Err(e)) => Err(format!("RemovePodSandbox: {}", e.message())),
            (r, _) => r,
        }
    }

    /// Pods still listed (a failed removal), removed the way kubelet
    /// would; returns how many were left.
    pub fn remove_leftovers(&self) -> usize {
        let Ok(l) = self
            .cri
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
        else {
            return 0;
        };
        let n = l.items.len();
        for p in l.items {
            let _ = self.cri.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            });
            let _ = self.cri.remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            });
        }
        n
    }
}
