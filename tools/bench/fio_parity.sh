#!/usr/bin/env bash
# tools/bench/fio_parity.sh: does tpio's io_uring engine get the same numbers as fio?
#
# Runs fio and tpio with the same job (ioengine=io_uring, direct=1, time_based) on a CPU-bound
# block device: by default a loop device with direct I/O (`losetup --direct-io=on`) over a file in
# tmpfs, so every I/O costs CPU (the loop worker's copy) and no disk sets the pace. Needs root (loop
# setup) and fio; builds tpio (release) unless TPIO names a binary.
#
# Each cell (rw x bs x iodepth) runs ROUNDS rounds of three jobs: fio, tpio and fio again ("fio2",
# the noise baseline). The order rotates through the six permutations (fio tpio fio2, fio2 tpio fio,
# tpio fio2 fio, fio fio2 tpio, fio2 fio tpio, tpio fio fio2), so over 6 rounds every tool runs
# in every position equally often (ABBA generalised to three). Per round it prints tpio/fio (tpio
# against the geometric mean of the round's two fio runs) and fio2/fio; per cell the medians over
# the rounds. A cell is MET when the median tpio/fio is within +-TOLERANCE % of 1, MISSED
# otherwise; "noisy" is added when fio against itself (fio2/fio) strays beyond the tolerance,
# i.e. when the host's noise alone can make or break the cell, and the load average is recorded
# with every job. Writes (randwrite) overwrite the device: by default it is the script's own
# scratch file. Both tools run in a session of their own (fio's job processes call setsid, tpio
# forks one, see tools/tpio/src/session.rs), so neither shares the script's CPU share.
#
# Usage: tools/bench/fio_parity.sh [--rounds N] [--runtime SECONDS] [--rw "randread randwrite"]
#                                  [--bs "4k 128k"] [--iodepth "1 32 128"] [--size 1G]
#                                  [--device /dev/X] [--tolerance PCT] [--out DIR]
#                                  [--engine-opts "--fixedbufs=1 --registerfiles=1"]
# --engine-opts: options given to both tools (fio's io_uring engine options, which tpio takes
# too); by default both run with fio's defaults (plain buffers and fd, batch 1).
# Results: DIR (default target/bench/fio_parity): rounds.tsv (one line per job run: cell, round,
# position, tool, IOPS, bandwidth, load), summary.md (the per-cell table), and every JSON output.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROUNDS=6
RUNTIME=3
RWS="randread randwrite"
BSS="4k 128k"
DEPTHS="1 32 128"
SIZE=1G
DEVICE=
TOLERANCE=3
OUT=${CARGO_TARGET_DIR:-$ROOT/target}/bench/fio_parity
ENGINE_OPTS=
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=${2:?}; shift ;;
    --runtime) RUNTIME=${2:?}; shift ;;
    --rw) RWS=${2:?}; shift ;;
    --bs) BSS=${2:?}; shift ;;
    --iodepth) DEPTHS=${2:?}; shift ;;
    --size) SIZE=${2:?}; shift ;;
    --device) DEVICE=${2:?}; shift ;;
    --tolerance) TOLERANCE=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --engine-opts) ENGINE_OPTS=${2?}; shift ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "tools/bench/fio_parity.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds takes a positive whole number" >&2; exit 2; }
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || { echo "--runtime takes whole seconds" >&2; exit 2; }
command -v fio >/dev/null || { echo "fio is not installed (apt-get install fio)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is needed to read the JSON outputs" >&2; exit 1; }

if [ -z "${TPIO:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p tpio)
    TPIO=${CARGO_TARGET_DIR:-$ROOT/target}/release/tpio
fi
[ -x "$TPIO" ] || { echo "no tpio binary at $TPIO" >&2; exit 1; }

SCRATCH=
LOOP=
cleanup() {
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
    [ -n "$SCRATCH" ] && rm -f "$SCRATCH" || true
}
trap cleanup EXIT
if [ -z "$DEVICE" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "setting up a loop device needs root (or pass --device)" >&2; exit 1; }
    SCRATCH=$(mktemp /dev/shm/fio_parity.XXXXXX)
    truncate -s "$SIZE" "$SCRATCH"
    # Fill it, so reads copy real pages rather than tmpfs's zero page.
    fio --name=fill --filename="$SCRATCH" --rw=write --bs=1m --size="$SIZE" --ioengine=psync \
        --output=/dev/null
    LOOP=$(losetup -f --show --direct-io=on "$SCRATCH")
    DEVICE=$LOOP
fi
[ -b "$DEVICE" ] || { echo "$DEVICE is not a block device" >&2; exit 1; }

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/rounds.tsv "$OUT"/summary.md
printf 'cell\tround\tposition\ttool\tiops\tbw_bytes\tload1\n' >"$OUT/rounds.tsv"

# One job: tool (fio|tpio), rw, bs, depth, JSON file. Prints "iops bw_bytes".
job() {
    local tool=$1 rw=$2 bs=$3 depth=$4 json=$5 bin
    case "$tool" in fio*) bin=fio ;; tpio) bin=$TPIO ;; esac
    # shellcheck disable=SC2086 # ENGINE_OPTS is split into options on purpose
    "$bin" --name=parity --filename="$DEVICE" --ioengine=io_uring --direct=1 --rw="$rw" \
        --bs="$bs" --iodepth="$depth" --runtime="$RUNTIME" --time_based \
        --output-format=json --output="$json" $ENGINE_OPTS >/dev/null
    python3 - "$json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["write"] if job["write"]["io_bytes"] else job["read"]
print("%.1f %d" % (side["iops"], side["bw_bytes"]))
PY
}

load1() { cut -d' ' -f1 /proc/loadavg; }

echo "fio_parity: device $DEVICE, $ROUNDS rounds x ${RUNTIME}s per job, tpio $TPIO, $(fio --version), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)${ENGINE_OPTS:+, engine options: $ENGINE_OPTS}"
for rw in $RWS; do
    for bs in $BSS; do
        for depth in $DEPTHS; do
            cell="$rw-$bs-qd$depth"
            echo "== $cell (load before: $(load1))"
            for round in $(seq 1 "$ROUNDS"); do
                case $(((round - 1) % 6)) in
                0) order="fio tpio fio2" ;;
                1) order="fio2 tpio fio" ;;
                2) order="tpio fio2 fio" ;;
                3) order="fio fio2 tpio" ;;
                4) order="fio2 fio tpio" ;;
                *) order="tpio fio fio2" ;;
                esac
                position=0
                line="  round $round:"
                for tool in $order; do
                    position=$((position + 1))
                    read -r iops bw < <(job "$tool" "$rw" "$bs" "$depth" "$OUT/$cell-r$round-$tool.json")
                    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cell" "$round" "$position" "$tool" \
                        "$iops" "$bw" "$(load1)" >>"$OUT/rounds.tsv"
                    line="$line $tool=$iops"
                done
                echo "$line"
            done
            echo "   (load after: $(load1))"
        done
    done
done

python3 - "$OUT/rounds.tsv" "$TOLERANCE" "$OUT/summary.md" <<'PY'
import csv, statistics, sys
path, tolerance, summary = sys.argv[1], float(sys.argv[2]) / 100, sys.argv[3]
runs = {}
for row in csv.DictReader(open(path), delimiter="\t"):
    runs.setdefault(row["cell"], {}).setdefault(int(row["round"]), {})[row["tool"]] = (
        float(row["iops"]), float(row["load1"]))
lines = ["| cell | tpio/fio per round | median | fio2/fio per round | median (noise) | fio IOPS (median) | load | verdict |",
         "|---|---|---|---|---|---|---|---|"]
for cell, rounds in runs.items():
    ok = [r for r in rounds.values() if r["fio"][0] > 0 and r["fio2"][0] > 0]
    tp = [r["tpio"][0] / (r["fio"][0] * r["fio2"][0]) ** 0.5 for r in ok]
    noise = [r["fio2"][0] / r["fio"][0] for r in ok]
    loads = [v[1] for r in rounds.values() for v in r.values()]
    fio_iops = statistics.median(r["fio"][0] for r in rounds.values())
    med, nmed = statistics.median(tp), statistics.median(noise)
    verdict = "MET" if abs(med - 1) <= tolerance else "MISSED"
    if abs(nmed - 1) > tolerance or max(noise) - min(noise) > 2 * tolerance:
        verdict += " (noisy: fio2/fio spans %.2f..%.2f)" % (min(noise), max(noise))
    lines.append("| %s | %s | **%.3f** | %s | %.3f | %.0f | %.1f..%.1f | %s |" % (
        cell, " ".join("%.2f" % x for x in tp), med, " ".join("%.2f" % x for x in noise), nmed,
        fio_iops, min(loads), max(loads), verdict))
text = "\n".join(lines) + "\n"
open(summary, "w").write(text)
print(text, end="")
PY
echo "results: $OUT (rounds.tsv, summary.md, JSON outputs)"
