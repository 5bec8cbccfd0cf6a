//! `thaw templates list|build|rm|gc`: the template store the shim restores
//! sandboxes from, at the configured `vm.template_store`.

use std::path::Path;
use std::process::Stdio;

use thaw_config::Config;
use thaw_snapshots::template::{Store, TemplateKey};
use thaw_vmm_api::VmmCommand;

use crate::error::Error;

/// Shape overrides for `build`; unset fields come from the config's `[vm]`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Shape {
    /// Guest vCPUs [default: vm.vcpus].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB [default: vm.memory_mib].
    #[arg(long, value_name = "N")]
    pub memory_mib: Option<u32>,
    /// Empty disk slots (containers per pod) [default: vm.spare_disks].
    #[arg(long, value_name = "N")]
    pub spare_disks: Option<u32>,
}

fn store(config: &Config) -> Store {
    Store::new(&config.vm.template_store).with_retry_after(std::time::Duration::from_secs(
        config.vm.template_retry_secs,
    ))
}

fn store_err(store: &Store) -> impl FnOnce(thaw_snapshots::Error) -> Error + '_ {
    move |source| Error::Store {
        store: store.root().to_path_buf(),
        source,
    }
}

/// Prints one line per template; an empty store says so on stderr, so
/// stdout stays one line per template for scripts.
pub fn list(config: &Config) -> Result<(), Error> {
    let store = store(config);
    let records = store.list().map_err(store_err(&store))?;
    if records.is_empty() {
        eprintln!("thaw: no templates in {}", store.root().display());
    }
    for rec in records {
        match rec {
            Ok(r) => println!("{}", r.summary()),
            Err(e) => println!("unreadable  {e}"),
        }
    }
    Ok(())
}

pub fn remove(config: &Config, key: &TemplateKey) -> Result<(), Error> {
    let store = store(config);
    store.remove(key).map_err(store_err(&store))?;
    println!("removed {key}");
    Ok(())
}

/// Removes stale templates, then keeps the store within
/// `vm.template_store_max_mib` as the shim's starts do (least recently
/// used first, never one a running VM holds).
pub fn gc(config: &Config) -> Result<(), Error> {
    let store = store(config);
    let removed = store.gc().map_err(store_err(&store))?;
    let max = config.vm.template_store_max_mib;
    let evicted = if max > 0 {
        store
            .evict_to(max.saturating_mul(1 << 20), None)
            .map_err(store_err(&store))?
    } else {
        Vec::new()
    };
    if removed.is_empty() && evicted.is_empty() {
        eprintln!("thaw: nothing to remove in {}", store.root().display());
    }
    for key in removed {
        println!("removed {key}");
    }
    for key in evicted {
        println!("evicted {key} (store over {max} MiB)");
    }
    Ok(())
}

/// Runs `thaw-vmm template build` for the configured shape, with the
/// options the shim uses, so the shim finds what this builds. The VMM's
/// progress (stderr) and the template's directory (stdout) pass through.
pub fn build(config: &Config, config_path: &Path, shape: &Shape) -> Result<(), Error> {
    let mut vm = config.vm.clone();
    vm.vcpus = shape.vcpus.unwrap_or(vm.vcpus);
    vm.memory_mib = shape.memory_mib.unwrap_or(vm.memory_mib);
    vm.spare_disks = shape.spare_disks.unwrap_or(vm.spare_disks);
    if !vm.templates {
        eprintln!(
            "thaw: note: vm.templates = false in {}: the shim cold-boots and will not use this template",
            config_path.display()
        );
    }
    eprintln!(
        "thaw: building the template for vcpus={} memory_mib={} spare_disks={} kernel={} root={} in {}",
        vm.vcpus,
        vm.memory_mib,
        vm.spare_disks,
        vm.kernel.display(),
        vm.root_image.display(),
        vm.template_store.display()
    );
    let status = VmmCommand::TemplateBuild(vm.template_build_args())
        .command(&vm.vmm)
        .stdin(Stdio::null())
        .status()
        .map_err(|source| Error::Spawn {
            vmm: vm.vmm.clone(),
            source,
        })?;
    if !status.success() {
        return Err(Error::BuildFailed {
            vmm: vm.vmm,
            status,
        });
    }
    Ok(())
}
