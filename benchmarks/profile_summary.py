r"""Where the time goes, from a jax.profiler trace (as written by `train_step.py --profile=DIR`).

  python benchmarks/profile_summary.py DIR [--top 25]

Reads the newest `perfetto_trace.json.gz` under DIR and prints, for the device timelines
(the `/device:...` processes; every process when there are none, as on CPU):
  * busy time per timeline and the fraction of the traced wall time it covers
    (low busy fraction = launch- or host-bound, high = kernel-bound);
  * time per compiled program (`hlo_module`), e.g. subnet (one per resolution) / zeros / update;
  * time per kind of work (convolution, matmul, fused elementwise/reduction, copies and
    transposes, collectives), classified from kernel and HLO op names;
  * the top kernels or ops by total time.
Plain standard library, so it runs anywhere the trace is copied to.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

KINDS = [  # first match wins; matched against "kernel name | hlo op"
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective", re.I)),
    ("convolution", re.compile(r"conv|cudnn|depthwise|winograd|implicit_?gemm", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|\bdot\b|matmul|sm90_xmma|nvjet", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|bitcast|dynamic-update-slice", re.I)),
    ("reduction fusion", re.compile(r"reduce|reduction", re.I)),
    ("other fusion", re.compile(r"fusion|loop_|input_|kernel", re.I)),
]


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"profile_summary: no perfetto_trace.json.gz under {path!r} "
                         "(write one with `jax.profiler.trace(dir, create_perfetto_trace=True)`)")
    return max(found, key=os.path.getmtime)


def load(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kind_of(text: str) -> str:
    for name, pattern in KINDS:
        if pattern.search(text):
            return name
    return "other"


def summarise(events: list[dict], top: int = 25) -> str:
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", str(e["pid"]))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {p for p, n in procs.items() if n.startswith("/device:")}
    chosen = [e for e in spans if e["pid"] in device_pids] if device_pids else spans
    # GPU traces also carry derived timelines ("XLA Modules", "XLA Ops", "Steps") that repeat the
    # kernels of the "Stream #..." timelines: count kernels once, programs from "XLA Modules".
    name_of = lambda e: threads.get((e["pid"], e.get("tid")), "")  # noqa: E731
    modules = [e for e in chosen if name_of(e).startswith("XLA Modules")]
    streams = [e for e in chosen if name_of(e).startswith("Stream")]
    if streams:
        chosen = streams
    if not chosen:
        return "no timed events in the trace"
    t0 = min(e["ts"] for e in chosen)
    t1 = max(e["ts"] + e["dur"] for e in chosen)
    wall = max(t1 - t0, 1e-9)
    out = [f"trace: {len(chosen)} events on {'device' if device_pids else 'all'} timelines over "
           f"{wall / 1e3:.1f} ms of wall time"]

    busy = collections.Counter()
    for e in chosen:
        busy[(e["pid"], e.get("tid"))] += e["dur"]
    out.append("busy time per timeline:")
    for (pid, tid), d in busy.most_common(8):
        out.append(f"  {procs.get(pid, pid)} / {threads.get((pid, tid), tid)}: {d / 1e3:.1f} ms "
                   f"({100 * d / wall:.0f}% of wall)")

    total = sum(e["dur"] for e in chosen)
    by_module, by_kind, by_name = collections.Counter(), collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in chosen:
        args = e.get("args", {}) or {}
        op = str(args.get("hlo_op", "") or args.get("long_name", ""))
        module = str(args.get("hlo_module", "") or "")
        if module:
            by_module[module] += e["dur"]
        by_kind[kind_of(f"{e['name']} | {op}")] += e["dur"]
        key = e["name"][:90] + (f"  [{op[:40]}]" if op and op != e["name"] else "")
        by_name[key] += e["dur"]
        counts[key] += 1
    if modules:
        by_module = collections.Counter()
        for e in modules:
            by_module[e["name"]] += e["dur"]
    if by_module:
        out.append("time per compiled program (hlo_module):")
        for m, d in by_module.most_common(12):
            out.append(f"  {d / 1e3:10.2f} ms  {100 * d / total:5.1f}%  {m[:100]}")
    out.append("time per kind of work:")
    for k, d in by_kind.most_common():
        out.append(f"  {d / 1e3:10.2f} ms  {100 * d / total:5.1f}%  {k}")
    out.append(f"top {top} kernels/ops by total time:")
    for k, d in by_name.most_common(top):
        out.append(f"  {d / 1e3:10.2f} ms  {100 * d / total:5.1f}%  x{counts[k]:<5d} {k}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a profile folder (searched recursively) or a perfetto_trace.json.gz file")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    path = find_trace(args.trace)
    print(f"# {path}")
    print(summarise(load(path), args.top))


if __name__ == "__main__":
    sys.exit(main())
