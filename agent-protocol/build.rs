//! Generates the protobuf messages and the ttrpc client/server code from
//! proto/agent.proto with the pure-Rust codegen (no protoc needed).
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize};

fn generate(out: &Path, customize: Customize) {
    std::fs::create_dir_all(out).expect("create codegen out dir");
    Codegen::new()
        .out_dir(out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(customize)
        .run()
        .expect("ttrpc codegen of proto/agent.proto");
    // Inner attributes and inner doc comments are not allowed in a file
    // pulled in with include!(); lib.rs puts the allows on the modules.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewrite generated file");
    }
}

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    generate(&out.join("sync"), Customize::default());
    if std::env::var_os("CARGO_FEATURE_ASYNC").is_some() {
        generate(
            &out.join("async"),
            Customize {
                async_all: true,
                ..Default::default()
            },
        );
    }
}
