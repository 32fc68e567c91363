//! The legacy devices' state: COM1 (16550 registers and receive FIFO) and the CMOS (index
//! register, NVRAM; its clock reads the host's). The i8042, the ACPI PM registers and port
//! 0x80 hold none.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::SnapshotError;
use crate::devices::legacy::Cmos;
use crate::devices::serial::SerialDevice;

/// Handles on the legacy devices with state (kept by the VM when it adds them).
#[derive(Clone)]
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The CMOS RTC / NVRAM.
    pub cmos: Arc<Mutex<Cmos>>,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices").finish_non_exhaustive()
    }
}

/// The 16550's registers (vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// DLL, DLM.
    pub divisor: [u8; 2],
    /// IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 7],
    /// Receive FIFO (at most 64 bytes).
    pub fifo: Vec<u8>,
}

/// Everything the legacy devices hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub uart: UartState,
    /// CMOS index register.
    pub cmos_index: u8,
    /// CMOS NVRAM (128 bytes).
    pub cmos_nvram: Vec<u8>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LegacyDevices {
    /// Their current state.
    pub fn save(&self) -> LegacyState {
        let s = lock(&self.serial).state();
        let (cmos_index, nvram) = lock(&self.cmos).state();
        LegacyState {
            uart: UartState {
                divisor: [s.baud_divisor_low, s.baud_divisor_high],
                regs: [
                    s.interrupt_enable,
                    s.interrupt_identification,
                    s.line_control,
                    s.line_status,
                    s.modem_control,
                    s.modem_status,
                    s.scratch,
                ],
                fifo: s.in_buffer,
            },
            cmos_index,
            cmos_nvram: nvram.to_vec(),
        }
    }

    /// Load `s` (checked: FIFO size, NVRAM size).
    pub fn restore(&self, s: &LegacyState) -> Result<(), SnapshotError> {
        let nvram: [u8; 128] = s.cmos_nvram.as_slice().try_into().map_err(|_| {
            SnapshotError::Invalid(format!("CMOS NVRAM of {} bytes", s.cmos_nvram.len()))
        })?;
        let u = &s.uart;
        let state = SerialState {
            baud_divisor_low: u.divisor[0],
            baud_divisor_high: u.divisor[1],
            interrupt_enable: u.regs[0],
            interrupt_identification: u.regs[1],
            line_control: u.regs[2],
            line_status: u.regs[3],
            modem_control: u.regs[4],
            modem_status: u.regs[5],
            scratch: u.regs[6],
            in_buffer: u.fifo.clone(),
        };
        lock(&self.serial)
            .set_state(&state)
            .map_err(|e| SnapshotError::Invalid(format!("COM1: {e}")))?;
        lock(&self.cmos).set_state(s.cmos_index, nvram);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> LegacyDevices {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        LegacyDevices {
            serial: Arc::new(Mutex::new(SerialDevice::new(
                irq,
                Box::new(std::io::sink()),
            ))),
            cmos: Arc::new(Mutex::new(Cmos::new())),
        }
    }

    #[test]
    fn uart_and_cmos_round_trip_and_bad_state_is_refused() {
        let a = devices();
        {
            let mut s = a.serial.lock().unwrap();
            s.write(3, &[0x83]); // DLAB
            s.write(0, &[0x01]); // 115200
            s.write(3, &[0x03]); // 8n1
            s.write(7, &[0x5a]); // scratch
            s.write(1, &[0x01]); // IER: RX
            let mut c = a.cmos.lock().unwrap();
            c.write(0, &[0x40]);
            c.write(1, &[0x77]);
        }
        let saved = a.save();
        let b = devices();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        let mut v = [0u8];
        b.serial.lock().unwrap().read(7, &mut v);
        assert_eq!(v[0], 0x5a);
        b.cmos.lock().unwrap().read(1, &mut v);
        assert_eq!(v[0], 0x77);
        let mut bad = saved.clone();
        bad.uart.fifo = vec![0; 65];
        assert!(devices().restore(&bad).is_err());
        let mut bad = saved;
        bad.cmos_nvram.pop();
        assert!(devices().restore(&bad).is_err());
    }
}
