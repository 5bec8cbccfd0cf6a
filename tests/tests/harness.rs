//! Checks of the test harness itself, against runc: the offline busybox
//! image imports and runs, and the private containerd leaves nothing behind.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::{Backend, PrivateContainerd};

#[test]
fn busybox_image_runs_under_runc() {
    let dir;
    {
        let c = PrivateContainerd::start(Backend::Host);
        dir = c.dir().to_path_buf();
        c.import_busybox();
        let id = c.new_id("runc");
        let out = c.ctr(&[
            "run",
            "--rm",
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            "echo hello-from-busybox; exit 3",
        ]);
        assert_eq!(out.code(), Some(3), "{}", out.describe());
        assert!(
            out.stdout.contains("hello-from-busybox"),
            "{}",
            out.describe()
        );
        assert!(c.leaks(Duration::from_secs(5)).is_empty());
    }
    assert!(!dir.exists(), "private containerd dir was not removed");
}
