//! A minimal i8042 keyboard controller: enough for Linux' probe to finish
//! quickly and for the guest to reboot through it (command 0xfe).
//!
//! Written here rather than using `vm_superio::I8042Device`, which answers
//! every read with 0: Linux then waits for the controller's self-test and
//! CTR reads to time out, which costs seconds under instruction emulation.

use std::collections::VecDeque;
use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::devices::{BusDevice, DeviceRequest, Persist};

/// The controller spans ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// At most this many bytes wait for the guest to read them; more means the
/// guest is not reading, and older replies are of no use to it.
const MAX_PENDING: usize = 16;

pub struct I8042 {
    ctr: u8,
    status_last_command: bool,
    /// A command whose argument byte is expected on the data port.
    pending_command: Option<u8>,
    output: VecDeque<u8>,
}

/// The controller as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller configuration byte.
    pub ctr: u8,
    pub last_was_command: bool,
    pub pending_command: Option<u8>,
    /// Replies the guest has not read yet, oldest first.
    pub output: Vec<u8>,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        Self {
            // Keyboard interrupt on, translation on, system flag set.
            ctr: 0x45,
            status_last_command: false,
            pending_command: None,
            output: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() >= MAX_PENDING {
            self.output.pop_front();
        }
        self.output.push_back(byte);
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.status_last_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) -> DeviceRequest {
        self.status_last_command = true;
        match cmd {
            CMD_RESET_CPU => return DeviceRequest::Reset,
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(0x00),
            CMD_READ_OUTPUT_PORT => self.push(0x01),
            CMD_AUX_DISABLE | CMD_AUX_ENABLE | CMD_KBD_DISABLE | CMD_KBD_ENABLE => {}
            _ => {}
        }
        DeviceRequest::None
    }

    fn data(&mut self, byte: u8) -> DeviceRequest {
        self.status_last_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            // Output port bit 0 low resets the CPU, like command 0xfe.
            Some(CMD_WRITE_OUTPUT_PORT) if byte & 1 == 0 => return DeviceRequest::Reset,
            Some(_) => {}
            // A byte for the keyboard itself: acknowledge it, there is no
            // keyboard behind it to do anything more.
            None => self.push(0xfa),
        }
        DeviceRequest::None
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Resources = ();
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(I8042State {
            ctr: self.ctr,
            last_was_command: self.status_last_command,
            pending_command: self.pending_command,
            output: self.output.iter().copied().collect(),
        })
    }

    fn restore(state: &I8042State, (): ()) -> Result<Self, Infallible> {
        let mut dev = Self {
            ctr: state.ctr,
            status_last_command: state.last_was_command,
            pending_command: state.pending_command,
            output: VecDeque::new(),
        };
        // Through `push`, so a state with more than the bound keeps the
        // newest replies, as the running controller would have.
        for &b in &state.output {
            dev.push(b);
        }
        Ok(dev)
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let [byte] = data else {
            return;
        };
        *byte = match offset {
            DATA => self.output.pop_front().unwrap_or(0),
            COMMAND => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceRequest {
        let [byte] = data else {
            return DeviceRequest::None;
        };
        match offset {
            DATA => self.data(*byte),
            COMMAND => self.command(*byte),
            _ => DeviceRequest::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_asks_for_reset() {
        let mut dev = I8042::new();
        assert_eq!(dev.write(COMMAND, &[0x20]), DeviceRequest::None);
        assert_eq!(dev.write(COMMAND, &[0xfe]), DeviceRequest::Reset);
        // Through the bus as the VMM places it.
        let mut bus = crate::devices::Bus::new();
        bus.insert(
            I8042_PORT,
            I8042_PORT_LEN,
            std::sync::Arc::new(std::sync::Mutex::new(I8042::new())),
        )
        .unwrap();
        assert_eq!(bus.write(0x64, &[0xfe]), Some(DeviceRequest::Reset));
        assert_eq!(bus.write(0x60, &[0xfe]), Some(DeviceRequest::None));
    }

    #[test]
    fn linux_probe_sequence_gets_answers() {
        let mut dev = I8042::new();
        // Empty controller: nothing to read.
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), 0x45);
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x47);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), 0x55);
        dev.write(COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(read(&mut dev, DATA), 0x00);
        dev.write(DATA, &[0xff]);
        assert_eq!(read(&mut dev, DATA), 0xfa);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn restored_controller_answers_as_the_saved_one() {
        let mut dev = I8042::new();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        // Half a command: its argument byte comes after the restore.
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        let state = crate::devices::persist::through_state_file(&dev.save().unwrap());
        let Ok(mut restored) = I8042::restore(&state, ());
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(read(&mut restored, COMMAND), read(&mut dev, COMMAND));
        assert_eq!(read(&mut restored, DATA), 0x55);
        assert_eq!(read(&mut restored, DATA), 0x47);
        assert_eq!(read(&mut restored, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(restored.write(DATA, &[0xfe]), DeviceRequest::Reset);

        // More pending replies than the controller keeps: the newest stay.
        let state = I8042State {
            output: (0..40).collect(),
            ..state
        };
        let Ok(mut restored) = I8042::restore(&state, ());
        assert_eq!(restored.output.len(), MAX_PENDING);
        assert_eq!(read(&mut restored, DATA), 40 - MAX_PENDING as u8);
    }

    #[test]
    fn output_port_reset_and_bounded_output() {
        let mut dev = I8042::new();
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        assert_eq!(dev.write(DATA, &[0xfe]), DeviceRequest::Reset);
        for _ in 0..1000 {
            dev.write(DATA, &[0x00]);
        }
        assert_eq!(dev.output.len(), MAX_PENDING);
        assert_eq!(dev.write(COMMAND, &[0xfe, 0]), DeviceRequest::None);
    }
}
