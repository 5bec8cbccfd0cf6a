//! Guest CPUID: what KVM supports, normalized per vCPU (APIC ids, topology,
//! hypervisor bit, TSC-deadline) and with features a micro-VM does not need
//! removed.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TILE_INFO: u32 = 0x1d;
const LEAF_TMUL_INFO: u32 = 0x1e;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// AMX: leaf 7.0 EDX (BF16, TILE, INT8), leaf 7.1 EAX (FP16), 7.1 EDX
/// (COMPLEX), and the tile state components (17, 18) of XCR0.
const AMX_7_0_EDX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
const AMX_7_1_EAX: u32 = 1 << 21;
const AMX_7_1_EDX: u32 = 1 << 8;
const XCR0_AMX: u32 = (1 << 17) | (1 << 18);

/// Topology as the guest sees it: one socket, one thread per core.
fn core_bits(vcpus: u8) -> u32 {
    (vcpus as u32).next_power_of_two().trailing_zeros()
}

fn set_topology_level(e: &mut kvm_cpuid_entry2, vcpu: u8, vcpus: u8) {
    // Sub-leaf 0: SMT level, sub-leaf 1: core level, others: invalid.
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = 1 << 8;
        }
        1 => {
            e.eax = core_bits(vcpus);
            e.ebx = vcpus as u32;
            e.ecx = (2 << 8) | 1;
        }
        n => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = n;
        }
    }
    e.edx = vcpu as u32;
}

/// Patches `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu` of `vcpus`.
pub fn normalize(cpuid: &mut CpuId, vcpu: u8, vcpus: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((vcpu as u32) << 24) | ((vcpus as u32) << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads
                // sharing the cache - 1 (all cores share every level here).
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= ((vcpus as u32 - 1) << 26) | ((vcpus as u32 - 1) << 14);
                }
            }
            // No PMU: perf counters would only add MSR exits.
            LEAF_PERFMON => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // No AMX: its tile data is 8 KiB of XSAVE state that
            // KVM_GET_XSAVE (4 KiB) cannot hold, and a template with it
            // would only restore on AMX hosts.
            LEAF_EXT_FEATURES if e.index == 0 => e.edx &= !AMX_7_0_EDX,
            LEAF_EXT_FEATURES if e.index == 1 => {
                e.eax &= !AMX_7_1_EAX;
                e.edx &= !AMX_7_1_EDX;
            }
            LEAF_XSAVE if e.index == 0 => e.eax &= !XCR0_AMX,
            LEAF_XSAVE if e.index == 17 || e.index == 18 => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            LEAF_TILE_INFO | LEAF_TMUL_INFO => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => set_topology_level(e, vcpu, vcpus),
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits(vcpus) << 12) | (vcpus as u32 - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = vcpu as u32;
                e.ebx = vcpu as u32; // core id, one thread per core
                e.ecx = 0; // node 0
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_bits_are_set_per_vcpu() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_PERFMON, 0),
        ])
        .unwrap();
        cpuid.as_mut_slice()[3].eax = 0x1234;
        normalize(&mut cpuid, 2, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].eax, 0);
    }

    #[test]
    fn amx_is_hidden() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_EXT_FEATURES, 0),
            entry(LEAF_EXT_FEATURES, 1),
            entry(LEAF_XSAVE, 0),
            entry(LEAF_XSAVE, 18),
            entry(LEAF_TILE_INFO, 1),
        ])
        .unwrap();
        for e in cpuid.as_mut_slice().iter_mut() {
            (e.eax, e.ebx, e.ecx, e.edx) = (u32::MAX, u32::MAX, u32::MAX, u32::MAX);
        }
        normalize(&mut cpuid, 0, 1);
        let e = cpuid.as_slice();
        assert_eq!(e[0].edx & AMX_7_0_EDX, 0);
        assert_eq!(e[0].ebx, u32::MAX, "other leaf 7 features stay");
        assert_eq!((e[1].eax & AMX_7_1_EAX, e[1].edx & AMX_7_1_EDX), (0, 0));
        assert_eq!(e[2].eax, !XCR0_AMX, "AVX-512 etc. stay");
        assert_eq!((e[3].eax, e[3].ebx), (0, 0));
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx, e[4].edx), (0, 0, 0, 0));
    }
}
