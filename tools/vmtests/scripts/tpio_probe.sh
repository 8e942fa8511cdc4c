#!/bin/sh
# VM "test" tpio_probe: where tpio's tidepool engine loses to the lean loop, in one boot.
# Variants (4 KiB random reads QD 32), each round in rotating order:
#   loop      nvme_bench's reference loop
#   driver    nvme_bench's "mmio zero-copy" (the driver's own polled loop)
#   tpio      tpio zero-copy, --size=1g
#   tpio256   tpio zero-copy, --size=256m (the loop's span)
#   null      tpio's null engine (the harness alone, in the guest)
# Usage: tpio_probe [RUNTIME_SECONDS] [ROUNDS]
RUNTIME=${1:-3}
ROUNDS=${2:-2}
BDF=${TIDEPOOL_NVME_BDF:?no vfio NVMe}
R=/tmp/probe.txt
: >"$R"
bench() { # variant-name
    out=$(TIDEPOOL_NVME_BENCH_SECS=$RUNTIME TIDEPOOL_NVME_BENCH_ROUNDS=1 \
        TIDEPOOL_NVME_BENCH_VARIANTS="$1" TIDEPOOL_NVME_BENCH_ONLY=4k /tests/nvme_bench)
    echo "$out" | grep -E "profile" | head -2 >&2
    echo "$out" | sed -n "s/^RESULT $2 randread-4k \([0-9]*\) .*/\1/p" | head -1
}
iops_of() { tr ',' '\n' | awk -F: '/"iops"/ {gsub(/[ }]/, "", $2); print $2; exit}'; }
run() {
    case $1 in
    loop) i=$(bench reference "reference") ;;
    driver) i=$(bench "reference,mmio zero-copy" "mmio zero-copy") ;;
    tpio) i=$(tpio --name=p --ioengine=tidepool --filename="$BDF" --dma=zero-copy --rw=randread \
        --bs=4k --iodepth=32 --size=1g --runtime="$RUNTIME" --time_based --output-format=json 2>&1 | iops_of) ;;
    tpio256) i=$(tpio --name=p --ioengine=tidepool --filename="$BDF" --dma=zero-copy --rw=randread \
        --bs=4k --iodepth=32 --size=256m --runtime="$RUNTIME" --time_based --output-format=json 2>&1 | iops_of) ;;
    null) i=$(tpio --name=p --ioengine=null --rw=randread --bs=4k --iodepth=32 --size=1g \
        --runtime="$RUNTIME" --time_based --output-format=json 2>&1 | iops_of) ;;
    esac
    echo "RUN $1 $i" | tee -a "$R"
}
V="loop driver tpio tpio256 null"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    for v in $V; do run "$v"; done
    V=$(echo "$V" | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}')
    round=$((round + 1))
done
cat "$R"
exit 0
