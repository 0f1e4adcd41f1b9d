#!/usr/bin/env python3
"""Plot what a method keeps over time, from `kvbench --trace FILE` (JSON lines).

Usage:
  python3 examples/python/plot_trace.py TRACE.jsonl --out-dir DIR [--layer L] [--head H] [--label LABEL]

Each line of the trace is one (compression, layer): {"label", "sample", "step", "layer",
"positions": [...]} (every head kept the same tokens) or "heads": [[...], ...] (per head). For every
traced run (or only --label), one figure trace_<label>.png: x = the step of the evaluation (the
token just fed), y = original position in the text, a dot for every token the layer holds right
after that compression -- sinks show as a flat band at the bottom, a recent window as a band along
the diagonal, heavy hitters as the dots in between. Layer: --layer, default the first traced one;
head: --head (default 0) where heads differ. Sample 0 only. Writes only into DIR.
"""
import argparse
import json
import os
import re
import sys


def fail(message):
    sys.stderr.write("plot_trace.py: error: %s\n" % message)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(prog="plot_trace.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("trace", metavar="TRACE.jsonl")
    ap.add_argument("--out-dir", required=True, help="folder for the PNGs (created if missing)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--label", default=None, help="only this run")
    ap.add_argument("--max-points", type=int, default=400000,
                    help="thin the steps so that at most this many dots are drawn (default 400000)")
    args = ap.parse_args()

    runs = {}  # label -> layer -> [(step, positions)]
    per_head = set()  # labels whose heads kept different tokens
    try:
        with open(args.trace) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    label, layer, step, sample = r["label"], int(r["layer"]), int(r["step"]), int(r["sample"])
                    if "positions" in r:
                        pos = r["positions"]
                    else:
                        per_head.add(label)
                        heads = r["heads"]
                        if not 0 <= args.head < len(heads):
                            fail("--head %d: line %d has %d heads" % (args.head, n, len(heads)))
                        pos = heads[args.head]
                except (ValueError, KeyError, TypeError) as e:
                    fail("%s line %d is not a kvbench trace record (%s)" % (args.trace, n, e))
                if sample != 0 or (args.label is not None and label != args.label):
                    continue
                runs.setdefault(label, {}).setdefault(layer, []).append((step, pos))
    except OSError as e:
        fail("cannot read %s: %s" % (args.trace, e.strerror))
    if not runs:
        fail("%s holds no compression of sample 0%s" % (args.trace, "" if args.label is None else " for " + args.label))
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail("cannot create --out-dir %s: %s" % (args.out_dir, e.strerror))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for label, layers in runs.items():
        layer = args.layer if args.layer is not None else min(layers)
        if layer not in layers:
            fail("%s: layer %d was not traced (traced: %s)" % (label, layer, sorted(layers)))
        records = layers[layer]
        total = sum(len(p) for _, p in records)
        stride = max(1, -(-total // args.max_points))
        xs, ys = [], []
        for i, (step, pos) in enumerate(records):
            if i % stride:
                continue
            xs.extend([step] * len(pos))
            ys.extend(pos)
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        size = min(6.0, max(0.5, 40000.0 / max(len(xs), 1)))  # dots that stay visible at any length
        ax.scatter(xs, ys, s=size, marker="s", color="#1f4e9c", linewidths=0, rasterized=True)
        last = max(s for s, _ in records)
        ax.plot([0, last], [0, last], color="0.7", lw=0.8, ls="--", label="token just fed")
        ax.set_xlim(0, last * 1.01 + 1)
        ax.set_ylim(0, last * 1.01 + 1)
        ax.set_xlabel("evaluation step (token fed)")
        ax.set_ylabel("original position of a kept token")
        kept = len(records[-1][1])
        ax.set_title("%s: what layer %d%s keeps (%d tokens at the end)%s" % (
            label, layer, ", head %d" % args.head if label in per_head else "", kept,
            "" if stride == 1 else "\nevery %d-th compression drawn" % stride), fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        name = "trace_%s.png" % re.sub(r"[^A-Za-z0-9_.+-]", "_", label)
        path = os.path.join(args.out_dir, name)
        try:
            fig.savefig(path, dpi=120, bbox_inches="tight", facecolor="white")
        except OSError as e:
            fail("cannot write %s: %s" % (path, e.strerror))
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
