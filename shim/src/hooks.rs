//! OCI hooks from a container's spec, run by the shim on the host.
//!
//! Hooks are host programs (nerdctl's networking is one: `nerdctl internal
//! oci-hook createRuntime` runs CNI in the namespace of the state's pid),
//! so they never reach the guest. Each runs in the host's namespaces with
//! the OCI state on stdin; the state's pid is the VMM's, whose network
//! namespace is the pod's. createRuntime, createContainer and the
//! deprecated prestart run once the VMM exists, before the container is
//! created in the guest; startContainer before its process starts;
//! poststart after; poststop when the container is deleted. A failing
//! hook before the start fails the create or start; after it, it is
//! logged (as runc does).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Bound on a hook without a timeout of its own: a hung hook must not
/// hold a create forever.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Hook {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// The spec's `hooks` object.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(default)]
    pub prestart: Vec<Hook>,
    #[serde(default)]
    pub create_runtime: Vec<Hook>,
    #[serde(default)]
    pub create_container: Vec<Hook>,
    #[serde(default)]
    pub start_container: Vec<Hook>,
    #[serde(default)]
    pub poststart: Vec<Hook>,
    #[serde(default)]
    pub poststop: Vec<Hook>,
}

/// Which point of the container's life a hook belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// prestart, createRuntime, createContainer.
    Create,
    StartContainer,
    Poststart,
    Poststop,
}

impl Stage {
    fn status(self) -> &'static str {
        match self {
            Stage::Create | Stage::StartContainer => "created",
            Stage::Poststart => "running",
            Stage::Poststop => "stopped",
        }
    }
}

/// The state a hook reads on stdin (OCI runtime spec, "State").
#[derive(Debug, Clone)]
pub struct HookState<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub pid: u32,
    pub bundle: &'a Path,
    pub annotations: &'a std::collections::HashMap<String, String>,
}

impl Hooks {
    /// The spec's hooks; a malformed `hooks` object is refused, naming the
    /// field.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Hooks> {
        let Some(h) = spec.get("hooks") else {
            return Ok(Hooks::default());
        };
        let hooks: Hooks = serde_json::from_value(h.clone())
            .map_err(|e| Error::InvalidSpec(format!("hooks: {e}")))?;
        for hook in hooks.all() {
            if !Path::new(&hook.path).is_absolute() {
                return Err(Error::InvalidSpec(format!(
                    "hooks: path {:?} is not absolute",
                    hook.path
                )));
            }
        }
        Ok(hooks)
    }

    fn all(&self) -> impl Iterator<Item = &Hook> {
        self.prestart
            .iter()
            .chain(&self.create_runtime)
            .chain(&self.create_container)
            .chain(&self.start_container)
            .chain(&self.poststart)
            .chain(&self.poststop)
    }

    fn stage(&self, stage: Stage) -> Vec<(&'static str, &Hook)> {
        let lists: Vec<(&'static str, &Vec<Hook>)> = match stage {
            Stage::Create => vec![
                ("prestart", &self.prestart),
                ("createRuntime", &self.create_runtime),
                ("createContainer", &self.create_container),
            ],
            Stage::StartContainer => vec![("startContainer", &self.start_container)],
            Stage::Poststart => vec![("poststart", &self.poststart)],
            Stage::Poststop => vec![("poststop", &self.poststop)],
        };
        lists
            .into_iter()
            .flat_map(|(name, hooks)| hooks.iter().map(move |h| (name, h)))
            .collect()
    }

    /// Runs the stage's hooks in order; the first failure stops them and
    /// is returned, naming the hook.
    pub fn run(&self, stage: Stage, state: &HookState) -> Result<()> {
        let hooks = self.stage(stage);
        if hooks.is_empty() {
            return Ok(());
        }
        let json = serde_json::json!({
            "ociVersion": state.oci_version,
            "id": state.id,
            "status": stage.status(),
            "pid": state.pid,
            "bundle": state.bundle,
            "annotations": state.annotations,
        });
        let input = serde_json::to_vec(&json)
            .map_err(|e| Error::Shim(format!("encoding the hook state: {e}")))?;
        for (name, hook) in hooks {
            run_one(name, hook, &input)?;
        }
        Ok(())
    }

    /// Runs a stage whose failure changes nothing (poststart, poststop):
    /// failures are logged.
    pub fn run_logged(&self, stage: Stage, state: &HookState) {
        if let Err(e) = self.run(stage, state) {
            log::warn!("{}: {e}", state.id);
        }
    }
}

fn run_one(stage: &str, hook: &Hook, input: &[u8]) -> Result<()> {
    let what = || format!("{stage} hook {}", hook.path);
    let mut cmd = Command::new(&hook.path);
    // args[0] is the program's name as the hook wants to see it.
    if let Some((first, rest)) = hook.args.split_first() {
        cmd.arg0(first);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in &hook.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let timeout = hook
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let out = crate::child::run_with_input(&mut cmd, Some(input.to_vec()), timeout)
        .map_err(|e| Error::Sandbox(format!("{}: {e}", what())))?;
    if out.code != 0 {
        return Err(Error::Sandbox(format!(
            "{} exited with status {}: {}",
            what(),
            out.code,
            crate::sandbox::last_lines(&out.stderr, 3)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn state<'a>(bundle: &'a Path, ann: &'a HashMap<String, String>) -> HookState<'a> {
        HookState {
            oci_version: "1.0.2",
            id: "c1",
            pid: 4242,
            bundle,
            annotations: ann,
        }
    }

    #[test]
    fn hooks_run_in_order_with_the_state_on_stdin() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let script = format!(
            "cat >> {}; echo \" $0 $X\" >> {}",
            out.display(),
            out.display()
        );
        let hook = |tag: &str| json!({"path": "/bin/sh", "args": ["sh", "-c", script, tag], "env": ["X=from-env"]});
        let spec = json!({"hooks": {
            "createRuntime": [hook("first")],
            "createContainer": [hook("second")],
            "poststop": [hook("never")]
        }});
        let hooks = Hooks::from_spec(&spec).unwrap();
        let ann = HashMap::from([("a".to_string(), "b".to_string())]);
        hooks.run(Stage::Create, &state(d.path(), &ann)).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"pid\":4242") && lines[0].contains("\"status\":\"created\""));
        // argv[0] is "sh"; after -c, the next argument becomes $0.
        assert!(lines[0].ends_with("} first from-env"), "{}", lines[0]);
        assert!(lines[1].ends_with("} second from-env"), "{}", lines[1]);
    }

    #[test]
    fn a_failing_or_hanging_hook_is_named() {
        let d = tempfile::tempdir().unwrap();
        let ann = HashMap::new();
        let spec = json!({"hooks": {"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}]}});
        let e = Hooks::from_spec(&spec)
            .unwrap()
            .run(Stage::StartContainer, &state(d.path(), &ann))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("startContainer hook /bin/sh")
                && e.contains("status 3")
                && e.contains("nope"),
            "{e}"
        );
        let spec = json!({"hooks": {"poststart": [
            {"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]}});
        let started = std::time::Instant::now();
        let e = Hooks::from_spec(&spec)
            .unwrap()
            .run(Stage::Poststart, &state(d.path(), &ann))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn malformed_hooks_are_refused() {
        let e = Hooks::from_spec(&json!({"hooks": {"poststop": [{"path": "relative"}]}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not absolute"), "{e}");
        let e = Hooks::from_spec(&json!({"hooks": {"poststop": [{"args": []}]}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hooks"), "{e}");
        assert_eq!(Hooks::from_spec(&json!({})).unwrap(), Hooks::default());
    }
}
