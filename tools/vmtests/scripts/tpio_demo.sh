#!/bin/sh
# VM "test" tpio_demo: the main job of tools/demo. busybox sh.
# Runs tpio with the tidepool engine (the userspace NVMe driver over VFIO) against the emulated
# NVMe controller: 4 KiB random reads at QD 32, then 128 KiB sequential reads, and prints tpio's
# fio-style summary of each. Usage: tpio_demo [RUNTIME_SECONDS] (default 5).
RUNTIME=${1:-5}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
status=0
for job in "randread 4k" "read 128k"; do
    # shellcheck disable=SC2086 # split "randread 4k" into $1 $2 on purpose
    set -- $job
    echo "tpio_demo: \$ tpio --ioengine=tidepool --filename=$BDF --rw=$1 --bs=$2 --iodepth=32 --runtime=${RUNTIME}s --time_based --size=256m"
    # Through a file: stdout is then no terminal, so tpio draws no live progress line.
    tpio --name="$1-$2" --ioengine=tidepool --filename="$BDF" --rw="$1" --bs="$2" --iodepth=32 \
        --runtime="$RUNTIME" --time_based --size=256m >/tmp/tpio_demo.txt || status=$?
    cat /tmp/tpio_demo.txt
done
exit $status
