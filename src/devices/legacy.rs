//! Small legacy devices: the CMOS RTC (0x70/0x71), a minimal i8042 (0x60/0x64) whose 0xFE
//! command resets the VM, the ACPI sleep/reset registers, and a sink for port 0x80.

use std::sync::Arc;

use crate::acpi::{RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::bus::BusDevice;
use crate::lifecycle::{ExitReason, VmControl};

/// Ignores writes, reads as zero (POST code port 0x80 and similar).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// i8042 keyboard controller: status reads 0 (nothing to read, input buffer empty); the
/// pulse-reset command 0xFE on port 0x64 resets the VM. Registered at 0x60..=0x64.
pub struct I8042 {
    control: Arc<VmControl>,
}

impl I8042 {
    /// A controller that requests a reset on `control`.
    pub fn new(control: Arc<VmControl>) -> I8042 {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.control.request_stop(ExitReason::Reset);
        }
    }
}

/// ACPI hardware-reduced sleep control/status and reset registers (ports 0x600..=0x602).
pub struct AcpiPm {
    control: Arc<VmControl>,
}

/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;

impl AcpiPm {
    /// Registers that stop the VM through `control`.
    pub fn new(control: Arc<VmControl>) -> AcpiPm {
        AcpiPm { control }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let port = SLEEP_CONTROL_PORT + offset as u16;
        if port == SLEEP_CONTROL_PORT && v & SLP_EN != 0 {
            let typ = (v >> 2) & 0x7;
            if typ == S5_SLEEP_TYPE {
                self.control.request_stop(ExitReason::PowerOff);
            } else {
                virtio_dev::guest_warn!("guest asked for unsupported sleep type {typ}");
            }
        } else if port == RESET_PORT && v == RESET_VALUE {
            self.control.request_stop(ExitReason::Reset);
        } else if port != SLEEP_STATUS_PORT {
            log::debug!("ACPI PM write {port:#x} = {v:#x}");
        }
    }
}

/// CMOS RTC and NVRAM: time registers answer the host's UTC time in BCD, 24-hour mode (x86
/// Linux always decodes the RTC as BCD), other registers are plain storage.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS with empty NVRAM.
    pub fn new() -> Cmos {
        let mut nvram = [0u8; 128];
        nvram[0x0a] = 0x26; // divider, rate
        nvram[0x0b] = 0x02; // 24 hour, BCD
        nvram[0x0d] = 0x80; // valid RAM and time
        Cmos { index: 0, nvram }
    }

    /// The index register and NVRAM (snapshot; the clock follows the host's).
    pub fn state(&self) -> (u8, [u8; 128]) {
        (self.index, self.nvram)
    }

    /// Load a saved index register and NVRAM (restore).
    pub fn set_state(&mut self, index: u8, nvram: [u8; 128]) {
        self.index = index & 0x7f;
        self.nvram = nvram;
    }

    fn time_reg(&self, reg: u8) -> Option<u8> {
        // SAFETY: time() with a null pointer only returns the time; gmtime_r writes to the
        // local `tm` we own.
        let tm = unsafe {
            let t = libc::time(std::ptr::null_mut());
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::gmtime_r(&t, &mut tm).is_null() {
                return None;
            }
            tm
        };
        let v = match reg {
            0x00 => tm.tm_sec,
            0x02 => tm.tm_min,
            0x04 => tm.tm_hour,
            0x06 => tm.tm_wday + 1,
            0x07 => tm.tm_mday,
            0x08 => tm.tm_mon + 1,
            0x09 => tm.tm_year % 100,
            0x32 => (tm.tm_year + 1900) / 100,
            _ => return None,
        };
        let v = v as u8;
        Some(((v / 10) << 4) | (v % 10))
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            let i = self.index & 0x7f;
            self.time_reg(i).unwrap_or(self.nvram[i as usize])
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 {
            self.index = v & 0x7f;
        } else if !matches!(self.index, 0x0a..=0x0d) {
            self.nvram[self.index as usize] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_powers_off_and_reset_resets() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut pm = AcpiPm::new(c.clone());
        pm.write(1, &[0x80]); // clear wake status: no effect
        pm.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN: no effect
        assert!(!c.stopping());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(c.reason(), Some(ExitReason::PowerOff));

        let c = Arc::new(VmControl::new().unwrap());
        let mut pm = AcpiPm::new(c.clone());
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(c.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn i8042_fe_resets() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut k = I8042::new(c.clone());
        k.write(0, &[0xfe]);
        k.write(4, &[0xaa]);
        assert!(!c.stopping());
        k.write(4, &[0xfe]);
        assert_eq!(c.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn cmos_time_is_bcd_and_sane_and_nvram_sticks() {
        let mut c = Cmos::new();
        let rd = |c: &mut Cmos, i: u8| {
            c.write(0, &[i]);
            let mut d = [0u8];
            c.read(1, &mut d);
            d[0]
        };
        let bcd = |v: u8| {
            assert!(v & 0xf < 10 && v >> 4 < 10, "{v:#x} is not BCD");
            (v >> 4) * 10 + (v & 0xf)
        };
        assert!(bcd(rd(&mut c, 0x00)) < 60);
        assert!(bcd(rd(&mut c, 0x04)) < 24);
        let month = bcd(rd(&mut c, 0x08));
        assert!((1..=12).contains(&month));
        assert_eq!(rd(&mut c, 0x32), 0x20);
        // SAFETY (test): plain libc time query.
        let year = 1900
            + unsafe {
                let t = libc::time(std::ptr::null_mut());
                let mut tm: libc::tm = std::mem::zeroed();
                libc::gmtime_r(&t, &mut tm);
                tm.tm_year
            };
        assert_eq!(i32::from(bcd(rd(&mut c, 0x09))), year % 100);
        assert_eq!(rd(&mut c, 0x0b) & 0x06, 0x02, "24 hour, BCD");
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(rd(&mut c, 0x40), 0x5a);
    }
}
