#!/bin/sh
# VM "test" bounce_vs_zero_copy: tpio's tidepool engine, a bounced 4 KiB read (--dma=bounce: a
# pool buffer per I/O, zeroed or pre-zeroed, and a copy out) against zero copy (--dma=zero-copy)
# on the same controller, in one boot, alternating order (ABBA per round). busybox sh.
# The issue-#17 check: a bounced 4 KiB read >= 80 % of zero-copy IOPS.
#
# Run: tools/vm/run --tpio --nvme-size 1G --test-timeout 600 bounce_vs_zero_copy:5:3
# Usage: bounce_vs_zero_copy [RUNTIME_SECONDS] [ROUNDS]
# Prints "RUN <bounce|zero-copy> <IOPS>" per run and "RATIO bounce/zero-copy <median ratio>".

RUNTIME=${1:-5}
ROUNDS=${2:-2}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
FAILED=0
RESULTS=/tmp/bounce_vs_zero_copy.txt
: >"$RESULTS"

run() { # dma
    json=$(tpio --name="$1" --ioengine=tidepool --filename="$BDF" --dma="$1" --rw=randread \
        --bs=4k --iodepth=32 --size=1g --runtime="$RUNTIME" --time_based --output-format=json 2>&1)
    iops=$(echo "$json" | tr ',' '\n' | awk -F: '/"iops"/ {gsub(/[ }]/, "", $2); print $2; exit}')
    [ -n "$iops" ] || { echo "$json"; FAILED=1; iops=0; }
    echo "RUN $1 $iops" | tee -a "$RESULTS"
}

round=1
while [ "$round" -le "$ROUNDS" ]; do
    run zero-copy
    run bounce
    run bounce
    run zero-copy
    round=$((round + 1))
done

median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
z=$(awk '$2 == "zero-copy" {print $3}' "$RESULTS" | median)
b=$(awk '$2 == "bounce" {print $3}' "$RESULTS" | median)
echo "RATIO bounce/zero-copy $(awk -v b="$b" -v z="$z" 'BEGIN {printf "%.3f", (z > 0 ? b / z : 0)}') (median bounce $b, median zero-copy $z IOPS)"
exit $FAILED
