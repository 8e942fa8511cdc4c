#!/bin/sh
# VM "test" fio_vs_tpio: why does Debian's fio report fewer IOPS than tpio's io_uring engine on
# the same kernel-owned NVMe in the guest? Runs the same 4k randread QD32 workload with tpio and
# with fio variants, all in one boot, and for each run prints the tool's own IOPS next to the
# *kernel's* count of reads completed on the device (/sys/block/<dev>/stat over the run's wall
# time, from /proc/uptime) and the guest's CPU split (/proc/stat: user, system, irq+softirq,
# idle). If a tool's IOPS disagrees with the kernel's count, the tool mis-measures; if they agree,
# the gap is real work done, and the CPU split says where the time goes.
# Not in tests.list: a measurement.
# Run: tools/vm/run --tpio --fio --kernel-nvme --nvme-size 1G fio_vs_tpio
DEV=${TIDEPOOL_KERNEL_NVME_DEV:?boot with --kernel-nvme}
T=${1:-5}
NAME=$(basename "$DEV")
COMMON="--name=r --filename=$DEV --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --size=1g --runtime=$T --time_based"
FIO="--fixedbufs=1 --registerfiles=1"
iops() { sed -n 's/.*"iops" *: *\([0-9.]*\).*/\1/p' "$1" | head -1; }
reads() { awk '{print $1}' "/sys/block/$NAME/stat"; }
now() { awk '{print $1}' /proc/uptime; }
# user nice system idle iowait irq softirq (jiffies, all CPUs)
cpu() { awk '/^cpu /{print $2, $3, $4, $5, $6, $7, $8}' /proc/stat; }
# run LABEL JSON CMD...: runs CMD, prints the tool's IOPS, the kernel's and the CPU split.
run() {
    label=$1
    json=$2
    shift 2
    r0=$(reads)
    t0=$(now)
    c0=$(cpu)
    if ! "$@" --output-format=json --output="$json" >/dev/null 2>&1; then
        echo "fio_vs_tpio: $label FAILED"
        return
    fi
    r1=$(reads)
    t1=$(now)
    c1=$(cpu)
    echo "$label|$(iops "$json")|$r0|$r1|$t0|$t1|$c0|$c1" | awk -F'|' '{
        split($7, a, " "); split($8, b, " ");
        tot = 0; for (i = 1; i <= 7; i++) { d[i] = b[i] - a[i]; tot += d[i] }
        if (tot == 0) tot = 1;
        wall = $6 - $5;
        printf "fio_vs_tpio: %s: tool %.0f IOPS, kernel %.0f IOPS (%d reads in %.2f s), cpu usr %.0f%% sys %.0f%% irq %.0f%% idle %.0f%%\n",
            $1, $2, ($4 - $3) / wall, $4 - $3, wall,
            100 * (d[1] + d[2]) / tot, 100 * d[3] / tot, 100 * (d[6] + d[7]) / tot, 100 * (d[4] + d[5]) / tot
    }'
}
echo "fio_vs_tpio: kernel counts include each tool's start-up and exit, so expect them a few % under the tool's"
for round in 1 2; do
    run "round $round tpio io_uring" /tmp/t.json tpio $COMMON
    run "round $round fio" /tmp/f.json fio $COMMON $FIO
    run "round $round fio --gtod_reduce=1" /tmp/g.json fio $COMMON $FIO --gtod_reduce=1
    run "round $round fio --thread" /tmp/h.json fio $COMMON $FIO --thread
    run "round $round fio hipri-less, nonvectored=0" /tmp/n.json fio $COMMON $FIO --nonvectored=0
done
