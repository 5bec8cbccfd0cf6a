//! The `state` file: `MAGIC`, a little-endian u32 header length, the header
//! (bincode), then the payload (bincode). The header carries the format
//! version, the CPU fingerprint and the payload's length and CRC32, so a
//! file from another version, another CPU or a torn write is refused before
//! anything is deserialized into a VM.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cpu::CpuFingerprint;
use crate::Error;

pub const MAGIC: [u8; 8] = *b"THAWSNAP";
/// Bump when the payload's layout changes; old snapshots are then refused.
/// 3: every VM has a virtio-net slot; the VM config has its MAC and tap.
/// 4: every VM has a virtio-fs slot; the VM config has its share.
pub const FORMAT_VERSION: u32 = 4;
/// Headers are small; anything bigger is a corrupt length.
const MAX_HEADER: u32 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format_version: u32,
    thaw_version: String,
    cpu: CpuFingerprint,
    payload_len: u64,
    payload_crc32: u32,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: "snapshot state",
        path: path.display().to_string(),
        source,
    }
}

/// The bytes of a state file holding `state`; `path` only names the file
/// in errors.
pub fn encode_state<T: Serialize>(
    path: &Path,
    cpu: &CpuFingerprint,
    state: &T,
) -> Result<Vec<u8>, Error> {
    let encode = |e: bincode::Error| Error::Encode {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let payload = bincode::serialize(state).map_err(encode)?;
    let header = Header {
        format_version: FORMAT_VERSION,
        thaw_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu: cpu.clone(),
        payload_len: payload.len() as u64,
        payload_crc32: crc32fast::hash(&payload),
    };
    let header = bincode::serialize(&header).map_err(encode)?;
    let mut bytes = Vec::with_capacity(12 + header.len() + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Writes `state` atomically: to a temporary file, synced, then renamed, so
/// a reader never sees half a snapshot.
pub fn write_state<T: Serialize>(
    path: &Path,
    cpu: &CpuFingerprint,
    state: &T,
) -> Result<(), Error> {
    let bytes = encode_state(path, cpu, state)?;
    let tmp = path.with_extension("tmp");
    let mut f = crate::private::create_file(&tmp).map_err(io_err(&tmp))?;
    let write = |f: &mut std::fs::File| -> std::io::Result<()> {
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write(&mut f) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads and checks a state file; refuses other versions, other CPUs and
/// corrupt files with the reason.
pub fn read_state<T: DeserializeOwned>(path: &Path, host: &CpuFingerprint) -> Result<T, Error> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode_state(path, &bytes, host)
}

/// Checks and decodes the bytes of a state file (see [`read_state`]);
/// `path` only names the file in errors.
pub fn decode_state<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    host: &CpuFingerprint,
) -> Result<T, Error> {
    let name = path.display().to_string();
    let corrupt = |reason: String| Error::Corrupt {
        path: name.clone(),
        reason,
    };
    if bytes.len() < 12 || bytes[..8] != MAGIC {
        return Err(Error::BadMagic(name));
    }
    let header_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if header_len > MAX_HEADER || 12 + header_len as usize > bytes.len() {
        return Err(corrupt(format!("header length {header_len} out of range")));
    }
    let header_end = 12 + header_len as usize;
    // Check the version before trusting the rest of the header's layout.
    if header_len < 4 {
        return Err(corrupt("header too short".into()));
    }
    let found = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if found != FORMAT_VERSION {
        return Err(Error::Version {
            path: name,
            found,
            expected: FORMAT_VERSION,
        });
    }
    let header: Header = bincode::deserialize(&bytes[12..header_end])
        .map_err(|e| corrupt(format!("header: {e}")))?;
    if let Some(reason) = header.cpu.mismatch(host) {
        return Err(Error::Cpu { path: name, reason });
    }
    let payload = &bytes[header_end..];
    if payload.len() as u64 != header.payload_len {
        return Err(corrupt(format!(
            "payload is {} bytes, header says {}",
            payload.len(),
            header.payload_len
        )));
    }
    if crc32fast::hash(payload) != header.payload_crc32 {
        return Err(corrupt("checksum mismatch".into()));
    }
    bincode::deserialize(payload).map_err(|e| corrupt(format!("payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
    }

    fn sample() -> State {
        State {
            regs: (0..100).collect(),
            name: "vm".into(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let cpu = CpuFingerprint::host();
        write_state(&p, &cpu, &sample()).unwrap();
        assert_eq!(read_state::<State>(&p, &cpu).unwrap(), sample());
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn refuses_corruption_version_and_cpu_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let cpu = CpuFingerprint::host();
        write_state(&p, &cpu, &sample()).unwrap();
        let good = std::fs::read(&p).unwrap();

        // A flipped payload byte.
        let mut bad = good.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x40;
        std::fs::write(&p, &bad).unwrap();
        let e = read_state::<State>(&p, &cpu).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");

        // Truncated.
        std::fs::write(&p, &good[..good.len() - 10]).unwrap();
        let e = read_state::<State>(&p, &cpu).unwrap_err().to_string();
        assert!(e.contains("payload is"), "{e}");

        // Another format version.
        let mut bad = good.clone();
        bad[12] = bad[12].wrapping_add(1);
        std::fs::write(&p, &bad).unwrap();
        let e = read_state::<State>(&p, &cpu).unwrap_err().to_string();
        let other = FORMAT_VERSION + 1;
        assert!(e.contains(&format!("format version {other}")), "{e}");

        // Not a snapshot at all.
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            read_state::<State>(&p, &cpu),
            Err(Error::BadMagic(_))
        ));

        // Another CPU.
        std::fs::write(&p, &good).unwrap();
        let other = CpuFingerprint {
            signature: cpu.signature ^ 0x10,
            ..cpu.clone()
        };
        let e = read_state::<State>(&p, &other).unwrap_err().to_string();
        assert!(e.contains("another CPU"), "{e}");
    }
}
