//! Linux 64-bit boot protocol: bzImage and initramfs loading, the zero page (boot_params),
//! the command line, and the boot-time GDT and identity page tables the vCPU starts with.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, CAN_USE_HEAP, LOADED_HIGH};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memory::{Layout, HIMEM_START};

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (a single null entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum command line length including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// GDT entries loaded at boot: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Build a GDT descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel image could not be opened.
    #[error("cannot open kernel {0}")]
    KernelOpen(String, #[source] std::io::Error),
    /// Kernel image is not a loadable bzImage.
    #[error("cannot load kernel")]
    KernelLoad(#[from] linux_loader::loader::Error),
    /// Initramfs could not be read.
    #[error("cannot read initramfs {0}")]
    Initramfs(String, #[source] std::io::Error),
    /// Initramfs does not fit below the PCI hole.
    #[error("initramfs of {0} bytes does not fit in guest RAM")]
    InitramfsTooBig(u64),
    /// Command line invalid or too long.
    #[error("bad kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot data to guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Writing the zero page failed.
    #[error("cannot write boot parameters")]
    BootParams(#[from] linux_loader::configurator::Error),
    /// bzImage without a setup header (not a Linux bzImage).
    #[error("kernel has no setup header")]
    NoSetupHeader,
}

/// What the vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// 64-bit entry point (load address + 0x200).
    pub entry: GuestAddress,
    /// Address of the zero page (passed in RSI).
    pub zero_page: GuestAddress,
}

/// Inputs of [`load_linux`].
pub struct LinuxBoot<'a> {
    /// bzImage path.
    pub kernel: &'a Path,
    /// Optional initramfs path.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Physical address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Load a bzImage, the initramfs and the command line, and write the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    boot: &LinuxBoot<'_>,
) -> Result<BootInfo, BootError> {
    let mut kernel = File::open(boot.kernel)
        .map_err(|e| BootError::KernelOpen(boot.kernel.display().to_string(), e))?;
    let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))?;
    let mut params = boot_params {
        hdr: loaded.setup_header.ok_or(BootError::NoSetupHeader)?,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = boot.cmdline.len() as u32 + 1;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(boot.cmdline)
        .map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::KernelLoad)?;

    if let Some(path) = boot.initramfs {
        let data =
            std::fs::read(path).map_err(|e| BootError::Initramfs(path.display().to_string(), e))?;
        let size = data.len() as u64;
        // As high as possible below both the PCI hole and the kernel's initrd_addr_max.
        let max = layout
            .low_ram_end()
            .min(u64::from(params.hdr.initrd_addr_max).saturating_add(1));
        let kernel_end = loaded.kernel_end;
        let addr = max
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or(BootError::InitramfsTooBig(size))?;
        mem.write_slice(&data, GuestAddress(addr))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.acpi_rsdp_addr = boot.rsdp;
    let e820 = layout.e820();
    for (i, e) in e820.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    write_boot_tables(mem)?;
    Ok(BootInfo {
        entry: loaded.kernel_load.unchecked_add(0x200),
        zero_page: GuestAddress(ZERO_PAGE_START),
    })
}

/// Write the boot GDT, a null IDT and identity page tables mapping the first 1 GiB with
/// 2 MiB pages.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_usual_encoding() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let layout = Layout::new(64 << 20).unwrap();
        let mem = layout.allocate().unwrap();
        let err = load_linux(
            &mem,
            &layout,
            &LinuxBoot {
                kernel: Path::new("/nonexistent/bzImage"),
                initramfs: None,
                cmdline: "console=ttyS0",
                rsdp: 0,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bzImage"));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let layout = Layout::new(64 << 20).unwrap();
        let mem = layout.allocate().unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5au8; 8192]).unwrap();
        let r = load_linux(
            &mem,
            &layout,
            &LinuxBoot {
                kernel: &dir,
                initramfs: None,
                cmdline: "",
                rsdp: 0,
            },
        );
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(r, Err(BootError::KernelLoad(_))));
    }

    /// Loads the Debian guest kernel the image scripts fetch (skipped when it is absent) and
    /// checks the zero page the kernel will read.
    #[test]
    fn real_bzimage_zero_page() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/images");
        let kernel = dir.join("vmlinuz");
        if !kernel.exists() {
            return crate::skip::skipped(
                "boot::real_bzimage_zero_page",
                &format!("{} not built (guest-images/build.sh)", kernel.display()),
            );
        }
        let initrd = std::env::temp_dir().join(format!("vmm-boot-initrd-{}", std::process::id()));
        std::fs::write(&initrd, vec![0xa5u8; 100_000]).unwrap();
        let layout = Layout::new(256 << 20).unwrap();
        let mem = layout.allocate().unwrap();
        let info = load_linux(
            &mem,
            &layout,
            &LinuxBoot {
                kernel: &kernel,
                initramfs: Some(&initrd),
                cmdline: "console=ttyS0 test=1",
                rsdp: 0xe0000,
            },
        )
        .unwrap();
        std::fs::remove_file(&initrd).unwrap();
        assert_eq!(info.entry, GuestAddress(HIMEM_START + 0x200));
        let zp: boot_params = mem.read_obj(info.zero_page).unwrap();
        let hdr = zp.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut cmd = [0u8; 21];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 test=1\0");
        let (rd, rd_size) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
        assert_eq!(rd_size, 100_000);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + u64::from(rd_size) <= layout.low_ram_end());
        assert!(
            u64::from(rd) >= HIMEM_START + 0x100_0000,
            "initramfs placed high"
        );
        let mut first = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(rd.into())).unwrap();
        assert_eq!(first, [0xa5; 4]);
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(usize::from(zp.e820_entries), layout.e820().len());
        let e0 = zp.e820_table[2];
        assert_eq!(
            ({ e0.addr }, { e0.size }, { e0.r#type }),
            (HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
    }
}
