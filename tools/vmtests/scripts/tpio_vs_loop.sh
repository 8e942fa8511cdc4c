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
# Env TPIO_VS_LOOP_VARIANTS: the tpio variants, space-separated (default "tpio tpio-s1");
# TPIO_VS_LOOP_CASES: the cases (default "4k 128k").
# Each round, per case: loop, the variants in order, then in reverse order, loop (ABBA). tpio
# runs with the engine's default batching (one SQ doorbell per refill round); tpio-sN commits
# every N commands as they are queued (--iodepth_batch_submit=N: an SQ doorbell per N commands,
# so the device may start on the first N while the rest are prepared). (fio's full per-I/O batching, with
# --iodepth_batch_complete_max=1 too, also polls and rings the CQ doorbell per completion: 0.16
# of the loop at 4 KiB in one loaded boot, against 0.48 for the default.)
# Prints "RUN <case> <loop|tpio|tpio-s1> <IOPS>" per run and "RATIO <case> <variant>/loop ..."
# per case and variant (medians).

RUNTIME=${1:-5}
ROUNDS=${2:-2}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
FAILED=0
RESULTS=/tmp/tpio_vs_loop.txt
VARIANTS=${TPIO_VS_LOOP_VARIANTS:-tpio tpio-s1}
CASES=${TPIO_VS_LOOP_CASES:-4k 128k}
REVERSED=$(for v in $VARIANTS; do echo "$v"; done | awk '{l[NR] = $0} END {for (i = NR; i > 0; i--) print l[i]}')
: >"$RESULTS"

loop_run() { # case
    out=$(TIDEPOOL_NVME_BENCH_SECS=$RUNTIME TIDEPOOL_NVME_BENCH_ROUNDS=1 \
        TIDEPOOL_NVME_BENCH_VARIANTS=reference TIDEPOOL_NVME_BENCH_ONLY=$1 /tests/nvme_bench)
    iops=$(echo "$out" | awk '/^RESULT reference/ {print $4; exit}')
    [ -n "$iops" ] || { echo "$out"; FAILED=1; iops=0; }
    echo "RUN $1 loop $iops" | tee -a "$RESULTS"
}

tpio_run() { # case variant
    batch=""
    case $2 in tpio-s*) batch="--iodepth_batch_submit=${2#tpio-s}" ;; esac
    case $1 in 4k) rw=randread ;; *) rw=read ;; esac
    json=$(tpio --name="tpio-$1" --ioengine=tidepool --filename="$BDF" --dma=zero-copy \
        --rw="$rw" --bs="$1" --iodepth=32 --size=1g --runtime="$RUNTIME" --time_based $batch \
        --output-format=json 2>&1)
    iops=$(echo "$json" | tr ',' '\n' | awk -F: '/"iops"/ {gsub(/[ }]/, "", $2); print $2; exit}')
    [ -n "$iops" ] || { echo "$json"; FAILED=1; iops=0; }
    echo "RUN $1 $2 $iops" | tee -a "$RESULTS"
}

round=1
while [ "$round" -le "$ROUNDS" ]; do
    for c in $CASES; do
        loop_run "$c"
        for v in $VARIANTS; do tpio_run "$c" "$v"; done
        for v in $REVERSED; do tpio_run "$c" "$v"; done
        loop_run "$c"
    done
    round=$((round + 1))
done

median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for c in $CASES; do
    l=$(awk -v c="$c" '$2 == c && $3 == "loop" {print $4}' "$RESULTS" | median)
    for v in $VARIANTS; do
        t=$(awk -v c="$c" -v v="$v" '$2 == c && $3 == v {print $4}' "$RESULTS" | median)
        echo "RATIO $c $v/loop $(awk -v t="$t" -v l="$l" 'BEGIN {printf "%.3f", (l > 0 ? t / l : 0)}') (median $v $t, median loop $l IOPS)"
    done
done
exit $FAILED
