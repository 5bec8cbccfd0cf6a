//! One vCPU's KVM state: how it starts at boot (CPUID, then the registers
//! `regs` sets up) and how a snapshot saves and restores it, in the order
//! KVM needs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::regs::{self, MSR_IA32_TSC};
use super::{cpuid, kvm_err, ArchError};

/// Set after MSR_IA32_TSC, or the deadline is computed against a stale TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Everything KVM holds for one vCPU, as a snapshot records it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// TSC first and TSC deadline last: the order `restore` sets them in.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// Puts vCPU `id` of `count` in its boot state: CPUID from what KVM
/// supports (normalized per vCPU), then MSRs, segments, registers, FPU and
/// LAPIC.
pub fn setup_boot(vcpu: &VcpuFd, supported: &CpuId, id: u8, count: u8) -> Result<(), ArchError> {
    let mut cpuid = supported.clone();
    cpuid::normalize(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    regs::setup_msrs(vcpu)?;
    regs::setup_sregs(vcpu)?;
    regs::setup_regs(vcpu, id == 0)?;
    regs::setup_fpu(vcpu)?;
    regs::setup_lapic(vcpu)
}

/// The MSRs a snapshot saves: every one KVM lists. Asked once per VM.
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, ArchError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Reads the state of a vCPU that is not running: MP state first (KVM
/// takes in a pending INIT or SIPI then), vCPU events last. `vm` is asked
/// how big the guest's XSAVE state is; `msr_indices` comes from
/// [`msr_index_list`].
pub fn save(vcpu: &VcpuFd, vm: &VmFd, msr_indices: &[u32]) -> Result<VcpuState, ArchError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    check_xsave_fits(vm.check_extension_int(Cap::Xsave2))?;
    let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(vcpu, msr_indices)?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Loads a saved state into a new vCPU. The order matters: CPUID, MP
/// state, regs, sregs, XSAVE, XCRs, debug regs, LAPIC, MSRs (TSC before
/// TSC deadline), vCPU events, then tell the guest's kvmclock it was
/// paused.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), ArchError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| ArchError::TooManyEntries {
        what: "CPUID",
        count: s.cpuid.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        // Hosts with another TSC frequency may refuse; the guest then sees
        // its clock rate change, which kvmclock tolerates.
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            log::warn!("KVM_SET_TSC_KHZ {khz}: {e}");
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: the buffer came from KVM_GET_XSAVE of the same size on a host
    // with the same CPU (checked by the snapshot's CPU fingerprint).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| ArchError::TooManyEntries {
        what: "MSR",
        count: s.msrs.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if let Some(refused) = s.msrs.get(set) {
        return Err(ArchError::MsrRefused(refused.index));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    // Fails when the guest has not enabled kvmclock: nothing to tell then.
    let _ = vcpu.kvmclock_ctrl();
    Ok(())
}

/// KVM_GET_XSAVE copies 4 KiB. A guest needs more only with dynamic XSAVE
/// features (AMX), which thaw never asks KVM to permit and hides from the
/// guest's CPUID; if a kernel hands them out anyway, refuse rather than
/// save a truncated FPU state. `needed` is KVM_CAP_XSAVE2 (0 when the
/// kernel predates it).
fn check_xsave_fits(needed: i32) -> Result<(), ArchError> {
    let room = std::mem::size_of::<kvm_xsave>();
    if usize::try_from(needed).unwrap_or(0) > room {
        return Err(ArchError::XsaveTooLarge { needed, room });
    }
    Ok(())
}

/// Reads every MSR KVM lists that it can actually read; KVM stops at the
/// first one it refuses, so that one is dropped and the rest retried.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, ArchError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| ArchError::TooManyEntries {
            what: "MSR",
            count: entries.len(),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read == wanted.len() {
            let mut out = msrs.as_slice().to_vec();
            restore_order(&mut out);
            return Ok(out);
        }
        wanted.remove(read);
    }
}

/// TSC first, TSC deadline last, the rest in KVM's order between them.
fn restore_order(msrs: &mut [kvm_msr_entry]) {
    msrs.sort_by_key(|e| match e.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_state_over_4k_is_refused_by_name() {
        assert!(
            check_xsave_fits(0).is_ok(),
            "kernels without KVM_CAP_XSAVE2"
        );
        assert!(check_xsave_fits(2696).is_ok());
        assert!(check_xsave_fits(4096).is_ok());
        let e = check_xsave_fits(11008).unwrap_err().to_string();
        assert!(e.contains("11008") && e.contains("AMX"), "{e}");
    }

    #[test]
    fn tsc_goes_first_and_its_deadline_last() {
        let msr = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs = [
            msr(MSR_IA32_TSC_DEADLINE),
            msr(0x174),
            msr(MSR_IA32_TSC),
            msr(0xc000_0080),
            msr(0x3b),
        ];
        restore_order(&mut msrs);
        let order: Vec<u32> = msrs.iter().map(|e| e.index).collect();
        assert_eq!(
            order,
            [
                MSR_IA32_TSC,
                0x174,
                0xc000_0080,
                0x3b,
                MSR_IA32_TSC_DEADLINE
            ]
        );
    }

    /// A real KVM round trip: two vCPUs set up for boot and changed the way
    /// a running guest changes them, saved, restored into a new VM, and
    /// saved again: what the new vCPUs hold is what the old ones held.
    #[test]
    fn state_restored_into_a_new_vm_saves_back_the_same() {
        let kvm = Kvm::new().expect("/dev/kvm (the unit tests run on a KVM host)");
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let msr_indices = msr_index_list(&kvm).unwrap();
        let new_vm = || {
            let vm = kvm.create_vm().unwrap();
            super::super::vm::setup(&vm).unwrap();
            vm
        };
        let vm = new_vm();
        let vcpus: Vec<VcpuFd> = (0..2u8)
            .map(|id| {
                let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
                setup_boot(&vcpu, &supported, id, 2).unwrap();
                vcpu
            })
            .collect();
        let mut regs = vcpus[0].get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x0100_0000;
        vcpus[0].set_regs(&regs).unwrap();
        const MSR_LSTAR: u32 = 0xc000_0082;
        let lstar = kvm_msr_entry {
            index: MSR_LSTAR,
            data: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        let set = vcpus[0].set_msrs(&Msrs::from_entries(&[lstar]).unwrap());
        assert_eq!(set.unwrap(), 1);
        let mut dr = vcpus[0].get_debug_regs().unwrap();
        dr.db[0] = 0x4000;
        vcpus[0].set_debug_regs(&dr).unwrap();

        let saved: Vec<VcpuState> = vcpus
            .iter()
            .map(|v| save(v, &vm, &msr_indices).unwrap())
            .collect();
        let saved = crate::devices::persist::through_state_file(&saved);
        assert_eq!(saved[0].regs.rax, 0x1234_5678);
        assert_eq!(
            saved[0].mp_state.mp_state,
            kvm_bindings::KVM_MP_STATE_RUNNABLE
        );
        assert_eq!(
            saved[1].mp_state.mp_state,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            "the second vCPU still waits for INIT/SIPI"
        );
        assert_eq!(saved[0].msrs.first().map(|e| e.index), Some(MSR_IA32_TSC));
        let msr = |s: &VcpuState, index| s.msrs.iter().find(|e| e.index == index).map(|e| e.data);
        assert_eq!(msr(&saved[0], MSR_LSTAR), Some(lstar.data));

        let vm2 = new_vm();
        for (id, s) in (0u64..).zip(&saved) {
            let vcpu = vm2.create_vcpu(id).unwrap();
            restore(&vcpu, s).unwrap();
            let again = save(&vcpu, &vm2, &msr_indices).unwrap();
            assert_eq!(again.cpuid, s.cpuid);
            assert_eq!(again.mp_state, s.mp_state);
            assert_eq!(again.regs, s.regs);
            assert_eq!(again.sregs, s.sregs);
            assert_eq!(again.xsave.region, s.xsave.region);
            assert_eq!(again.xcrs, s.xcrs);
            assert_eq!(again.debug_regs, s.debug_regs);
            assert_eq!(again.lapic, s.lapic);
            assert_eq!(again.events, s.events);
            // Every MSR comes back, the TSC where it was and still counting.
            let others = |m: &[kvm_msr_entry]| -> Vec<kvm_msr_entry> {
                m.iter()
                    .filter(|e| e.index != MSR_IA32_TSC)
                    .copied()
                    .collect()
            };
            assert_eq!(others(&again.msrs), others(&s.msrs));
            assert!(msr(&again, MSR_IA32_TSC) >= msr(s, MSR_IA32_TSC));
        }
    }
}
