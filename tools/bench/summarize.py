#!/usr/bin/env python3
"""Summarise tools/bench/nvme.sh results (tpio and fio JSON files in one folder) as Markdown.

Usage: summarize.py RUNTIME DIR [DIR...]

With several DIRs (repeated boots), every number is the median over the DIRs that have the run.
Reads DIR/<run>.json as written by the guest script tools/vmtests/scripts/tpio_bench.sh and
prints two tables with the ratios the benchmark targets are stated in:
  - DMA modes: IOPS of --dma=bounce, map-per-io and auto at each block size, bounce/map-per-io,
    and auto as a percentage of the better of the two;
  - engines: tidepool (bounce, zero-copy) vs tpio io_uring vs fio io_uring on the kernel path,
    with tidepool/kernel and tpio-io_uring/fio ratios, and tidepool as a share of the minimal
    polling loop's 68.6k IOPS (4 KiB) / 3.9 GB/s (128 KiB) from shared/notes/vm.md.
Missing runs show as "-".
"""
import json
import os
import statistics
import sys

MINIMAL_LOOP = {"randread-4k": ("IOPS", 68600.0), "read-128k": ("GB/s", 3.9)}


def load(folders, name):
    """Medians over `folders` of (iops, bytes/s, p50 clat us, p99 clat us) of a run's first job,
    plus the tidepool objects of every folder that has it, or None when no folder has the run."""
    found = [load_one(f, name) for f in folders]
    found = [r for r in found if r is not None]
    if not found:
        return None
    columns = list(zip(*[r[:4] for r in found]))
    return tuple(statistics.median(c) for c in columns) + ([r[4] for r in found], len(found))


def load_one(folder, name):
    """(iops, bytes per second, p50 clat us, p99 clat us, tidepool) of a run's first job."""
    path = os.path.join(folder, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    read = job["read"]
    pct = read.get("clat_ns", {}).get("percentile", {})
    p50 = pct.get("50.000000", 0) / 1000.0
    p99 = pct.get("99.000000", 0) / 1000.0
    return read["iops"], read["bw_bytes"], p50, p99, job.get("tidepool")


def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main():
    runtime = sys.argv[1]
    folder = sys.argv[2:]
    out = []
    sizes = ["4k", "16k", "64k", "128k"]
    def medians_of(name):
        """How the numbers of a table whose first run is `name` were combined."""
        n = sum(1 for f in folder if os.path.exists(os.path.join(f, name + ".json")))
        return f"median of {n} runs (boots or rounds)" if n > 1 else "one boot"

    if any(load(folder, f"dma-bounce-{s}") for s in sizes):
        out.append(
            f"### DMA modes: tidepool engine, random reads, QD 64, {runtime} s per run, "
            f"{medians_of('dma-bounce-4k')}\n"
        )
        out.append("| bs | bounce IOPS | map-per-io IOPS | auto IOPS | bounce / map-per-io | auto vs best | auto threshold |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for s in sizes:
            runs = {d: load(folder, f"dma-{d}-{s}") for d in ("bounce", "map-per-io", "auto")}
            iops = {d: (r[0] if r else None) for d, r in runs.items()}
            best = max((v for v in (iops["bounce"], iops["map-per-io"]) if v is not None), default=None)
            auto_pct = ratio(iops["auto"], best)
            threshold = "-"
            if runs["auto"]:
                # Every run's calibrated threshold, with how many runs chose it.
                chosen = {}
                for tp in runs["auto"][4]:
                    t = (tp or {}).get("dma_threshold", "-")
                    key = "always bounce" if t is None else ("-" if t == "-" else f"map from {t // 1024} KiB")
                    chosen[key] = chosen.get(key, 0) + 1
                threshold = ", ".join(k if len(chosen) == 1 else f"{k} ({n})" for k, n in chosen.items())
            out.append(
                f"| {s} | {fmt(iops['bounce'])} | {fmt(iops['map-per-io'])} | {fmt(iops['auto'])} | "
                f"{fmt(ratio(iops['bounce'], iops['map-per-io']), 2)}x | "
                f"{fmt(None if auto_pct is None else auto_pct * 100, 1)}% | {threshold} |"
            )
        out.append("")
    for workload, label in (("randread-4k", "4 KiB random read, QD 32"), ("read-128k", "128 KiB sequential read, QD 32")):
        runs = {
            "tidepool bounce (vfio)": load(folder, f"tidepool-bounce-{workload}"),
            "tidepool zero-copy (vfio)": load(folder, f"tidepool-zero-copy-{workload}"),
            "tpio io_uring (kernel nvme)": load(folder, f"tpio-io_uring-{workload}"),
            "fio io_uring (kernel nvme)": load(folder, f"fio-io_uring-{workload}"),
            "fio io_uring, batched submit (kernel nvme)": load(folder, f"fio-batch-io_uring-{workload}"),
        }
        if not any(runs.values()):
            continue
        out.append(f"### Engines: {label}, {runtime} s per run, {medians_of('tidepool-bounce-' + workload)}\n")
        out.append("| engine | IOPS | MB/s | clat p50 (us) | clat p99 (us) |")
        out.append("|---|---:|---:|---:|---:|")
        for name, r in runs.items():
            if r:
                out.append(f"| {name} | {fmt(r[0])} | {fmt(r[1] / 1e6)} | {fmt(r[2], 1)} | {fmt(r[3], 1)} |")
            else:
                out.append(f"| {name} | - | - | - | - |")
        kernel = runs["fio io_uring (kernel nvme)"]
        tpio_uring = runs["tpio io_uring (kernel nvme)"]
        unit, loop = MINIMAL_LOOP[workload]
        out.append("")
        for name in ("tidepool bounce (vfio)", "tidepool zero-copy (vfio)"):
            r = runs[name]
            if not r:
                continue
            value = r[0] if unit == "IOPS" else r[1] / 1e9
            out.append(
                f"- {name}: {fmt(ratio(r[0], kernel[0] if kernel else None), 2)}x fio's kernel-path IOPS; "
                f"{fmt(100 * value / loop, 1)}% of the minimal polling loop's {loop:g} {unit}"
            )
        if tpio_uring and kernel:
            out.append(f"- tpio io_uring / fio io_uring: {fmt(100 * tpio_uring[0] / kernel[0], 1)}%")
        batched = runs["fio io_uring, batched submit (kernel nvme)"]
        if tpio_uring and batched:
            out.append(f"- tpio io_uring / fio io_uring with batched submit: {fmt(100 * tpio_uring[0] / batched[0], 1)}%")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
