//! CNI where `ctr run --cni` looks for it: ctr reads its network from
//! `/etc/cni/net.d` and runs plugins from `/opt/cni/bin` (go-cni's
//! defaults, no flags to change them). [`DefaultCni`] puts a bridge
//! network there for one test and takes everything away again.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cmd;
use crate::cri::CNI_BIN_DIR;

const CONF_DIR: &str = "/etc/cni/net.d";
const BIN_DIR: &str = "/opt/cni/bin";

pub struct DefaultCni {
    pub bridge: String,
    /// The gateway address, the bridge's on the host.
    pub gateway: String,
    /// The first three octets of the subnet, with the dot.
    pub prefix: String,
    conf: PathBuf,
    made_conf_dir: bool,
    made_bin_dir: bool,
    ipam: tempfile::TempDir,
}

impl DefaultCni {
    /// A bridge network `bridge` on `10.<octet>.0.0/24` as the first of
    /// ctr's networks. Panics if the machine has CNI networks of its own
    /// there (the test would change what its containers get).
    pub fn install(bridge: &str, octet: u8) -> DefaultCni {
        let made_conf_dir = !Path::new(CONF_DIR).exists();
        fs::create_dir_all(CONF_DIR).unwrap();
        let others: Vec<String> = fs::read_dir(CONF_DIR)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            others.is_empty(),
            "{CONF_DIR} already holds CNI networks ({others:?}); this test would change them"
        );
        let made_bin_dir = !Path::new(BIN_DIR).exists();
        if made_bin_dir {
            fs::create_dir_all("/opt/cni").unwrap();
            std::os::unix::fs::symlink(CNI_BIN_DIR, BIN_DIR).unwrap();
        }
        let ipam = tempfile::tempdir().unwrap();
        let prefix = format!("10.{octet}.0.");
        let conf = Path::new(CONF_DIR).join("10-thaw-test.conflist");
        let json = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "thaw-test",
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam.path(),
                    "ranges": [[{"subnet": format!("{prefix}0/24")}]]
                }
            }]
        });
        fs::write(&conf, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
        DefaultCni {
            bridge: bridge.to_string(),
            gateway: format!("{prefix}1"),
            prefix,
            conf,
            made_conf_dir,
            made_bin_dir,
            ipam,
        }
    }

    /// Addresses host-local still has handed out (a leak if the container
    /// is gone).
    pub fn leased(&self) -> Vec<String> {
        let dir = self.ipam.path().join("thaw-test");
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for DefaultCni {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.conf);
        if self.made_conf_dir {
            let _ = fs::remove_dir(CONF_DIR);
            let _ = fs::remove_dir("/etc/cni");
        }
        if self.made_bin_dir {
            let _ = fs::remove_file(BIN_DIR);
            let _ = fs::remove_dir("/opt/cni");
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = cmd::run(
                Command::new("ip").args(["link", "del", &self.bridge]),
                Duration::from_secs(10),
            );
        }
    }
}
