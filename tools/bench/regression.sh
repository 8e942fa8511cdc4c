#!/usr/bin/env bash
# tools/bench/regression.sh: before/after no-regression check (issue #12, "Performance"): the
# same benchmarks built from two commits, run side by side, order alternating BEFORE, AFTER,
# AFTER, BEFORE (ABBA) per round, medians compared. A case is a REGRESSION when AFTER is more
# than 5 % worse than BEFORE.
#
# Usage: tools/bench/regression.sh [--before COMMIT] [--after COMMIT] [--sets "pool nvme tpio vnet"]
#                                  [--rounds N] [--pool-rounds N] [--runtime S] [--vnet-runtime S]
#                                  [--criterion "ARGS"] [--out DIR] [-- more tools/vm/run options]
#   --before COMMIT   default fe5a03b (main just before the device-seam work of issue #12)
#   --after COMMIT    default HEAD (committed state: uncommitted changes are not measured)
#   --sets            which comparisons (default all four):
#                     pool  criterion `pool` bench (benches/benches/pool.rs) on the host; the rows
#                           both commits have, criterion's point estimate per run, plus the
#                           wake-up p50/p99 lines
#                     nvme  nvme_bench in the VM (one boot)
#                     tpio  tpio's tidepool engine (vfio NVMe) and io_uring (--kernel-nvme), one boot
#                     vnet  vnet_bench in the VM (--virtio-net), one boot
#   --rounds N        ABBA rounds in each VM boot (default 1: two runs per build and case)
#   --pool-rounds N   ABBA rounds of the pool bench (default 1)
#   --runtime S       seconds per measured VM run (default 2)
#   --vnet-runtime S  vnet_bench's seconds per run (default 0.5; it does 7 TX and 5 RX rounds)
#   --criterion ARGS  criterion options for the pool bench
#                     (default "--warm-up-time 1 --measurement-time 3 --noplot")
#   --table RUNS...   only print the table of earlier runs.txt files, their runs pooled
#   --out DIR         results (default target/bench/regression): pool-<n>-<side>.txt,
#                     vm-<set>.out, runs.txt (every run), table.md (the final table)
#
# Builds: each commit is checked out once with `git worktree add --detach` under
# target/regression/src/<sha>, built with one shared CARGO_TARGET_DIR (target/regression/cargo:
# dependencies compile once for both), and its binaries are kept in target/regression/bin/<sha>/
# (static nvme_bench, vnet_bench, tpio for the guest; the pool bench for the host): a commit is
# built only once. The VM gets both builds through `tools/vm/run --extra-bin` as /opt/before and
# /opt/after; the guest side is tools/vmtests/scripts/regression_ab.sh.
#
# Exit status: 0 no regression; 1 a regression or a failed run; 2 bad usage or a failed build.

set -euo pipefail
main() {
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BEFORE=fe5a03b
AFTER=HEAD
SETS="pool nvme tpio vnet"
ROUNDS=1
POOL_ROUNDS=1
RUNTIME=2
VNET_RUNTIME=0.5
CRITERION="--warm-up-time 1 --measurement-time 3 --noplot"
OUT=$ROOT/target/bench/regression
VM_ARGS=()
TABLE_FILES=()
die() { echo "tools/bench/regression.sh: $*" >&2; exit 2; }
# table RUNS_FILE...: the final table over every run in the files (several files: runs pooled).
table() {
    python3 - "$@" <<'EOF'
import sys
from collections import OrderedDict
runs = OrderedDict()
for path in sys.argv[1:]:
    for line in open(path):
        if line.startswith("#"):
            print(line.rstrip())
            continue
        case, side, value, better = line.split()
        r = runs.setdefault(case, {"before": [], "after": [], "better": better})
        r[side].append(float(value))

def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

def spread(v):
    return (max(v) - min(v)) / median(v) * 100 if len(v) > 1 and median(v) > 0 else 0.0

def fmt(x):
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"

print()
print("| case | better | BEFORE median | AFTER median | AFTER/BEFORE | spread B / A | runs apart | verdict | BEFORE runs | AFTER runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
regressions, noisy, only, apart_worse = [], [], [], []
for case, r in runs.items():
    b, a = r["before"], r["after"]
    if not b or not a:
        only.append(case)
        continue
    mb, ma = median(b), median(a)
    ratio = ma / mb if mb else float("nan")
    lower = r["better"] == "lower"
    worse = ratio > 1.05 if lower else ratio < 0.95
    sb, sa = spread(b), spread(a)
    # Apart: every AFTER run worse (or better) than every BEFORE run.
    if (min(a) > max(b)) if lower else (max(a) < min(b)):
        apart = "all AFTER worse"
        apart_worse.append(case)
    elif (max(a) < min(b)) if lower else (min(a) > max(b)):
        apart = "all AFTER better"
    else:
        apart = "overlap"
    verdict = "REGRESSION" if worse else "ok"
    if worse:
        regressions.append(case)
    if max(sb, sa) > 5:
        noisy.append(case)
        verdict += " (noise > 5 %)"
    print(f"| {case} | {r['better']} | {fmt(mb)} | {fmt(ma)} | {ratio:.3f} | {sb:.0f} % / {sa:.0f} % | {apart} "
          f"| {verdict} | {', '.join(fmt(x) for x in b)} | {', '.join(fmt(x) for x in a)} |")
print()
print("spread: (max - min) / median of one build's runs. runs apart: whether the builds' runs overlap.")
print("Runs are listed in the order they ran (ABBA per round).")
if only:
    print(f"left out (measured by one build only): {', '.join(only)}")
if noisy:
    print(f"{len(noisy)} case(s) whose runs of one build differ by more than 5 %: a 5 % call is not reliable for them.")
if apart_worse:
    print(f"every AFTER run worse than every BEFORE run: {', '.join(apart_worse)}")
print(f"{len(regressions)} REGRESSION(s)" + (": " + ", ".join(regressions) if regressions else ""))
sys.exit(1 if regressions else 0)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --before) BEFORE=${2:?}; shift ;;
    --after) AFTER=${2:?}; shift ;;
    --sets) SETS=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --pool-rounds) POOL_ROUNDS=${2:?}; shift ;;
    --runtime) RUNTIME=${2:?}; shift ;;
    --vnet-runtime) VNET_RUNTIME=${2:?}; shift ;;
    --criterion) CRITERION=${2?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --table) shift; TABLE_FILES=("$@"); break ;;
    --) shift; VM_ARGS=("$@"); break ;;
    -h | --help) sed -n '2,37p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
if [ ${#TABLE_FILES[@]} -gt 0 ]; then
    table "${TABLE_FILES[@]}"
    exit $?
fi

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds takes a positive whole number"
[[ "$POOL_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--pool-rounds takes a positive whole number"
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "--runtime takes whole seconds"
[[ "$VNET_RUNTIME" =~ ^[0-9]*\.?[0-9]+$ ]] || die "--vnet-runtime takes seconds"
for s in $SETS; do case "$s" in pool | nvme | tpio | vnet) ;; *) die "unknown set '$s' (pool, nvme, tpio, vnet)" ;; esac; done
BEFORE_SHA=$(git -C "$ROOT" rev-parse --verify -q "$BEFORE^{commit}") || die "--before $BEFORE: no such commit"
AFTER_SHA=$(git -C "$ROOT" rev-parse --verify -q "$AFTER^{commit}") || die "--after $AFTER: no such commit"

REG=$ROOT/target/regression
# One cargo target dir for both commits' worktrees (dependencies build once); only for the
# builds: tools/vm/run keeps its own folder (TIDEPOOL_VM_DIR or target/vm).
SHARED_TARGET=$REG/cargo
LOGS=${TIDEPOOL_VM_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/vm}/logs
note() { printf 'regression: %s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# build SHA: the commit's binaries in $REG/bin/SHA (once).
build() {
    local sha=$1 src=$REG/src/$1 bin=$REG/bin/$1
    [ -f "$bin/.complete" ] && { note "$sha: cached build in $bin"; return 0; }
    if [ ! -e "$src/.git" ]; then
        mkdir -p "$REG/src"
        git -C "$ROOT" worktree add --detach "$src" "$sha" >&2 || die "git worktree add $src $sha failed"
    fi
    note "$sha: building (static guest binaries, then the pool bench; load $(load))"
    mkdir -p "$bin"
    (cd "$src" && CARGO_TARGET_DIR=$SHARED_TARGET RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
        --target x86_64-unknown-linux-gnu -p tidepool-vmtests -p tpio --no-default-features \
        --bin nvme_bench --bin vnet_bench --bin tpio) >&2 || die "$sha: building the guest binaries failed"
    local b
    for b in nvme_bench vnet_bench tpio; do
        cp "$SHARED_TARGET/x86_64-unknown-linux-gnu/release/$b" "$bin/$b"
    done
    local exe
    exe=$(cd "$src" && CARGO_TARGET_DIR=$SHARED_TARGET cargo bench -p tidepool-benches --bench pool --no-run --message-format=json |
        python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "pool" and m.get("executable"):
        print(m["executable"])') || die "$sha: building the pool bench failed"
    [ -n "$exe" ] || die "$sha: cargo named no pool bench executable"
    cp "$exe" "$bin/pool-bench"
    git -C "$ROOT" log -1 --format='%h %s' "$sha" >"$bin/.complete"
}

build "$BEFORE_SHA"
build "$AFTER_SHA"
mkdir -p "$OUT"
rm -f "$OUT"/pool-*.txt "$OUT"/vm-*.out "$OUT"/runs.txt "$OUT"/table.md
RUNS=$OUT/runs.txt
: >"$RUNS"
STATUS=0
{
    echo "# before $BEFORE_SHA ($(cat "$REG/bin/$BEFORE_SHA/.complete"))"
    echo "# after  $AFTER_SHA ($(cat "$REG/bin/$AFTER_SHA/.complete"))"
} | tee -a "$RUNS"
side_sha() { [ "$1" = before ] && echo "$BEFORE_SHA" || echo "$AFTER_SHA"; }

# ---- the pool bench on the host, ABBA -------------------------------------------------------
# Criterion's point estimate ("time: [low estimate high]", middle) per benchmark, in ns; the
# wake-up latency lines' p50/p99. Rows only one commit has are left out by the table.
parse_pool() { # file side
    python3 - "$1" "$2" <<'EOF'
import re, sys
path, side = sys.argv[1], sys.argv[2]
unit = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
name = None
for line in open(path, encoding="utf-8", errors="replace"):
    s = line.rstrip()
    # "<name>  time: [lo unit mid unit hi unit]", or the name alone on the line before.
    m = re.match(r"^(\S+)?\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", s)
    if m:
        name = m.group(1) or name
        if name:
            print(f"pool/{name} {side} {float(m.group(2)) * unit[m.group(3)]:.3f} lower")
        name = None
        continue
    if re.fullmatch(r"[A-Za-z0-9_]+(/\S+)+", s):
        name = s
        continue
    m = re.match(r"^\s+(.+?)\s+(pool|tokio Semaphore)\s+p50\s+(\d+) ns\s+p99\s+(\d+) ns", s)
    if m:
        label, who = m.group(1).strip().replace(" ", "-"), m.group(2).replace(" ", "-")
        print(f"pool/wake-{label}-{who}-p50 {side} {m.group(3)} lower")
        print(f"pool/wake-{label}-{who}-p99 {side} {m.group(4)} lower")
EOF
}

if [[ " $SETS " == *" pool "* ]]; then
    n=0
    for r in $(seq 1 "$POOL_ROUNDS"); do
        for side in before after after before; do
            n=$((n + 1))
            f=$OUT/pool-$n-$side.txt
            note "pool bench round $r, run $n: $side (load $(load))"
            mkdir -p "$REG/criterion-$side"
            # shellcheck disable=SC2086 # CRITERION is a word list
            if (cd "$REG/src/$(side_sha "$side")/benches" &&
                CRITERION_HOME=$REG/criterion-$side "$REG/bin/$(side_sha "$side")/pool-bench" --bench $CRITERION) >"$f" 2>&1; then
                parse_pool "$f" "$side" >>"$RUNS"
            else
                note "pool bench ($side) failed: see $f"
                STATUS=1
            fi
            echo "# load after pool run $n ($side): $(load)" >>"$RUNS"
        done
    done
fi

# ---- the VM sets, one boot each ---------------------------------------------------------------
STAGE=$REG/stage
rm -rf "$STAGE"
for side in before after; do
    mkdir -p "$STAGE/$side"
    for b in nvme_bench vnet_bench tpio; do cp "$REG/bin/$(side_sha "$side")/$b" "$STAGE/$side/$b"; done
done
for set in nvme tpio vnet; do
    [[ " $SETS " == *" $set "* ]] || continue
    case "$set" in
    nvme) devs=(--nvme-size 1G); secs=$RUNTIME; per=$((4 * (8 * (RUNTIME + 3) + 10))) ;;
    tpio) devs=(--kernel-nvme --nvme-size 1G); secs=$RUNTIME; per=$((4 * 5 * (RUNTIME + 8))) ;;
    vnet) devs=(--virtio-net); secs=$VNET_RUNTIME; per=$((4 * 240)) ;;
    esac
    limit=$((per * ROUNDS + 120))
    note "VM set $set: one boot, $ROUNDS ABBA round(s), limit ${limit}s (load $(load))"
    echo "# load before VM set $set: $(load)" >>"$RUNS"
    rc=0
    "$ROOT/tools/vm/run" --no-build --quiet --extra-bin "$STAGE/before" --extra-bin "$STAGE/after" \
        "${devs[@]}" --test-timeout "$limit" "${VM_ARGS[@]}" "regression_ab:$set $secs $ROUNDS" || rc=$?
    cp "$LOGS/regression_ab.out" "$OUT/vm-$set.out" 2>/dev/null || { note "no guest output for $set"; STATUS=1; continue; }
    cp "$LOGS/summary.txt" "$OUT/vm-$set.summary" 2>/dev/null || true
    [ "$rc" = 0 ] || { note "tools/vm/run for $set exited $rc (see $OUT/vm-$set.out)"; STATUS=1; }
    sed -n 's/^REGRESS-RUN //p' "$OUT/vm-$set.out" >>"$RUNS"
    echo "# load after VM set $set: $(load)" >>"$RUNS"
done

# ---- the table ----------------------------------------------------------------------------------
table "$RUNS" | tee "$OUT/table.md" || STATUS=1
note "results in $OUT (table.md, runs.txt); load now $(load)"
exit "$STATUS"
}

# On one line, so that bash never reads past it: editing this file while it runs is then safe.
main "$@"; exit $?
