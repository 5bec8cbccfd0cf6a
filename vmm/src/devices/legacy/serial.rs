//! The 8250/16550A UART at COM1, wrapping `vm_superio::Serial`.
//!
//! Guest output goes to any `Write + Send` (a log file, stdout). Each byte
//! is one port I/O exit, so the guest should keep the console quiet on the
//! hot path; this device only has to be correct, not fast.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, SerialState as UartState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{BusDevice, DeviceRequest, Persist};

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

/// The most console output one VM writes (16 MiB): a guest printing in a
/// loop must not fill the host's disk or log. Past it a single line says
/// so and the rest is dropped, counted.
pub const OUTPUT_LIMIT: u64 = 16 << 20;

/// A console sink that stops after `limit` bytes.
pub struct BoundedOutput<W: Write> {
    inner: W,
    written: u64,
    limit: u64,
    dropped: u64,
}

impl<W: Write> BoundedOutput<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            written: 0,
            limit,
            dropped: 0,
        }
    }

    /// Bytes dropped after the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for BoundedOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        if room == 0 {
            if self.dropped == 0 {
                let note = format!(
                    "\n[thaw-vmm: console output reached its limit of {} bytes; the rest is dropped]\n",
                    self.limit
                );
                let _ = self.inner.write_all(note.as_bytes());
                let _ = self.inner.flush();
            }
            self.dropped = self.dropped.saturating_add(buf.len() as u64);
            // Accepted: the UART must not see an error for a full console.
            return Ok(buf.len());
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..take])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Output>,
}

/// The UART registers and unread input, as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
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
}

/// What a restored serial port runs on.
pub struct SerialResources {
    /// The eventfd registered as irqfd on [`COM1_GSI`].
    pub irq: EventFd,
    /// Where guest output goes now.
    pub out: Output,
}

impl Persist for Serial {
    type State = SerialState;
    type Resources = SerialResources;
    type Error = io::Error;

    fn save(&self) -> io::Result<SerialState> {
        let s = self.uart.state();
        Ok(SerialState {
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
        })
    }

    fn restore(state: &SerialState, res: SerialResources) -> io::Result<Self> {
        let s = UartState {
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
        let uart = Uart::from_state(&s, IrqTrigger(res.irq), NoEvents, res.out)
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

    #[test]
    fn console_output_stops_at_its_limit_with_one_note() {
        let sink = Captured::default();
        let mut out = BoundedOutput::new(sink.clone(), 1000);
        for _ in 0..100 {
            out.write_all(&[b'x'; 64]).unwrap();
        }
        let got = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(got).unwrap();
        assert_eq!(text.matches('x').count(), 1000);
        assert_eq!(text.matches("reached its limit of 1000 bytes").count(), 1);
        assert!(text.len() < 1100, "{} bytes written", text.len());
        assert_eq!(out.dropped(), 6400 - 1000);
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
    fn restored_port_has_the_registers_input_and_interrupts_of_the_saved_one() {
        let mut port = Serial::new(irq(), Box::new(io::sink()));
        port.write(7, &[0x5a]); // scratch register
        port.write(3, &[0x03]); // LCR: 8 data bits
        port.write(1, &[0x03]); // IER: data available and THR empty
        assert_eq!(port.enqueue_input(b"ab"), 2);
        let regs = |p: &mut Serial| {
            [1u64, 2, 3, 4, 5, 6, 7].map(|off| {
                let mut b = [0u8];
                p.read(off, &mut b);
                b[0]
            })
        };
        let state = crate::devices::persist::through_state_file(&port.save().unwrap());
        let out = Captured::default();
        let new_irq = irq();
        let mut restored = Serial::restore(
            &state,
            SerialResources {
                irq: new_irq.try_clone().unwrap(),
                out: Box::new(out.clone()),
            },
        )
        .unwrap();
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(regs(&mut restored), regs(&mut port));
        let mut b = [0u8];
        restored.read(0, &mut b);
        assert_eq!(b[0], b'a');
        restored.read(0, &mut b);
        assert_eq!(b[0], b'b');
        // Output goes to the new writer and raises the new irqfd.
        restored.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"x");
        assert!(new_irq.read().unwrap() >= 1);
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
