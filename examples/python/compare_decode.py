#!/usr/bin/env python3
"""Decode speed of kvbench runs beside their peers, as ratios: one table and one JSON from the
files of one GPU call.

  python3 examples/python/compare_decode.py \\
      --kvbench torchscript=tpot.json --kvbench native=tpot_native.json \\
      --peer hf_eager=hf_eager.json --peer hf_static_compile=hf_static.json \\
      [--label streaming_llm] [--target-limit 1.5] [--target-speedup hf_static_compile=2] \\
      [--json compare.json]

--kvbench NAME=FILE  a `kvbench --json` file; its result --label (default: the first compressed
                     run, else the baseline) gives TTFT and TPOT with their min-max spreads
--peer NAME=FILE     an `examples/python/hf_reference.py --json` file (transformers)
--label L            which kvbench result to read (the same in every kvbench file)
--target-limit X     check: every kvbench TPOT at most X times the weight-streaming limit
--target-speedup P=X check: every kvbench TPOT at least X times faster than peer P

The weight-streaming limit (weight bytes / the card's copy bandwidth) comes from the peers'
files, which measure the bandwidth in the same call; every figure is given as TPOT / limit and
as the speed-up over every peer. The files must describe one workload (device, dtype, prompt
length, new tokens, batch): a mismatch is an error, never a silent comparison. Exit status 1
when a target is missed, 2 on bad input.
"""

import argparse
import json
import math
import os
import sys

PROG = os.path.basename(__file__)


def fail(message, status=2):
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    sys.exit(status)


def named(items, what):
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            fail("%s %r: expected NAME=FILE" % (what, item))
        if name in (n for n, _ in out):
            fail("%s: the name %r is given twice" % (what, name))
        out.append((name, path))
    return out


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        fail("cannot read %s: %s" % (path, e.strerror or e))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail("%s: not valid JSON (%s)" % (path, e))


def positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def kvbench_entry(name, path, label):
    doc = load(path)
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or "generate" not in doc:
        fail("%s (--kvbench %s): not a kvbench --json file" % (path, name))
    if label is None:
        pick = [r for r in results if r.get("spec")] or [r for r in results if r.get("label") == "baseline"]
    else:
        pick = [r for r in results if r.get("label") == label]
    if not pick:
        fail("%s (--kvbench %s): no result %s" % (path, name, repr(label) if label else "to compare"))
    r = pick[0]
    if not positive(r.get("tpot_s")):
        fail("%s (--kvbench %s): result %r has no TPOT (run kvbench with --generate 2 or more)" % (path, name, r["label"]))
    return {
        "name": name, "kind": "kvbench", "file": path, "label": r["label"],
        "workload": {"device": doc.get("device"), "dtype": doc.get("dtype"), "prompt_tokens": doc.get("prompt_tokens"),
                     "new_tokens": doc.get("generate"), "batch": doc.get("batch")},
        "ttft_s": r.get("ttft_s"), "tpot_s": r["tpot_s"], "tpot_min_s": r.get("tpot_s_min"),
        "tpot_max_s": r.get("tpot_s_max"), "cuda_graph": doc.get("cuda_graph"), "native_step": doc.get("native_step"),
        "native_gemv": doc.get("native_gemv"),
        "native_pdl": doc.get("native_pdl"),
        "native_chunk": doc.get("native_chunk"),
    }


def peer_entry(name, path):
    doc = load(path)
    if not isinstance(doc, dict) or not positive(doc.get("tpot_s")) or "weight_streaming_limit_s" not in doc:
        fail("%s (--peer %s): not an hf_reference.py --json file" % (path, name))
    return {
        "name": name, "kind": "transformers", "file": path, "label": "%s %s" % (doc.get("runtime"), doc.get("attention")),
        "workload": {"device": doc.get("device"), "dtype": doc.get("dtype"), "prompt_tokens": doc.get("prompt_tokens"),
                     "new_tokens": doc.get("new_tokens"), "batch": doc.get("batch")},
        "ttft_s": doc.get("ttft_s"), "tpot_s": doc["tpot_s"], "tpot_min_s": min(doc.get("repeats_tpot_s") or [doc["tpot_s"]]),
        "tpot_max_s": max(doc.get("repeats_tpot_s") or [doc["tpot_s"]]),
        "limit_s": doc.get("weight_streaming_limit_s"), "copy_bandwidth_bytes_s": doc.get("copy_bandwidth_bytes_s"),
        "device_name": doc.get("device"),
    }


def same_workload(entries):
    """kvbench names its device 'cuda:0', transformers the card: compare the rest exactly."""
    keys = ("dtype", "prompt_tokens", "new_tokens", "batch")
    first = entries[0]
    for e in entries[1:]:
        for k in keys:
            if e["workload"][k] != first["workload"][k]:
                fail("%s and %s measured different workloads: %s %r vs %r"
                     % (first["name"], e["name"], k, first["workload"][k], e["workload"][k]))
    if len({e["workload"]["device"] == "cpu" for e in entries}) > 1:
        fail("the files mix CPU and GPU runs")


def main():
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--kvbench", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--label")
    ap.add_argument("--target-limit", type=float)
    ap.add_argument("--target-speedup", action="append", default=[], metavar="PEER=X")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not a.kvbench or not a.peer:
        fail("give at least one --kvbench and one --peer (the peers' files carry the weight-streaming limit)")
    ours = [kvbench_entry(n, p, a.label) for n, p in named(a.kvbench, "--kvbench")]
    peers = [peer_entry(n, p) for n, p in named(a.peer, "--peer")]
    if {e["name"] for e in ours} & {e["name"] for e in peers}:
        fail("a name is given to both a --kvbench and a --peer file")
    same_workload(ours + peers)
    limits = [p["limit_s"] for p in peers if positive(p.get("limit_s"))]
    if not limits:
        fail("no peer file has a weight-streaming limit (hf_reference.py measures it on CUDA only)")
    limit = min(limits)  # the fastest copy measured: the tightest limit
    targets = []
    for t in a.target_speedup:
        peer, sep, x = t.partition("=")
        if not sep or peer not in {p["name"] for p in peers}:
            fail("--target-speedup %r: expected PEER=X with PEER one of the --peer names" % t)
        try:
            targets.append((peer, float(x)))
        except ValueError:
            fail("--target-speedup %r: %r is not a number" % (t, x))
    rows, missed = [], []
    for e in ours + peers:
        row = dict(e)
        row["tpot_over_limit"] = e["tpot_s"] / limit
        row["speedup_over"] = {p["name"]: p["tpot_s"] / e["tpot_s"] for p in peers if p is not e}
        rows.append(row)
        if e["kind"] != "kvbench":
            continue
        if a.target_limit is not None and row["tpot_over_limit"] > a.target_limit:
            missed.append("%s: TPOT %.3f ms is %.2f x the limit (target %.2f)"
                          % (e["name"], e["tpot_s"] * 1e3, row["tpot_over_limit"], a.target_limit))
        for peer, x in targets:
            if row["speedup_over"][peer] < x:
                missed.append("%s: %.2f x faster than %s (target %.2f)" % (e["name"], row["speedup_over"][peer], peer, x))
    print("weight-streaming limit %.3f ms (weights / copy bandwidth, from the peers' files)" % (limit * 1e3))
    head = ["run", "what", "TTFT ms", "TPOT ms (min-max)", "x limit"] + ["vs " + p["name"] for p in peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(head))) + "|")
    for r in rows:
        spread = "%.3f (%.3f-%.3f)" % (r["tpot_s"] * 1e3, (r["tpot_min_s"] or r["tpot_s"]) * 1e3,
                                       (r["tpot_max_s"] or r["tpot_s"]) * 1e3)
        ttft = "%.2f" % (r["ttft_s"] * 1e3) if positive(r.get("ttft_s")) else "-"
        cells = [r["name"], "%s %s" % (r["kind"], r["label"]), ttft, spread, "%.2f" % r["tpot_over_limit"]]
        cells += ["%.2fx" % r["speedup_over"][p["name"]] if p["name"] in r["speedup_over"] else "-" for p in peers]
        print("| " + " | ".join(cells) + " |")
    for m in missed:
        print("target missed: " + m)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"weight_streaming_limit_s": limit, "runs": rows, "targets_missed": missed}, f, indent=1)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
