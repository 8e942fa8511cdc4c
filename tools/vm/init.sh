#!/bin/busybox sh
# Tidepool test VM: the guest's /init (busybox ash, PID 1).
#
# Built into the initramfs by tools/vm/run together with /etc/tidepool/config (shell variables,
# written by the host) and /etc/tidepool/tests (one test a line: `name [args...]`).
#
# What it does, in order:
#   1. mounts proc, sys, devtmpfs; sends its own output to the second serial port (ttyS1), which
#      the host streams, while the kernel console stays on ttyS0 (console.log on the host);
#   2. reserves hugepages and mounts hugetlbfs on /dev/hugepages;
#   3. takes every NVMe function meant for userspace away from the kernel's nvme driver (the
#      -cloud kernels have it built in and grab the device at boot): unbind, then driver_override;
#   4. loads the modules the host listed (IOMMU, nvme, vfio chain) in dependency order;
#   5. binds the userspace functions to vfio-pci and checks /dev/vfio/<group> exists;
#   6. runs every test with the harness environment exported, clearing dmesg before each one and
#      dumping it after, so that the host can attribute IOMMU faults to the test that ran;
#   7. powers off.
#
# The lines it prints that start with `TIDEPOOL-` form the protocol the host parses (see
# tools/vm/README.md). A setup failure prints `TIDEPOOL-SETUP-FAIL <reason>` and powers off.

/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

# The host streams ttyS1; fall back to the console if the second port is missing.
if [ -c /dev/ttyS1 ]; then
    exec </dev/null >/dev/ttyS1 2>&1
fi

# shellcheck source=/dev/null # written by tools/vm/run
. /etc/tidepool/config

say() { echo "TIDEPOOL-$*"; }
finish() {
    sync
    poweroff -f
    sleep 5
}
setup_fail() {
    say "SETUP-FAIL $*"
    dmesg | tail -n 30 | sed 's/^/TIDEPOOL-DMESG /'
    finish
}

say "INIT-START kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

# --- hugepages ---------------------------------------------------------------------------------
echo "$TP_HUGEPAGES" > /proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" -ge "$TP_HUGEPAGES" ] || setup_fail "reserved only $got of $TP_HUGEPAGES 2 MiB hugepages: give the VM more memory (--mem) or ask for fewer (--hugepages)"
mkdir -p /dev/hugepages
mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages || setup_fail "cannot mount hugetlbfs on /dev/hugepages"

# --- take the userspace functions away from kernel drivers, then load modules -----------------
for bdf in $TP_VFIO_BDFS $TP_VNET_VFIO_BDFS; do
    dev=/sys/bus/pci/devices/$bdf
    [ -d "$dev" ] || setup_fail "PCI function $bdf (meant for vfio-pci) is not in the guest: check the QEMU -device addr="
    if [ -e "$dev/driver" ]; then
        echo "$bdf" > "$dev/driver/unbind" || setup_fail "cannot unbind $bdf from $(basename "$(readlink "$dev/driver")")"
    fi
    echo vfio-pci > "$dev/driver_override" || setup_fail "cannot set driver_override on $bdf"
done

for mod in $TP_MODULES; do
    name=$(basename "$mod" .ko)
    params=""
    [ "$name" = vfio_iommu_type1 ] && params="$TP_TYPE1_PARAMS"
    # shellcheck disable=SC2086 # params is a word list on purpose
    insmod "/lib/modules/$mod" $params || setup_fail "insmod $name failed"
done

for bdf in $TP_VFIO_BDFS $TP_VNET_VFIO_BDFS; do
    dev=/sys/bus/pci/devices/$bdf
    [ -e "$dev/driver" ] || echo "$bdf" > /sys/bus/pci/drivers_probe
    drv=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
    [ "$drv" = vfio-pci ] || setup_fail "$bdf is bound to '${drv:-nothing}', not vfio-pci"
    [ -e "$dev/iommu_group" ] || setup_fail "$bdf has no IOMMU group: is the IOMMU on (intel_iommu=on / virtio-iommu driver)?"
    group=$(basename "$(readlink "$dev/iommu_group")")
    [ -c "/dev/vfio/$group" ] || setup_fail "/dev/vfio/$group missing for $bdf"
    # The VFIO cdev (iommufd backend), on kernels with CONFIG_VFIO_DEVICE_CDEV.
    cdev=$(ls "$dev/vfio-dev" 2>/dev/null | head -n1)
    say "VFIO $bdf group=$group${cdev:+ cdev=/dev/vfio/devices/$cdev}"
done

# The controller left to the kernel's nvme driver: find its namespace block device.
TIDEPOOL_KERNEL_NVME_DEV=""
if [ -n "$TP_KERNEL_NVME_BDF" ]; then
    i=0
    while [ $i -lt 100 ]; do
        for ns in "/sys/bus/pci/devices/$TP_KERNEL_NVME_BDF"/nvme/nvme*/nvme*n1; do
            [ -e "$ns" ] && TIDEPOOL_KERNEL_NVME_DEV=/dev/$(basename "$ns")
        done
        [ -n "$TIDEPOOL_KERNEL_NVME_DEV" ] && [ -b "$TIDEPOOL_KERNEL_NVME_DEV" ] && break
        TIDEPOOL_KERNEL_NVME_DEV=""
        i=$((i + 1))
        sleep 0.1
    done
    [ -n "$TIDEPOOL_KERNEL_NVME_DEV" ] || setup_fail "the kernel nvme driver did not create a namespace for $TP_KERNEL_NVME_BDF within 10 s"
    say "KERNEL-NVME $TP_KERNEL_NVME_BDF $TIDEPOOL_KERNEL_NVME_DEV"
fi

# The virtio-net function left to the kernel (--virtio-net): find its interface, give it
# 10.11.12.1/24 and switch IPv6 off on it (fewer unsolicited frames on the hub).
TIDEPOOL_VNET_KERNEL_IF=""
if [ -n "${TP_VNET_KERNEL_BDF:-}" ]; then
    i=0
    while [ $i -lt 100 ]; do
        for n in "/sys/bus/pci/devices/$TP_VNET_KERNEL_BDF"/virtio*/net/*; do
            [ -e "$n" ] && TIDEPOOL_VNET_KERNEL_IF=$(basename "$n")
        done
        [ -n "$TIDEPOOL_VNET_KERNEL_IF" ] && break
        i=$((i + 1))
        sleep 0.1
    done
    [ -n "$TIDEPOOL_VNET_KERNEL_IF" ] || setup_fail "the kernel virtio_net driver made no interface for $TP_VNET_KERNEL_BDF within 10 s"
    echo 1 > "/proc/sys/net/ipv6/conf/$TIDEPOOL_VNET_KERNEL_IF/disable_ipv6" 2>/dev/null
    ip link set "$TIDEPOOL_VNET_KERNEL_IF" up || setup_fail "ip link set $TIDEPOOL_VNET_KERNEL_IF up failed"
    ip addr add 10.11.12.1/24 dev "$TIDEPOOL_VNET_KERNEL_IF" || setup_fail "ip addr add on $TIDEPOOL_VNET_KERNEL_IF failed"
    say "KERNEL-NET $TP_VNET_KERNEL_BDF $TIDEPOOL_VNET_KERNEL_IF"
fi

# --- the environment every test sees ----------------------------------------------------------
# shellcheck disable=SC2086 # split the list into $1, $2, ...
set -- $TP_VFIO_BDFS
export TIDEPOOL_IN_VM=1
export TIDEPOOL_NVME_BDF="${1:-}"
TIDEPOOL_NVME_BDFS=$(echo "$TP_VFIO_BDFS" | tr ' ' ',')
export TIDEPOOL_NVME_BDFS
export TIDEPOOL_KERNEL_NVME_BDF="$TP_KERNEL_NVME_BDF"
export TIDEPOOL_KERNEL_NVME_DEV
export TIDEPOOL_HUGETLBFS=/dev/hugepages
export TIDEPOOL_IOMMU="$TP_IOMMU"
# shellcheck disable=SC2086 # split the list into $1, $2
set -- ${TP_VNET_VFIO_BDFS:-}
export TIDEPOOL_VNET_BDF="${1:-}"
export TIDEPOOL_VNET_NOIOMMU_BDF="${2:-}"
export TIDEPOOL_VNET_KERNEL_IF
export TIDEPOOL_VNET_KERNEL_IP=10.11.12.1
export TIDEPOOL_VNET_IP=10.11.12.2
if [ -f /etc/tidepool/env ]; then
    set -a
    # shellcheck source=/dev/null # written by tools/vm/run from --env
    . /etc/tidepool/env
    set +a
fi

# Faults while setting up belong to no test: report them as the "setup" phase.
say "SETUP-DONE uptime=$(cut -d' ' -f1 /proc/uptime) hugepages=$got"
dmesg -c | sed 's/^/TIDEPOOL-DMESG /'

# --- run the tests ----------------------------------------------------------------------------
while read -r name args; do
    case "$name" in '' | '#'*) continue ;; esac
    dmesg -c >/dev/null
    say "TEST-BEGIN $name"
    # shellcheck disable=SC2086 # args is a word list on purpose
    (cd /tmp && exec timeout -s KILL "$TP_TEST_TIMEOUT" "/tests/$name" $args) </dev/null
    rc=$?
    # Let a fault interrupt raised by the last DMA reach the log before it is read.
    sleep 0.2
    dmesg -c | sed 's/^/TIDEPOOL-DMESG /'
    say "TEST-END $name exit=$rc"
done </etc/tidepool/tests

say "ALL-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
finish
