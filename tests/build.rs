//! Turns THAW_E2E_VM=1 into the `thaw_e2e_vm` cfg, so tests through real
//! VMs show up as "ignored" with the reason when it is not set.
fn main() {
    println!("cargo:rerun-if-env-changed=THAW_E2E_VM");
    println!("cargo:rustc-check-cfg=cfg(thaw_e2e_vm)");
    if std::env::var("THAW_E2E_VM").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=thaw_e2e_vm");
    }
}
