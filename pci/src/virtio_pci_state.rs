//! Saved state of one virtio-pci function: the config-space registers a driver sets (command,
//! BAR address, interrupt line, MSI-X control), the MSI-X table, the common configuration
//! (features, status, config and queue vectors, each queue's size, addresses and enable) and
//! the device model's own blob ([`VirtioDevice::save_state`]).
//!
//! Restore replays all of it through the paths a driver's accesses take, so every value gets
//! the checks a guest write gets and every side effect happens as it did: MSI-X entries, then
//! the common configuration up to DRIVER_OK (which activates the device with the saved queues),
//! then the device model's blob; [`VirtioPciDevice::restore_state`] returns the config-space
//! writes the caller replays through the PCI bus (so the bus routes the BAR again, the
//! transport registers its ioeventfds and MSI-X enables, programming its routes).
//!
//! Not saved: the ISR byte (MSI-X only, no INTx), config_generation, pending bits of masked
//! MSI-X vectors.

use super::*;
use crate::virtio_common::status as st;

/// First bytes of a saved transport.
const MAGIC: [u8; 4] = *b"VPCI";
const VERSION: u16 = 1;
/// Largest device blob (a vIOMMU with a million mappings is ~25 MiB).
const MAX_DEVICE_BLOB: usize = 256 << 20;
/// Config-space offset of the interrupt line register.
const INTERRUPT_LINE: u16 = 0x3c;

/// A bounds-checked little-endian reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!(
                "virtio-pci state truncated ({n} bytes needed, {} left)",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

impl VirtioPciDevice {
    /// The function's state (call with the VM paused), or `None` when its device model cannot
    /// save its own.
    pub fn save_state(&mut self) -> Option<Vec<u8>> {
        let device = self.device.save_state()?;
        let mut w = Vec::new();
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&self.config.read_u16(COMMAND).to_le_bytes());
        w.extend_from_slice(
            &self
                .config
                .bar_address(VIRTIO_BAR)
                .unwrap_or(0)
                .to_le_bytes(),
        );
        let mut line = [0u8];
        self.config.read(INTERRUPT_LINE, &mut line);
        w.push(line[0]);
        let control = self.config.read_u16(self.msix_cap + MSIX_CAP_CONTROL);
        w.extend_from_slice(&control.to_le_bytes());
        {
            let msix = self.msix();
            let n = msix.num_vectors();
            w.extend_from_slice(&n.to_le_bytes());
            for off in 0..u64::from(n) * 4 {
                let mut d = [0u8; 4];
                msix.table_read(off * 4, &mut d);
                w.extend_from_slice(&d);
            }
        }
        let common = |s: &mut Self, off: u64, len: usize| {
            let mut d = [0u8; 8];
            s.common.read(off, &mut d[..len]);
            u64::from_le_bytes(d)
        };
        w.extend_from_slice(&self.common.acked_features().to_le_bytes());
        w.push(self.common.status());
        w.extend_from_slice(&(common(self, 0x10, 2) as u16).to_le_bytes());
        let select = common(self, 0x16, 2) as u16;
        let queues = self.common.queue_configs();
        w.extend_from_slice(&(queues.len() as u16).to_le_bytes());
        for (q, c) in queues.iter().enumerate() {
            self.common.write(0x16, &(q as u16).to_le_bytes());
            let vector = common(self, 0x1a, 2) as u16;
            w.extend_from_slice(&c.size.to_le_bytes());
            w.extend_from_slice(&vector.to_le_bytes());
            w.push(u8::from(c.ready));
            for a in [c.desc_table.0, c.avail_ring.0, c.used_ring.0] {
                w.extend_from_slice(&a.to_le_bytes());
            }
        }
        self.common.write(0x16, &select.to_le_bytes());
        w.push(u8::from(self.activated));
        w.extend_from_slice(&(device.len() as u64).to_le_bytes());
        w.extend_from_slice(&device);
        Some(w)
    }

    /// Load `blob` from [`Self::save_state`] into this function, freshly plugged (reset
    /// state) with the same device model; returns the config-space writes `(offset, bytes)`
    /// the caller must replay through the PCI bus, in order.
    pub fn restore_state(&mut self, blob: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, String> {
        let mut r = Reader(blob);
        if r.take(4)? != MAGIC {
            return Err("not a virtio-pci state (bad magic)".into());
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(format!(
                "virtio-pci state version {version}, this build reads {VERSION}"
            ));
        }
        if self.common.status() != 0 || self.activated {
            return Err("virtio-pci restore needs a function in its reset state".into());
        }
        let command = r.u16()?;
        let bar = r.u64()?;
        let line = r.u8()?;
        let control = r.u16()?;
        let n = r.u16()?;
        if n != self.msix().num_vectors() {
            return Err(format!(
                "{n} MSI-X vectors saved, this function has {}",
                self.msix().num_vectors()
            ));
        }
        let table = r.take(usize::from(n) * 16)?;
        let acked = r.u64()?;
        let status = r.u8()?;
        let config_vector = r.u16()?;
        let nq = r.u16()?;
        if usize::from(nq) != self.common.queue_configs().len() {
            return Err(format!(
                "{nq} queues saved, this device has {}",
                self.common.queue_configs().len()
            ));
        }
        let mut queues = Vec::with_capacity(usize::from(nq));
        for _ in 0..nq {
            let (size, vector, ready) = (r.u16()?, r.u16()?, r.u8()?);
            queues.push((size, vector, ready, [r.u64()?, r.u64()?, r.u64()?]));
        }
        let activated = r.u8()? != 0;
        let len = usize::try_from(r.u64()?).map_err(|_| "device state too long".to_string())?;
        if len > MAX_DEVICE_BLOB {
            return Err(format!("device state of {len} bytes"));
        }
        let device = r.take(len)?;
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the virtio-pci state", r.0.len()));
        }
        // MSI-X entries first (the table is written whatever the enable bit says).
        {
            let mut msix = self.msix();
            for (i, d) in table.chunks_exact(4).enumerate() {
                msix.table_write(i as u64 * 4, d);
            }
        }
        // The common configuration as a driver sets it up, DRIVER_OK last.
        let replay = |s: &mut Self, off: u64, data: &[u8]| s.write_common(off, data);
        for (sel, word) in [(0u32, acked as u32), (1, (acked >> 32) as u32)] {
            replay(self, 0x08, &sel.to_le_bytes());
            replay(self, 0x0c, &word.to_le_bytes());
        }
        let early = status & (st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::FAILED);
        if early != 0 {
            replay(self, 0x14, &[early]);
        }
        replay(self, 0x10, &config_vector.to_le_bytes());
        for (q, (size, vector, ready, addrs)) in queues.iter().enumerate() {
            replay(self, 0x16, &(q as u16).to_le_bytes());
            replay(self, 0x18, &size.to_le_bytes());
            replay(self, 0x1a, &vector.to_le_bytes());
            for (off, a) in [0x20u64, 0x28, 0x30].into_iter().zip(addrs) {
                replay(self, off, &a.to_le_bytes());
            }
            if *ready != 0 {
                replay(self, 0x1c, &1u16.to_le_bytes());
            }
        }
        replay(self, 0x16, &0u16.to_le_bytes());
        if status & st::DRIVER_OK != 0 {
            replay(self, 0x14, &[status & !st::DEVICE_NEEDS_RESET]);
        }
        if self.common.acked_features() != acked || self.activated != activated {
            return Err(format!(
                "virtio-pci state not accepted: features {:#x} (saved {acked:#x}), activated {} \
                 (saved {activated})",
                self.common.acked_features(),
                self.activated
            ));
        }
        if activated {
            self.device.restore_state(device)?;
        }
        let mut writes = vec![
            (BAR0, (bar as u32).to_le_bytes().to_vec()),
            (BAR0 + 4, ((bar >> 32) as u32).to_le_bytes().to_vec()),
            (INTERRUPT_LINE, vec![line]),
            (COMMAND, command.to_le_bytes().to_vec()),
        ];
        writes.push((
            self.msix_cap + MSIX_CAP_CONTROL,
            control.to_le_bytes().to_vec(),
        ));
        Ok(writes)
    }
}

#[cfg(test)]
#[path = "virtio_pci_state_tests.rs"]
mod tests;
