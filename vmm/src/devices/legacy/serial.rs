//! The 8250/16550A UART at COM1, wrapping `vm_superio::Serial`.
//!
//! Guest output goes to any `Write + Send` (a log file, stdout). Each byte
//! is one port I/O exit, so the guest should keep the console quiet on the
//! hot path; this device only has to be correct, not fast.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{BusDevice, DeviceRequest};

pub const COM1_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
/// The ISA IRQ of COM1.
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt through an eventfd (a KVM irqfd).
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Output = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Output>,
}

/// The UART registers and unread input, as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// `irq` is the eventfd registered as irqfd on [`COM1_GSI`].
    pub fn new(irq: EventFd, out: Output) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(irq), out),
        }
    }

    /// The eventfd the UART signals its interrupt on.
    pub fn interrupt_event(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Queue bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let n = input.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&input[..n]).unwrap_or(0)
    }

    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn from_state(state: &SerialSnapshot, irq: EventFd, out: Output) -> io::Result<Self> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Uart::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state: {e}")))?;
        Ok(Self { uart })
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(off)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceRequest {
        if let ([byte], Ok(off)) = (data, u8::try_from(offset)) {
            // A failing output (full disk, closed pipe) loses the byte; the
            // guest must not notice or stall.
            if let Err(e) = self.uart.write(off, *byte) {
                log::debug!("serial: output lost: {e:?}");
            }
        }
        DeviceRequest::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn irq() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("broken pipe"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer_and_raises_thre_interrupt() {
        let out = Captured::default();
        let mut port = Serial::new(irq(), Box::new(out.clone()));
        // Enable the THR-empty interrupt, as the 8250 driver does.
        port.write(1, &[0x02]);
        for b in b"hello\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        assert!(port.interrupt_event().read().unwrap() >= 1);
        // LSR says the transmitter is empty.
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn input_is_readable_by_the_guest_and_state_round_trips() {
        let mut port = Serial::new(irq(), Box::new(io::sink()));
        port.write(7, &[0x5a]); // scratch register
        assert_eq!(port.enqueue_input(b"ab"), 2);
        let state = port.state();
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = Serial::from_state(
            &serde_json::from_str(&json).unwrap(),
            irq(),
            Box::new(io::sink()),
        )
        .unwrap();
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a');
        restored.read(0, &mut b);
        assert_eq!(b[0], b'b');
    }

    #[test]
    fn odd_accesses_and_broken_output_are_harmless() {
        let mut port = Serial::new(irq(), Box::new(Broken));
        port.write(0, b"x");
        port.write(0, &[1, 2]);
        port.write(300, &[1]);
        let mut two = [0xffu8; 2];
        port.read(0, &mut two);
        assert_eq!(two, [0, 0]);
        let mut big = vec![0u8; 100];
        assert!(port.enqueue_input(&big) <= 64);
        big.clear();
        assert_eq!(port.enqueue_input(&big), 0);
    }
}
