//! Writes the seed corpus: `seeds [DIR]` (default `corpus`) creates `DIR/<target>/seed-<name>`
//! for every fuzz target, then replays each seed through its harness (a smoke test that runs
//! without libFuzzer). `seeds --replay <target> <file>` runs one input (e.g. a crash).

use std::path::PathBuf;

type Seeds = fn() -> Vec<(String, Vec<u8>)>;
type Run = fn(&[u8]);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--replay") {
        // `seeds --replay <target> <file>`: run one input without libFuzzer (debuggable).
        let data = std::fs::read(&args[3]).expect("input file");

        match args[2].as_str() {
            "viommu_queue" => vmm_fuzz::viommu_queue::run(&data),
            "virtio_pci" => vmm_fuzz::virtio_pci::run(&data),
            "pci_config" => vmm_fuzz::pci_config::run(&data),
            "shadow" => vmm_fuzz::shadow::run(&data),
            "vfio_pci" => vmm_fuzz::vfio_pci::run(&data),
            #[cfg(feature = "blk")]
            "virtio_blk" => vmm_fuzz::virtio_blk::run(&data),
            #[cfg(feature = "blk")]
            "virtio_pci_devs" => vmm_fuzz::virtio_pci_devs::run(&data),
            #[cfg(feature = "blk")]
            "blk_iommu" => vmm_fuzz::blk_iommu::run(&data),
            #[cfg(feature = "blk")]
            "virtio_net" => vmm_fuzz::virtio_net::run(&data),
            t => panic!("unknown target {t}"),
        }
        return;
    }
    let dir = PathBuf::from(args.get(1).cloned().unwrap_or_else(|| "corpus".into()));
    let targets: &[(&str, Seeds, Run)] = &[
        (
            "viommu_queue",
            vmm_fuzz::viommu_queue::seeds,
            vmm_fuzz::viommu_queue::run,
        ),
        (
            "virtio_pci",
            vmm_fuzz::virtio_pci::seeds,
            vmm_fuzz::virtio_pci::run,
        ),
        (
            "pci_config",
            vmm_fuzz::pci_config::seeds,
            vmm_fuzz::pci_config::run,
        ),
        ("shadow", vmm_fuzz::shadow::seeds, vmm_fuzz::shadow::run),
        (
            "vfio_pci",
            vmm_fuzz::vfio_pci::seeds,
            vmm_fuzz::vfio_pci::run,
        ),
        #[cfg(feature = "blk")]
        (
            "virtio_blk",
            vmm_fuzz::virtio_blk::seeds,
            vmm_fuzz::virtio_blk::run,
        ),
        #[cfg(feature = "blk")]
        (
            "virtio_pci_devs",
            vmm_fuzz::virtio_pci_devs::seeds,
            vmm_fuzz::virtio_pci_devs::run,
        ),
        #[cfg(feature = "blk")]
        (
            "blk_iommu",
            vmm_fuzz::blk_iommu::seeds,
            vmm_fuzz::blk_iommu::run,
        ),
        #[cfg(feature = "blk")]
        (
            "virtio_net",
            vmm_fuzz::virtio_net::seeds,
            vmm_fuzz::virtio_net::run,
        ),
    ];
    for &(name, seeds, run) in targets {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("corpus dir");
        let seeds = seeds();
        for (seed, bytes) in &seeds {
            std::fs::write(d.join(format!("seed-{seed}")), bytes).expect("write seed");
            run(bytes);
        }
        println!("{name}: {} seeds in {}", seeds.len(), d.display());
    }
}
