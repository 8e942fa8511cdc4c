#!/bin/sh
# VM "test" tpio_vs_loop: tpio's tidepool engine (zero-copy) against nvme_bench's minimal
# polled VFIO loop on the same controller, in one boot, alternating order (ABBA per round):
# 4 KiB random reads at QD 32 and 128 KiB sequential reads at QD 32. busybox sh.
#
# Run (nvme_bench must be installed too: it is listed first, cut short by the env):
#   tools/vm/run --tpio --env TIDEPOOL_NVME_BENCH_VARIANTS=reference \
#       --env TIDEPOOL_NVME_BENCH_SECS=1 --env TIDEPOOL_NVME_BENCH_ROUNDS=1 \
#       --test-timeout 600 nvme_bench tpio_vs_loop:5:2
# Usage: tpio_vs_loop [RUNTIME_SECONDS] [ROUNDS]
# Env TPIO_VS_LOOP_VARIANTS: the tpio variants, space-separated (default "tpio tpio-s1"; also
# tpio-null, the harness on the null engine; tpio-cpuN, the job pinned to guest CPU N;
# tpio-pause, with a PAUSE after each empty poll as tpio did before session 7: TPIO_POLL_PAUSE=1);
# TPIO_VS_LOOP_CASES: the cases (default "4k 128k"); TPIO_VS_LOOP_LOOPS: the loop's variants
# (default "loop"; loop-sN rings the SQ doorbell every N resubmitted commands, as tpio-sN does;
# "driver" is nvme_bench's own loop over the NVMe driver's IoQueue, zero-copy: between the two,
# the driver's share of the gap; "driver-tpio-config" the same loop on a controller opened as
# tpio opens it).
# Each round, per case: loop, the variants in order, then in reverse order, loop (ABBA). tpio
# runs with the engine's default batching (one SQ doorbell per refill round); tpio-sN commits
# every N commands as they are queued (--iodepth_batch_submit=N: an SQ doorbell per N commands,
# so the device may start on the first N while the rest are prepared). (fio's full per-I/O batching, with
# --iodepth_batch_complete_max=1 too, also polls and rings the CQ doorbell per completion: 0.16
# of the loop at 4 KiB in one loaded boot, against 0.48 for the default.)
# Prints "START <case> <variant>" as a run begins (a host-side profiler can key on it),
# "RUN <case> <variant> <IOPS>" per run and "RATIO <case> <tpio variant>/<loop variant> ..."
# per case and pair of variants (medians).

RUNTIME=${1:-5}
ROUNDS=${2:-2}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
FAILED=0
RESULTS=/tmp/tpio_vs_loop.txt
VARIANTS=${TPIO_VS_LOOP_VARIANTS:-tpio tpio-s1}
CASES=${TPIO_VS_LOOP_CASES:-4k 128k}
LOOPS=${TPIO_VS_LOOP_LOOPS:-loop}
reverse() { for v in "$@"; do echo "$v"; done | awk '{l[NR] = $0} END {for (i = NR; i > 0; i--) print l[i]}'; }
# shellcheck disable=SC2086 # word lists on purpose
REVERSED=$(reverse $VARIANTS)
# shellcheck disable=SC2086
REVLOOPS=$(reverse $LOOPS)
: >"$RESULTS"
# The guest's clock: under TCG a clock other than the TSC costs microseconds per read.
echo "clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"

loop_run() { # case variant
    echo "START $1 $2"
    every=0
    which=reference
    case $2 in
    loop-s*) every=${2#loop-s} ;;
    driver) which="mmio zero-copy" ;;
    driver-tpio-config) which="tpio-config zero-copy" ;;
    esac
    out=$(TIDEPOOL_NVME_BENCH_SECS=$RUNTIME TIDEPOOL_NVME_BENCH_ROUNDS=1 \
        TIDEPOOL_NVME_BENCH_RING_EVERY=$every \
        TIDEPOOL_NVME_BENCH_VARIANTS="$which" TIDEPOOL_NVME_BENCH_ONLY=$1 /tests/nvme_bench)
    iops=$(echo "$out" | awk -v w="RESULT $which " 'index($0, w) == 1 {n = split(w, p, " "); print $(n + 2); exit}')
    [ -n "$iops" ] || { echo "$out"; FAILED=1; iops=0; }
    echo "RUN $1 $2 $iops" | tee -a "$RESULTS"
}

tpio_run() { # case variant
    echo "START $1 $2"
    batch=""
    case $2 in
    tpio-s*) batch="--iodepth_batch_submit=${2#tpio-s}" ;;
    tpio-cpu*) batch="--cpus_allowed=${2#tpio-cpu}" ;;
    tpio-pause) export TPIO_POLL_PAUSE=1 ;;
    esac
    case $1 in 4k) rw=randread ;; *) rw=read ;; esac
    target="--ioengine=tidepool --filename=$BDF --dma=zero-copy"
    # tpio-null: the harness alone on the null engine (its guest CPU per I/O is 1 / IOPS).
    [ "$2" = tpio-null ] && target="--ioengine=null"
    # shellcheck disable=SC2086 # option lists on purpose
    json=$(tpio --name="tpio-$1" $target \
        --rw="$rw" --bs="$1" --iodepth=32 --size=1g --runtime="$RUNTIME" --time_based $batch \
        --output-format=json 2>&1)
    iops=$(echo "$json" | tr ',' '\n' | awk -F: '/"iops"/ {gsub(/[ }]/, "", $2); print $2; exit}')
    [ -n "$iops" ] || { echo "$json"; FAILED=1; iops=0; }
    unset TPIO_POLL_PAUSE
    echo "RUN $1 $2 $iops" | tee -a "$RESULTS"
    # Where a run's time went: its CPU use, and its queue's completions and doorbell writes.
    echo "$json" | grep -oE '"(usr_cpu|sys_cpu|ctx)": *[0-9.]*' | head -3 | tr '\n' ' '
    echo
    echo "$json" | tr -d '\n' | grep -o '"queue" *: *{[^}]*}' | head -1
    # The pool behind the slots (its chunks are IOMMU mappings) and the guest's hugepages.
    echo "$json" | grep -oE '"(capacity_bytes|chunks|grows|transient_allocs|cache_refills)": *[0-9]+' | head -5 | tr '\n' ' '
    grep -E 'HugePages_(Total|Free)' /proc/meminfo | tr -s ' \n' ' '
    echo
}

round=1
while [ "$round" -le "$ROUNDS" ]; do
    for c in $CASES; do
        for l in $LOOPS; do loop_run "$c" "$l"; done
        for v in $VARIANTS; do tpio_run "$c" "$v"; done
        for v in $REVERSED; do tpio_run "$c" "$v"; done
        for l in $REVLOOPS; do loop_run "$c" "$l"; done
    done
    round=$((round + 1))
done

median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for c in $CASES; do
    for lv in $LOOPS; do
        l=$(awk -v c="$c" -v lv="$lv" '$2 == c && $3 == lv {print $4}' "$RESULTS" | median)
        for v in $VARIANTS; do
            t=$(awk -v c="$c" -v v="$v" '$2 == c && $3 == v {print $4}' "$RESULTS" | median)
            echo "RATIO $c $v/$lv $(awk -v t="$t" -v l="$l" 'BEGIN {printf "%.3f", (l > 0 ? t / l : 0)}') (median $v $t, median $lv $l IOPS)"
        done
    done
done
exit $FAILED
