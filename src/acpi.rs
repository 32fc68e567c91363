//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT (PCI host bridge, `_S5_`),
//! MCFG, plus any extra tables a feature supplies (the hook for VIOT: build it with
//! `acpi_tables::viot::VIOT`, serialize it with `Aml::to_aml_bytes` and pass the bytes in
//! [`AcpiConfig::extra_tables`]; it is linked from the XSDT like every other table).

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable, EISAName, Name, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::serial::{COM1_IRQ, COM1_PORT};
use crate::memory::{ECAM_SIZE, ECAM_START, IOAPIC_START, LAPIC_START, MMIO32_SIZE, MMIO32_START};

/// Where the RSDP is written (inside the legacy BIOS area Linux also scans).
pub const RSDP_START: u64 = 0xE_0000;
/// End of the area tables may use.
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// Port of the sleep control register (write SLP_TYP << 2 | SLP_EN).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Port of the sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Port of the reset register.
pub const RESET_PORT: u16 = 0x602;
/// Value written to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP value advertised for S5 in `_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;

/// OEM ID of every ACPI table the VMM builds.
pub const OEM_ID: [u8; 6] = *b"RVMMIO";
const OEM_TABLE_ID: [u8; 8] = *b"VMMIOMMU";

/// Inputs for the ACPI tables.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..cpus).
    pub cpus: u8,
    /// 64-bit PCI MMIO window (start, size).
    pub mmio64: (u64, u64),
    /// PCI I/O window (first port, number of ports).
    pub pci_io: (u16, u16),
    /// Fully formed extra tables (e.g. a VIOT), each with a valid header and checksum.
    pub extra_tables: Vec<Vec<u8>>,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables too large ({0} bytes)")]
    TooLarge(usize),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The serialized tables and where each one goes.
#[derive(Debug)]
pub struct AcpiTables {
    /// RSDP bytes (written at [`RSDP_START`]).
    pub rsdp: Vec<u8>,
    /// (address, bytes) of every other table, XSDT last.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: PCI host bridge on segment 0 bus 0 with its windows, a motherboard resource
/// device claiming ECAM, and `_S5_`.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO32_START as u32,
        (MMIO32_START + MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        cfg.mmio64.0,
        cfg.mmio64.0 + cfg.mmio64.1 - 1,
        None,
    );
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = AddressSpace::<u16>::new_io(
        cfg.pci_io.0.max(0xd00),
        cfg.pci_io.0.saturating_add(cfg.pci_io.1.saturating_sub(1)),
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &io_low, &io_high, &mmio32, &mmio64]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let pci0_children: Vec<Name> = vec![
        Name::new(Path::new("_HID"), &hid),
        Name::new(Path::new("_CID"), &cid),
        Name::new(Path::new("_ADR"), &zero),
        Name::new(Path::new("_SEG"), &zero),
        Name::new(Path::new("_UID"), &zero),
        Name::new(Path::new("_BBN"), &zero),
        Name::new(Path::new("_CCA"), &aml::ONE),
        Name::new(Path::new("_CRS"), &crs),
    ];
    let pci0 = aml::Device::new(
        Path::new("PCI0"),
        pci0_children.iter().map(|n| n as &dyn Aml).collect(),
    );

    let ecam = aml::Memory32Fixed::new(false, ECAM_START as u32, ECAM_SIZE as u32);
    let mb_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let mb_hid = EISAName::new("PNP0C02");
    let mb_uid: &'static str = "MCFG";
    let mb_children = [
        Name::new(Path::new("_HID"), &mb_hid),
        Name::new(Path::new("_UID"), &mb_uid),
        Name::new(Path::new("_CRS"), &mb_crs),
    ];
    let mbrd = aml::Device::new(
        Path::new("MBRD"),
        mb_children.iter().map(|n| n as &dyn Aml).collect(),
    );
    // COM1 and the RTC must be described: with hardware-reduced ACPI Linux has no legacy PIC
    // and maps ISA IRQs only for devices ACPI names (else the 8250 driver cannot get IRQ 4).
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    let com1_children = [
        Name::new(Path::new("_HID"), &com1_hid),
        Name::new(Path::new("_UID"), &aml::ONE),
        Name::new(Path::new("_CRS"), &com1_crs),
    ];
    let com1 = aml::Device::new(
        Path::new("COM1"),
        com1_children.iter().map(|n| n as &dyn Aml).collect(),
    );
    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid = EISAName::new("PNP0B00");
    let rtc_children = [
        Name::new(Path::new("_HID"), &rtc_hid),
        Name::new(Path::new("_CRS"), &rtc_crs),
    ];
    let rtc = aml::Device::new(
        Path::new("RTC_"),
        rtc_children.iter().map(|n| n as &dyn Aml).collect(),
    );
    let sb = aml::Scope::new(Path::new("\\_SB_"), vec![&pci0, &mbrd, &com1, &rtc]);
    let s5_pkg = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    let s5 = Name::new(Path::new("_S5_"), &s5_pkg);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// A hardware-reduced FADT with sleep control/status and reset registers on I/O ports.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT.into(),
    );
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT.into(),
    );
    b.sleep_status_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT.into(),
    );
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC absent flag, no 8042 (bit 1
    // clear), so Linux does not probe a keyboard controller.
    b.iapc_boot_arch = (1u16 << 2).into();
    to_bytes(&b.finalize())
}

/// MADT: one local APIC per vCPU and the IOAPIC (GSI base 0).
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut bytes = to_bytes(&madt);
    // Flags: PCAT_COMPAT (there is a legacy 8259 pair, which Linux masks).
    bytes[40..44].copy_from_slice(&1u32.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// MCFG describing ECAM for segment 0, bus 0.
pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    m.add_ecam(ECAM_START, 0, 0, 0);
    to_bytes(&m)
}

/// Recompute the checksum byte (offset 9) of a table with a standard header.
pub fn fix_checksum(table: &mut [u8]) {
    if table.len() < 36 {
        return;
    }
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// Build all tables laid out from [`RSDP_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let mut next = RSDP_START + 64;
    let mut tables = Vec::new();
    let mut place = |bytes: Vec<u8>, tables: &mut Vec<(u64, Vec<u8>)>| -> u64 {
        let addr = next;
        next = (next + bytes.len() as u64 + 7) & !7;
        tables.push((addr, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(cfg), &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(place(fadt(dsdt_addr), &mut tables));
    xsdt.add_entry(place(madt(cfg.cpus), &mut tables));
    xsdt.add_entry(place(mcfg(), &mut tables));
    for extra in &cfg.extra_tables {
        xsdt.add_entry(place(extra.clone(), &mut tables));
    }
    let xsdt_addr = place(to_bytes(&xsdt), &mut tables);
    let end = tables
        .last()
        .map(|(a, b)| a + b.len() as u64)
        .unwrap_or(RSDP_START);
    if end > ACPI_AREA_END {
        return Err(AcpiError::TooLarge((end - RSDP_START) as usize));
    }
    Ok(AcpiTables {
        rsdp: to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        tables,
    })
}

/// Build and write the tables into guest memory; returns the RSDP address.
pub fn write<M: GuestMemoryBackend>(mem: &M, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let t = build(cfg)?;
    mem.write_slice(&t.rsdp, GuestAddress(RSDP_START))?;
    for (addr, bytes) in &t.tables {
        mem.write_slice(bytes, GuestAddress(*addr))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AcpiConfig {
        AcpiConfig {
            cpus: 2,
            mmio64: (1 << 32, 1 << 36),
            pci_io: (0x1000, 0xf000),
            extra_tables: vec![],
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn every_table_checksums_and_lengths_match() {
        let t = build(&cfg()).unwrap();
        assert_eq!(sum(&t.rsdp[..20]), 0);
        assert_eq!(sum(&t.rsdp), 0);
        assert_eq!(&t.rsdp[..8], b"RSD PTR ");
        for (_, b) in &t.tables {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{:?}", &b[..4]);
            assert_eq!(sum(b), 0, "checksum of {:?}", std::str::from_utf8(&b[..4]));
        }
    }

    #[test]
    fn xsdt_links_fadt_madt_mcfg_and_extras() {
        let mut c = cfg();
        let mut extra = Sdt::new(*b"VIOT", 48, 0, OEM_ID, OEM_TABLE_ID, 1);
        extra.update_checksum();
        c.extra_tables.push(extra.as_slice().to_vec());
        let t = build(&c).unwrap();
        let xsdt_addr = u64_at(&t.rsdp, 24);
        let (_, xsdt) = t.tables.iter().find(|(a, _)| *a == xsdt_addr).unwrap();
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| {
                let a = u64_at(xsdt, o);
                &t.tables.iter().find(|(x, _)| *x == a).unwrap().1[..4]
            })
            .collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"MCFG", b"VIOT"]);
        // Tables do not overlap and stay in the BIOS area.
        let mut spans: Vec<(u64, u64)> = t
            .tables
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans.last().unwrap().1 <= ACPI_AREA_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_io_sleep_and_reset() {
        let f = fadt(0x1234_5678);
        assert_eq!(&f[..4], b"FACP");
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // reset_reg GAS at 116: space 1 (IO), address at 120.
        assert_eq!(f[116], 1);
        assert_eq!(u64_at(&f, 120), RESET_PORT as u64);
        assert_eq!(f[128], RESET_VALUE);
        assert_eq!(u64_at(&f, 140), 0x1234_5678); // X_DSDT
                                                  // sleep control at 244, sleep status at 256.
        assert_eq!(f[244], 1);
        assert_eq!(u64_at(&f, 248), SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(&f, 260), SLEEP_STATUS_PORT as u64);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let m = madt(3);
        assert_eq!(u32_at(&m, 36), LAPIC_START as u32);
        let mut off = 44;
        let mut apic_ids = vec![];
        let mut ioapics = vec![];
        while off < m.len() {
            let (ty, len) = (m[off], m[off + 1] as usize);
            match ty {
                0 => apic_ids.push(m[off + 3]),
                1 => ioapics.push(u32_at(&m, off + 4)),
                _ => panic!("unexpected MADT entry {ty}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(apic_ids, vec![0, 1, 2]);
        assert_eq!(ioapics, vec![IOAPIC_START as u32]);
    }

    #[test]
    fn mcfg_describes_ecam_for_bus_0() {
        let m = mcfg();
        assert_eq!(&m[..4], b"MCFG");
        assert_eq!(m.len(), 44 + 16);
        assert_eq!(u64_at(&m, 44), ECAM_START);
        assert_eq!(&m[52..56], &[0, 0, 0, 0]); // segment 0, bus 0..0
    }

    #[test]
    fn dsdt_has_host_bridge_and_s5() {
        let d = dsdt(&cfg());
        assert_eq!(&d[..4], b"DSDT");
        assert!(contains(&d, b"PCI0"));
        assert!(contains(&d, b"_S5_"));
        assert!(contains(&d, b"_SEG"));
        assert!(contains(&d, b"_BBN"));
        // COM1 (PNP0501) with IO 0x3f8 and an extended IRQ descriptor for IRQ 4.
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(
            &d,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        assert!(contains(
            &d,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
        ));
        // EISA id of PNP0A08 encoded as in the spec: 0x080AD041.
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        // The 64-bit window appears as a QWord address space descriptor with its base.
        assert!(contains(&d, &(1u64 << 32).to_le_bytes()));
    }
}
