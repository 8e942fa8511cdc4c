#!/bin/sh
# VM "test" tpio_bench: the headline NVMe benchmarks, run by tools/bench/nvme.sh in one boot
# (tools/vm/run --tpio --fio --kernel-nvme ...). busybox sh.
#
# Usage: tpio_bench [RUNTIME_SECONDS] [rounds=N] [SET...]   SET: dma, kernel (default both)
#
# rounds=N repeats the dma set N times, interleaved (round 1 of every mode and size, then
# round 2, ...), naming its results r1/dma-..., r2/dma-...: single 5 s runs of the same path
# differ by ~10 % under TCG, so the modes are compared by medians over rounds.
#
# Every result is printed as a JSON document between the lines
#   TPBENCH-BEGIN <name>   and   TPBENCH-END <name>
# which the host script cuts out of target/vm/logs/tpio_bench.out. A failed run prints
# TPBENCH-FAIL <name> <status> and makes the script exit 1 at the end.
#
# Sets:
#   dma     tidepool engine on the vfio controller, random reads at QD 64, 4k/16k/64k/128k,
#           --dma=bounce, map-per-io, auto (threshold calibrated at start)
#   kernel  4k randread QD32 and 128k seqread QD32: tidepool (bounce, zero-copy) on the vfio
#           controller; tpio io_uring and Debian's fio io_uring (--direct=1, fixedbufs,
#           registerfiles: what tpio's engine uses) on the kernel-owned controller's block device

RUNTIME=${1:-5}
shift 2>/dev/null
ROUNDS=1
case "${1:-}" in rounds=*) ROUNDS=${1#rounds=}; shift ;; esac
SETS=${*:-dma kernel}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
KDEV=${TIDEPOOL_KERNEL_NVME_DEV:-}
FAILED=0

# run NAME COMMAND...: runs a tpio command with JSON output and prints it between markers.
run() {
    name=$1
    shift
    mkdir -p "/tmp/$(dirname "$name")"
    echo "tpio_bench: $name: $*"
    if "$@" --output-format=json --output="/tmp/$name.json" >"/tmp/$name.log" 2>&1; then
        echo "TPBENCH-BEGIN $name"
        cat "/tmp/$name.json"
        echo "TPBENCH-END $name"
    else
        echo "TPBENCH-FAIL $name $?"
        cat "/tmp/$name.log"
        FAILED=1
    fi
}

# fio_run NAME FIO-OPTIONS...: the same for Debian's fio.
fio_run() {
    name=$1
    shift
    echo "tpio_bench: $name: fio $*"
    if fio "$@" --output-format=json --output="/tmp/$name.json" >"/tmp/$name.log" 2>&1; then
        echo "TPBENCH-BEGIN $name"
        cat "/tmp/$name.json"
        echo "TPBENCH-END $name"
    else
        echo "TPBENCH-FAIL $name $?"
        cat "/tmp/$name.log" "/tmp/$name.json" 2>/dev/null
        FAILED=1
    fi
}

TIME="--runtime=$RUNTIME --time_based"

for set in $SETS; do
    case "$set" in
    dma)
        round=1
        while [ "$round" -le "$ROUNDS" ]; do
            prefix=""
            [ "$ROUNDS" -gt 1 ] && prefix="r$round/"
            for bs in 4k 16k 64k 128k; do
                for dma in bounce map-per-io auto; do
                    # shellcheck disable=SC2086 # TIME is two options
                    run "${prefix}dma-$dma-$bs" tpio --name="$dma-$bs" --ioengine=tidepool \
                        --filename="$BDF" --dma="$dma" --rw=randread --bs="$bs" --iodepth=64 \
                        --size=1g $TIME
                done
            done
            round=$((round + 1))
        done
        ;;
    kernel)
        [ -n "$KDEV" ] || { echo "TPBENCH-FAIL kernel no kernel-owned NVMe (--kernel-nvme)"; FAILED=1; continue; }
        for w in "randread 4k" "read 128k"; do
            # shellcheck disable=SC2086 # split "randread 4k" into $1 $2 on purpose
            set -- $w
            rw=$1 bs=$2
            for dma in bounce zero-copy; do
                # shellcheck disable=SC2086
                run "tidepool-$dma-$rw-$bs" tpio --name="tidepool-$dma-$rw-$bs" --ioengine=tidepool \
                    --filename="$BDF" --dma="$dma" --rw="$rw" --bs="$bs" --iodepth=32 --size=1g $TIME
            done
            # shellcheck disable=SC2086
            run "tpio-io_uring-$rw-$bs" tpio --name="io_uring-$rw-$bs" --ioengine=io_uring --direct=1 \
                --filename="$KDEV" --rw="$rw" --bs="$bs" --iodepth=32 --size=1g $TIME
            # fixedbufs/registerfiles: the same io_uring features tpio's engine uses.
            fio_run "fio-io_uring-$rw-$bs" --name="io_uring-$rw-$bs" --ioengine=io_uring --direct=1 \
                --fixedbufs=1 --registerfiles=1 \
                --filename="$KDEV" --rw="$rw" --bs="$bs" --iodepth=32 --size=1g \
                --runtime="$RUNTIME" --time_based
            # fio submits every I/O with its own io_uring_enter by default (iodepth_batch_submit=1);
            # tpio queues all free slots and submits them with one. Same batching here:
            fio_run "fio-batch-io_uring-$rw-$bs" --name="io_uring-$rw-$bs" --ioengine=io_uring \
                --direct=1 --fixedbufs=1 --registerfiles=1 --iodepth_batch_submit=32 \
                --filename="$KDEV" --rw="$rw" --bs="$bs" --iodepth=32 --size=1g \
                --runtime="$RUNTIME" --time_based
        done
        ;;
    *) echo "TPBENCH-FAIL $set unknown set"; FAILED=1 ;;
    esac
done
exit $FAILED
