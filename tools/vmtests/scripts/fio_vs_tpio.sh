#!/bin/sh
# VM "test" fio_vs_tpio: why does Debian's fio report fewer IOPS than tpio's io_uring engine on
# the same kernel-owned NVMe in the guest? Runs the same 4k randread QD32 workload with tpio and
# with fio, then fio with its per-I/O clock reads cut (--gtod_reduce=1) and with batched
# submission, all in one boot, and prints each one's IOPS. Not in tests.list: a measurement.
# Run: tools/vm/run --tpio --fio --kernel-nvme --nvme-size 1G fio_vs_tpio
DEV=${TIDEPOOL_KERNEL_NVME_DEV:?boot with --kernel-nvme}
T=${1:-5}
COMMON="--name=r --filename=$DEV --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --size=1g --runtime=$T --time_based"
iops() { sed -n 's/.*"iops" *: *\([0-9.]*\).*/\1/p' "$1" | head -1; }
cpu() { sed -n 's/.*"usr_cpu" *: *\([0-9.]*\).*/\1/p' "$1" | head -1; }
for round in 1 2; do
    tpio $COMMON --output-format=json --output=/tmp/t.json >/dev/null 2>&1 && echo "fio_vs_tpio: round $round tpio io_uring: $(iops /tmp/t.json) IOPS, usr_cpu $(cpu /tmp/t.json)"
    fio $COMMON --fixedbufs=1 --registerfiles=1 --output-format=json --output=/tmp/f.json >/dev/null 2>&1 && echo "fio_vs_tpio: round $round fio: $(iops /tmp/f.json) IOPS, usr_cpu $(cpu /tmp/f.json)"
    fio $COMMON --fixedbufs=1 --registerfiles=1 --gtod_reduce=1 --output-format=json --output=/tmp/g.json >/dev/null 2>&1 && echo "fio_vs_tpio: round $round fio --gtod_reduce=1: $(iops /tmp/g.json) IOPS, usr_cpu $(cpu /tmp/g.json)"
    fio $COMMON --fixedbufs=1 --registerfiles=1 --gtod_reduce=1 --iodepth_batch_submit=32 --iodepth_batch_complete_min=1 --output-format=json --output=/tmp/b.json >/dev/null 2>&1 && echo "fio_vs_tpio: round $round fio --gtod_reduce=1 batched: $(iops /tmp/b.json) IOPS, usr_cpu $(cpu /tmp/b.json)"
done
