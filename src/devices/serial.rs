//! COM1: a 16550 UART (vm-superio) at port 0x3f8, interrupting on IRQ 4 through an eventfd
//! the VMM registers as irqfd for GSI 4 (in-kernel IOAPIC).

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 legacy IRQ.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by signalling an eventfd (an irqfd in the VM).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        log::trace!("serial: interrupt");
        self.0.write(1)
    }
}

/// The serial port device on the I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    write_failed: bool,
}

impl SerialDevice {
    /// A UART writing guest output to `out` and signalling `irq` for interrupts.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
            write_failed: false,
        }
    }
}

impl SerialDevice {
    /// The UART's registers and receive FIFO (snapshot).
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    /// Load saved registers and FIFO (restore); refused when the FIFO is over 64 bytes.
    pub fn set_state(&mut self, state: &vm_superio::serial::SerialState) -> io::Result<()> {
        if state.in_buffer.len() > 64 {
            return Err(io::Error::other(format!(
                "serial FIFO of {} bytes (at most 64)",
                state.in_buffer.len()
            )));
        }
        let irq = self.serial.interrupt_evt().0.try_clone()?;
        let out = std::mem::replace(self.serial.writer_mut(), Box::new(io::sink()));
        self.serial = Serial::from_state(
            state,
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            if offset == 1 {
                log::trace!("serial: write {offset} = {v:#x}");
            }
            if let Err(e) = self.serial.write(offset as u8, v) {
                // Warn once: a closed output would otherwise log every guest byte.
                if !self.write_failed {
                    log::warn!("serial output failed (further failures not logged): {e:?}");
                    self.write_failed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_output_and_interrupt_when_enabled() {
        let out = Shared(Arc::new(Mutex::new(vec![])));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        s.write(1, &[0x02]); // IER: THR empty interrupt
        let _ = irq.read(); // enabling THRE raises an interrupt immediately
        let mut iir = [0u8];
        s.read(2, &mut iir); // acknowledge it
        assert_eq!(iir[0] & 0x0f, 0x02, "THR empty interrupt pending");
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
