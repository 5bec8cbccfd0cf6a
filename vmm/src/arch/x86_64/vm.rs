//! The VM-wide part of the x86 platform that KVM emulates: set up before
//! any vCPU exists (TSS and identity-map addresses, the in-kernel PIC and
//! IOAPIC, the PIT), and saved and restored with the kvmclock by a snapshot.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_err, layout, ArchError};

/// The interrupt controllers, the timer and the clock, as a snapshot
/// records them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Prepares a new VM for its vCPUs. The irqchip and PIT must exist before
/// any vCPU is created.
pub fn setup(vm: &VmFd) -> Result<(), ArchError> {
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// Reads the state of a VM whose vCPUs are paused.
pub fn save(vm: &VmFd) -> Result<VmState, ArchError> {
    let chip = |chip_id| -> Result<kvm_irqchip, ArchError> {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Loads a saved state into a VM set up by [`setup`], before its vCPUs are
/// restored.
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), ArchError> {
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    vm.set_clock(&clock_to_restore(&s.clock))
        .map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Without KVM_CLOCK_REALTIME (no flags at all) KVM takes the saved
/// kvmclock value as is: the guest's monotonic clock continues where it
/// stopped instead of jumping by the time the snapshot sat on disk.
fn clock_to_restore(saved: &kvm_clock_data) -> kvm_clock_data {
    kvm_clock_data {
        clock: saved.clock,
        flags: 0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_clock_is_the_saved_value_without_realtime() {
        let saved = kvm_clock_data {
            clock: 123_456_789,
            flags: kvm_bindings::KVM_CLOCK_REALTIME | kvm_bindings::KVM_CLOCK_TSC_STABLE,
            realtime: 1_700_000_000_000_000_000,
            host_tsc: 42,
            ..Default::default()
        };
        let c = clock_to_restore(&saved);
        assert_eq!(
            (c.clock, c.flags, c.realtime, c.host_tsc),
            (123_456_789, 0, 0, 0)
        );
    }

    /// A real KVM round trip: the interrupt controllers and the PIT come
    /// back as saved, and the guest's clock continues from the saved value
    /// instead of jumping by the time the state sat on disk.
    #[test]
    fn state_restored_into_a_new_vm_saves_back_the_same() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (the unit tests run on a KVM host)");
        let vm = kvm.create_vm().unwrap();
        setup(&vm).unwrap();
        // What a guest changes: an IOAPIC redirection entry, the PIC's mask.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut ioapic).unwrap();
        // SAFETY: KVM filled the `ioapic` member for this chip id.
        unsafe { ioapic.chip.ioapic.redirtbl[5].bits = 0x0000_0000_0000_a025 };
        vm.set_irqchip(&ioapic).unwrap();
        let saved = crate::devices::persist::through_state_file(&save(&vm).unwrap());
        // SAFETY: as above.
        let redir5 = |s: &VmState| unsafe { s.ioapic.chip.ioapic.redirtbl[5].bits };
        assert_eq!(redir5(&saved), 0xa025);

        std::thread::sleep(std::time::Duration::from_millis(300));
        let vm2 = kvm.create_vm().unwrap();
        setup(&vm2).unwrap();
        restore(&vm2, &saved).unwrap();
        let again = save(&vm2).unwrap();
        assert_eq!(redir5(&again), 0xa025);
        // The PIT's load times are host times, taken again on restore.
        let pit = |s: &VmState| {
            let mut p = s.pit;
            p.channels.iter_mut().for_each(|c| c.count_load_time = 0);
            p
        };
        assert_eq!(pit(&again), pit(&saved));
        let bytes = |c: &kvm_irqchip| serde_json::to_string(c).unwrap();
        assert_eq!(bytes(&again.pic_master), bytes(&saved.pic_master));
        assert_eq!(bytes(&again.pic_slave), bytes(&saved.pic_slave));
        let advanced = again.clock.clock - saved.clock.clock;
        assert!(
            advanced < 200_000_000,
            "the clock jumped {advanced} ns across a 300 ms pause"
        );
    }
}
