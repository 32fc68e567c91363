#!/bin/sh
# Runs in L1 as nested-run's "vmm": binds the L0-provided virtio-blk at $BDF to vfio-pci and
# runs every guest-vfio mode against it. Exit status 0 only if all pass.
bdf=${BDF:-0000:00:18.0}
d=/sys/bus/pci/devices/$bdf
[ -e "$d" ] || { echo "l1-wrapper: no PCI device $bdf" >&2; exit 90; }
echo vfio-pci >"$d/driver_override"
[ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
echo "$bdf" >/sys/bus/pci/drivers_probe
echo "l1-wrapper: $bdf bound to $(basename "$(readlink "$d/driver")"), group $(basename "$(readlink "$d/iommu_group")")" >&2
rc=0
/usr/bin/guest-vfio errors --device "$bdf" || rc=1
/usr/bin/guest-vfio maps --device "$bdf" --size 4096 --count 2000 || rc=1
/usr/bin/guest-vfio maps --device "$bdf" --size 2097152 --count 64 || rc=1
/usr/bin/guest-vfio virtio-blk-read --device "$bdf" --sector 5 || rc=1
/usr/bin/guest-vfio shadow-blk-read --device "$bdf" --sector 5 || rc=1
echo "l1-wrapper: rc=$rc" >&2
exit $rc
