//! Which host CPU a snapshot was taken on. Restoring vCPU state (CPUID,
//! XSAVE layout, MSRs) on a different CPU model can fail half-way or
//! misbehave later, so a mismatch is refused up front.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFingerprint {
    pub vendor: String,
    /// CPUID.1:EAX (family, model, stepping).
    pub signature: u32,
    /// CPUID.1:ECX/EDX and CPUID.7.0:EBX/ECX/EDX feature words.
    pub features: [u32; 5],
}

impl CpuFingerprint {
    /// The host this process runs on.
    #[cfg(target_arch = "x86_64")]
    pub fn host() -> Self {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let (v, l1, l7) = (__cpuid(0), __cpuid(1), __cpuid_count(7, 0));
        let mut vendor = Vec::with_capacity(12);
        for r in [v.ebx, v.edx, v.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        Self {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            signature: l1.eax,
            // Leaf 1 ECX bit 27 (OSXSAVE) and the APIC id bits in EBX vary
            // per boot/CPU, so they are left out.
            features: [l1.ecx & !(1 << 27), l1.edx, l7.ebx, l7.ecx, l7.edx],
        }
    }

    /// Why `self` (from a snapshot) cannot run on `host`, if it cannot.
    pub fn mismatch(&self, host: &Self) -> Option<String> {
        if self.vendor != host.vendor {
            return Some(format!(
                "CPU vendor {} != host {}",
                self.vendor, host.vendor
            ));
        }
        if self.signature != host.signature {
            return Some(format!(
                "CPU signature {:#x} != host {:#x}",
                self.signature, host.signature
            ));
        }
        if self.features != host.features {
            return Some("CPU feature flags differ from the host's".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_matches_itself_and_differences_are_named() {
        let host = CpuFingerprint::host();
        assert!(!host.vendor.is_empty());
        assert_eq!(host.mismatch(&CpuFingerprint::host()), None);
        let other = CpuFingerprint {
            vendor: "GenuineOther".into(),
            ..host.clone()
        };
        assert!(other.mismatch(&host).unwrap().contains("vendor"));
        let other = CpuFingerprint {
            signature: host.signature ^ 1,
            ..host.clone()
        };
        assert!(other.mismatch(&host).unwrap().contains("signature"));
        let mut other = host.clone();
        other.features[2] ^= 1;
        assert!(other.mismatch(&host).unwrap().contains("feature"));
    }
}
