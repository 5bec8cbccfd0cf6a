//! Generates the protobuf messages and the ttrpc client/server code from
//! proto/agent.proto with the pure-Rust codegen (no protoc needed).
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize};

/// A failed build step, with what was being done; cargo prints it.
type Result<T> = std::result::Result<T, String>;

fn generate(out: &Path, customize: Customize) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    Codegen::new()
        .out_dir(out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(customize)
        .run()
        .map_err(|e| format!("ttrpc codegen of proto/agent.proto: {e}"))?;
    // Inner attributes and inner doc comments are not allowed in a file
    // pulled in with include!(); lib.rs puts the allows on the modules.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading generated {}: {e}", path.display()))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n"))
            .map_err(|e| format!("rewriting generated {}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    generate(&out.join("sync"), Customize::default())?;
    if std::env::var_os("CARGO_FEATURE_ASYNC").is_some() {
        generate(
            &out.join("async"),
            Customize {
                async_all: true,
                ..Default::default()
            },
        )?;
    }
    Ok(())
}
