#!/bin/sh
# Default L2 script: show what the guest sees of its IOMMU and devices.
echo "== kernel $(uname -r), $(nproc) CPU(s), cmdline: $(cat /proc/cmdline)"
echo "== PCI devices"
for d in /sys/bus/pci/devices/*; do
    [ -e "$d" ] || continue
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "$(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class") driver=$drv"
done
echo "== IOMMU groups"
found=0
for d in /sys/kernel/iommu_groups/*/devices/*; do
    [ -e "$d" ] || continue
    found=1
    g=${d#/sys/kernel/iommu_groups/}
    echo "group ${g%%/*}: ${d##*/}"
done
[ "$found" = 1 ] || echo "(no IOMMU groups)"
echo "== kernel log (iommu, virtio, vfio, errors)"
dmesg | grep -iE 'iommu|virtio|vfio|viot|error|fail|warn' || echo "(nothing relevant)"
if [ -b /dev/vda ]; then
    echo "== /dev/vda: $(cat /sys/block/vda/size) sectors"
    # O_DIRECT: a real device read (DMA), translated by the vIOMMU when the disk is behind one.
    echo "first 4 KiB (O_DIRECT DMA read) md5: $(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | md5sum)"
    echo "first line: $(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -n1)"
else
    echo "== no /dev/vda"
fi
