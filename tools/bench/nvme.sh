#!/usr/bin/env bash
# tools/bench/nvme.sh: Tidepool's headline NVMe benchmarks, in one boot of the test VM.
#
# Boots tools/vm/run with tpio and Debian's fio in the guest and two emulated NVMe controllers
# (one bound to vfio-pci for ioengine=tidepool, one left to the kernel's nvme driver for
# io_uring), kernel command line with tsc=reliable (the harness default), runs the guest script
# tools/vmtests/scripts/tpio_bench.sh, cuts its JSON results out of the log, checks each with
# `python3 -m json.tool`, writes a Markdown summary with the ratios the targets are stated in,
# and plots them with `tpio plot`.
#
# Usage: tools/bench/nvme.sh [--runtime SECONDS] [--sets "dma kernel"] [--rounds N] [--out DIR]
#                            [--no-build] [-- more tools/vm/run options]
# --rounds N runs the DMA-mode set N times interleaved in the boot (DIR/r1 ... DIR/rN) and
# summarises it by medians over the rounds.
# Results: DIR (default target/bench/nvme): <run>.json, summary.md, dma.png, kernel-4k.png,
# kernel-128k.png, guest.out (the guest script's whole output). Medians over repeated boots:
# run it with --out DIR1, DIR2, ... and then `tools/bench/summarize.py RUNTIME DIR1 DIR2 ...`.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUNTIME=5
SETS="dma kernel"
ROUNDS=1
OUT=$ROOT/target/bench/nvme
BUILD=()
VM_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --runtime) RUNTIME=${2:?}; shift ;;
    --sets) SETS=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --no-build) BUILD=(--no-build) ;;
    --) shift; VM_ARGS=("$@"); break ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "tools/bench/nvme.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$RUNTIME" =~ ^[0-9]+$ ]] || { echo "--runtime takes whole seconds" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds takes a positive whole number" >&2; exit 2; }

LOGS=${TIDEPOOL_VM_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/vm}/logs
runs=0
for s in $SETS; do case "$s" in dma) runs=$((runs + 12 * ROUNDS)) ;; kernel) runs=$((runs + 10)) ;; esac; done
limit=$((runs * (RUNTIME + 6) + 60))

mkdir -p "$OUT"
rm -rf "$OUT"/*.json "$OUT"/*.png "$OUT"/summary.md "$OUT"/r[0-9]*
rounds_dirs=()
if [ "$ROUNDS" -gt 1 ]; then
    for r in $(seq 1 "$ROUNDS"); do mkdir -p "$OUT/r$r"; rounds_dirs+=("$OUT/r$r"); done
fi
status=0
"$ROOT/tools/vm/run" "${BUILD[@]}" --tpio --fio --kernel-nvme --nvme-size 1G --quiet \
    --test-timeout "$limit" "${VM_ARGS[@]}" "tpio_bench:$RUNTIME rounds=$ROUNDS $SETS" || status=$?
cp "$LOGS/tpio_bench.out" "$OUT/guest.out" 2>/dev/null || { echo "no guest output in $LOGS" >&2; exit 1; }
cp "$LOGS/summary.txt" "$OUT/vm-summary.txt" 2>/dev/null || true

# Cut the JSON documents out of the guest's output and check that each parses.
awk -v out="$OUT" '
    /^TPBENCH-BEGIN / { name = $2; file = out "/" name ".json"; printf "" > file; on = 1; next }
    /^TPBENCH-END /   { close(file); on = 0; next }
    on                { print >> file }' "$OUT/guest.out"
for f in "$OUT"/*.json "$OUT"/r[0-9]*/*.json; do
    [ -e "$f" ] || continue
    python3 -m json.tool "$f" >/dev/null || { echo "tools/bench/nvme.sh: $f is not valid JSON" >&2; status=1; }
done
grep '^TPBENCH-FAIL' "$OUT/guest.out" >&2 && status=1

# With rounds, each DMA-mode figure is the median over DIR/r1..rN (summarize.py takes, per run,
# the median over the folders that have it).
python3 "$ROOT/tools/bench/summarize.py" "$RUNTIME" "$OUT" "${rounds_dirs[@]}" | tee "$OUT/summary.md"

# Plots, with a host build of tpio.
(cd "$ROOT" && cargo build -q -p tpio) && TPIO=$ROOT/target/debug/tpio || TPIO=""
plot() {
    local out=$1; shift
    local files=()
    for f in "$@"; do [ -e "$OUT/$f.json" ] && files+=("$OUT/$f.json"); done
    [ ${#files[@]} -gt 0 ] && [ -n "$TPIO" ] && "$TPIO" plot "${files[@]}" -o "$OUT/$out" >/dev/null && echo "plot: $OUT/$out"
    return 0
}
dma_runs=()
dma_prefix=""
[ "$ROUNDS" -gt 1 ] && dma_prefix="r1/"   # one round's runs in the plot
for bs in 4k 16k 64k 128k; do for d in bounce map-per-io auto; do dma_runs+=("${dma_prefix}dma-$d-$bs"); done; done
plot dma.png "${dma_runs[@]}"
plot kernel-4k.png tidepool-bounce-randread-4k tidepool-zero-copy-randread-4k tpio-io_uring-randread-4k fio-io_uring-randread-4k fio-batch-io_uring-randread-4k
plot kernel-128k.png tidepool-bounce-read-128k tidepool-zero-copy-read-128k tpio-io_uring-read-128k fio-io_uring-read-128k fio-batch-io_uring-read-128k
exit "$status"
