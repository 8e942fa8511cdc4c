#!/bin/sh
# VM "test" regression_ab: the same benchmarks from two builds side by side in one boot, order
# alternating before, after, after, before (ABBA) per round, for tools/bench/regression.sh.
# busybox sh.
#
# The builds come in with `tools/vm/run --extra-bin DIR`: /opt/before/ and /opt/after/, each
# holding the static nvme_bench, vnet_bench and tpio of its commit.
#
# Usage: regression_ab SET [RUNTIME_SECONDS] [ROUNDS]
#   SET nvme   nvme_bench (every variant and case of the build; one internal round, RUNTIME s
#              each) on the vfio controller                          (tools/vm/run default)
#   SET tpio   tpio, QD 32: tidepool engine zero-copy and bounce 4 KiB random reads and
#              zero-copy 128 KiB sequential reads on the vfio controller; io_uring --direct=1
#              4 KiB random and 128 KiB sequential reads on the kernel's NVMe namespace
#                                                                     (needs --kernel-nvme);
#              and io_uring 4 KiB random reads with the after build given
#              --iodepth_batch_submit=32 --iodepth_batch_complete_max=32: builds from before
#              tpio took fio's defaults (one submission and one completion at a time) batched
#              all they had, so this case compares the engines at the same batching; and
#              the 128 KiB zero-copy case with the after build on PRPs (--nvme-data-pointer=prp),
#              as builds from before always were
#   SET vnet   vnet_bench RUNTIME (its own 7 TX / 5 RX alternating rounds; per run, the medians
#              it prints)                                            (needs --virtio-net)
#   RUNTIME    seconds per measured run (default 2; vnet_bench takes fractions)
#   ROUNDS     ABBA rounds (default 1: four runs per case, two per build)
#
# Output, for scripts (higher|lower: which direction is better):
#   REGRESS-RUN <case> <before|after> <value> <higher|lower>          one per measured run
#   REGRESS-CASE <case> before=<median> after=<median> ratio=<after/before> <higher|lower>
# A run that fails prints its output and REGRESS-FAIL <case> <side>; the script then exits 1.

SET=${1:?usage: regression_ab nvme|tpio|vnet [RUNTIME_SECONDS] [ROUNDS]}
RUNTIME=${2:-2}
ROUNDS=${3:-1}
RESULTS=/tmp/regression_ab.txt
FAILED=0
: >"$RESULTS"

for side in before after; do
    [ -d "/opt/$side" ] || { echo "regression_ab: no /opt/$side (tools/vm/run --extra-bin DIR/$side)"; exit 1; }
done

emit() { # case side value direction
    echo "REGRESS-RUN $1 $2 $3 $4" | tee -a "$RESULTS"
}

fail() { # case side output
    echo "$3"
    echo "REGRESS-FAIL $1 $2"
    FAILED=1
}

# nvme_bench: "round 0 <variant> <case>: <iops> IOPS <GB/s> GB/s" per run, the same in both
# commits (fe5a03b has no TIDEPOOL_NVME_BENCH_ONLY/_VARIANTS, so neither build gets them: both
# run every variant and case).
nvme_run() { # side
    out=$(TIDEPOOL_NVME_BENCH_SECS=$RUNTIME TIDEPOOL_NVME_BENCH_ROUNDS=1 "/opt/$1/nvme_bench" 2>&1)
    rc=$?
    lines=$(echo "$out" | sed -n 's/^round [0-9]* \(.*\): \([0-9.]*\) IOPS .*/\1 \2/p')
    if [ "$rc" != 0 ] || [ -z "$lines" ]; then
        fail nvme_bench "$1" "$out"
        return
    fi
    echo "$lines" | while read -r a b c iops; do
        # "<variant words> <case> <iops>": variants are one or two words.
        if [ -z "$iops" ]; then iops=$c; name="$a-$b"; else name="$a-$b-$c"; fi
        emit "nvme_bench/$name" "$1" "$iops" higher
    done
}

# tpio's JSON: the first "iops" is the job's read IOPS (in both commits' reports).
tpio_run() { # side case engine dma rw bs [options for the after side only]
    side=$1 case=$2 engine=$3 dma=$4 rw=$5 bs=$6 after_opts=""
    if [ "$side" = after ]; then shift 6; after_opts="$*"; fi
    if [ "$engine" = tidepool ]; then
        target="--filename=${TIDEPOOL_NVME_BDF:?no vfio NVMe} --dma=$dma"
    else
        target="--filename=${TIDEPOOL_KERNEL_NVME_DEV:?no kernel NVMe: tools/vm/run --kernel-nvme} --direct=1"
    fi
    # shellcheck disable=SC2086 # target is two options
    out=$("/opt/$side/tpio" --name="$case" --ioengine="$engine" $target --rw="$rw" --bs="$bs" \
        --iodepth=32 --size=1g --runtime="$RUNTIME" --time_based --output-format=json \
        --output="/tmp/$case-$side.json" $after_opts 2>&1)
    rc=$?
    iops=$(tr ',' '\n' <"/tmp/$case-$side.json" 2>/dev/null | awk -F: '/"iops"/ {gsub(/[ }]/, "", $2); print $2; exit}')
    if [ "$rc" != 0 ] || [ -z "$iops" ]; then
        fail "tpio/$case" "$side" "$out"
        return
    fi
    emit "tpio/$case" "$side" "$iops" higher
}

# vnet_bench's own summary lines (medians of its rounds in this run):
#   TX <size> B: minimal loop median <pps> pps; driver bounce median <pps> pps = ..., driver
#     zero-copy median <pps> pps = ...
#   RX <size> B: share of pktgen's frames received, minimal loop median <p>%, driver median <p>% ...
# Its exit status is its own 90 %-of-the-minimal-loop verdict, not a failure to measure: the
# numbers count when both summaries are there.
vnet_run() { # side
    out=$("/opt/$1/vnet_bench" "$RUNTIME" 2>&1)
    tx=$(echo "$out" | sed -n 's/^TX \([0-9]*\) B: minimal loop median \([0-9.]*\) pps; driver bounce median \([0-9.]*\) pps.*driver zero-copy median \([0-9.]*\) pps.*/\1 \2 \3 \4/p')
    rx=$(echo "$out" | sed -n 's/^RX \([0-9]*\) B: share of pktgen.s frames received, minimal loop median \([0-9.]*\)%, driver median \([0-9.]*\)%.*/\1 \2 \3/p')
    if [ "$(echo "$tx" | grep -c .)" != 2 ] || [ "$(echo "$rx" | grep -c .)" != 2 ]; then
        fail vnet_bench "$1" "$out"
        return
    fi
    echo "$out" | grep -E '^(TX|RX) [0-9]+ B:' | sed "s/^/[$1] /"
    echo "$tx" | while read -r size base bounce zc; do
        emit "vnet_bench/tx-minimal-loop-$size" "$1" "$base" higher
        emit "vnet_bench/tx-bounce-$size" "$1" "$bounce" higher
        emit "vnet_bench/tx-zero-copy-$size" "$1" "$zc" higher
    done
    echo "$rx" | while read -r size base drv; do
        emit "vnet_bench/rx-minimal-loop-share-$size" "$1" "$base" higher
        emit "vnet_bench/rx-driver-share-$size" "$1" "$drv" higher
    done
}

round=1
while [ "$round" -le "$ROUNDS" ]; do
    echo "regression_ab: $SET round $round of $ROUNDS (before, after, after, before)"
    case "$SET" in
    nvme)
        for side in before after after before; do nvme_run "$side"; done
        ;;
    tpio)
        for c in "tidepool-zero-copy-randread-4k tidepool zero-copy randread 4k" \
            "tidepool-bounce-randread-4k tidepool bounce randread 4k" \
            "tidepool-zero-copy-read-128k tidepool zero-copy read 128k" \
            "io_uring-randread-4k io_uring - randread 4k" \
            "io_uring-read-128k io_uring - read 128k" \
            "io_uring-randread-4k-batch32 io_uring - randread 4k --iodepth_batch_submit=32 --iodepth_batch_complete_max=32" \
            "tidepool-zero-copy-read-128k-prp tidepool zero-copy read 128k --nvme-data-pointer=prp"; do
            for side in before after after before; do
                # shellcheck disable=SC2086 # the case's words are the arguments
                tpio_run "$side" $c
            done
        done
        ;;
    vnet)
        for side in before after after before; do vnet_run "$side"; done
        ;;
    *) echo "regression_ab: unknown set '$SET' (nvme, tpio or vnet)"; exit 2 ;;
    esac
    round=$((round + 1))
done

median() { sort -n | awk '{v[NR] = $1} END {if (NR == 0) m = 0; else if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f\n", m}'; }
for c in $(awk '{print $2}' "$RESULTS" | awk '!seen[$0]++'); do
    b=$(awk -v c="$c" '$2 == c && $3 == "before" {print $4}' "$RESULTS" | median)
    a=$(awk -v c="$c" '$2 == c && $3 == "after" {print $4}' "$RESULTS" | median)
    dir=$(awk -v c="$c" '$2 == c {print $5; exit}' "$RESULTS")
    echo "REGRESS-CASE $c before=$b after=$a ratio=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}') $dir"
done
exit $FAILED
