#!/usr/bin/env python3
"""Plot the JSON that `kvbench --json FILE` writes: the course project's figures.

Usage:
  python3 examples/python/plot_results.py RESULTS.json [MORE.json ...]
      [--out-dir DIR] [--title TEXT] [--dpi N]

  RESULTS.json   one or more kvbench JSON files; their "results" lists are concatenated in
                 the order given. A label that already appeared in an earlier file gets the
                 suffix "#N" (N = the file's position on the command line, from 1).
  --out-dir DIR  where the PNGs go (default: docs/figures in the repository)
  --title TEXT   extra text added to every figure title
  --dpi N        resolution of the PNGs (default 120)

Figures (file names are fixed; each one written is printed):
  comparison_<budget>.png  one per budget: 2x2 bar charts (PPL, accuracy %, TPOT ms,
                           throughput tok/s), one bar per method, baseline as a dashed line
  tradeoff.png             PPL against throughput, one marker per run: colour = method,
                           marker shape = budget, baseline highlighted as a gold star;
                           log axes when the spread is large
  summary_heatmap.png      runs x metrics; each cell coloured by its value relative to the
                           baseline (green better, red worse, direction per metric) and
                           annotated with the raw value and the ratio (each run is compared
                           with the baseline of its own file, else the first baseline)
  streaming.png            only when results carry "windows" (kvbench --window, long texts):
                           PPL of every window against the tokens read, one line per run
                           (labelled with its file's position rule and skip_layers), the
                           model's context marked (StreamingLLM's figure 3); with a second
                           panel for the cache size

Labels: the full-cache run is "baseline" (spec null). A compressed run labelled
<method>_<budget> (e.g. h2o_l2_512, streaming_llm_1024) is split at its trailing integer;
a label with no trailing integer is a free label and goes to the budget "custom".
kvbench's own duplicate suffix (h2o_l2_512_2) keeps the budget 512. Missing
or null metrics are shown as "n/a". The "generation" block is not plotted.

Example:
  ./build/examples/kvbench --compare-all --json /tmp/kvbench.json
  python3 examples/python/plot_results.py /tmp/kvbench.json --out-dir docs/figures

Needs only matplotlib (Agg backend, no display) and numpy.
"""

import argparse
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

PROG = "plot_results.py"
REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "docs", "figures")

# kvbench's method names, in its --compare-all order; they get fixed colours so that a method
# has the same colour in every figure and every run of this script.
KNOWN_METHODS = ["streaming_llm", "h2o_l2", "recent_only", "snapkv_lite", "pyramid_kv",
                 "adaptive_l2", "fix_size_l2", "l2"]
PALETTE = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
BUDGET_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]
BASELINE_COLOR = "black"
CUSTOM = "custom"

# Metrics: key, heatmap column title, scale from the JSON unit, lower_is_better, format.
METRICS = [
    ("ppl", "PPL", 1.0, True, "{:.2f}"),
    ("accuracy", "accuracy\n(%)", 100.0, False, "{:.1f}"),
    ("ttft_s", "TTFT\n(ms)", 1000.0, True, "{:.2f}"),
    ("tpot_s", "TPOT\n(ms)", 1000.0, True, "{:.2f}"),
    ("throughput_tok_s", "throughput\n(tok/s)", 1.0, False, "{:.1f}"),
    ("cache_bytes", "cache\n(MB)", 1e-6, True, "{:.2f}"),
    ("peak_memory_bytes", "peak mem\n(MB)", 1e-6, True, "{:.1f}"),
]
METRIC = {m[0]: m for m in METRICS}

# The 2x2 comparison panels: key, axis title.
PANELS = [("ppl", "Perplexity (lower is better)"),
          ("accuracy", "Next-token accuracy, % (higher is better)"),
          ("tpot_s", "TPOT, ms (lower is better)"),
          ("throughput_tok_s", "Throughput, tok/s (higher is better)")]


def fail(message):
    sys.exit("%s: error: %s" % (PROG, message))


# --------------------------------------------------------------------------------------------
# Loading


class Run:
    """One entry of a results list, with its parsed method/budget and display names."""

    def __init__(self, entry, file_index, label, meta):
        self.entry = entry
        self.file_index = file_index
        self.orig_label = label
        self.label = label  # unique display label (may get a "#N" suffix)
        self.meta = meta
        self.is_baseline = entry.get("spec") is None and (label == "baseline" or label.startswith("baseline"))
        self.method, self.budget, self.extra = parse_label(label)
        if self.is_baseline:
            self.method, self.budget, self.extra = "baseline", None, ""
        self.suffix = ""
        self.ref = None  # the baseline Run this run is compared with

    def value(self, key):
        """The metric in display units (ms, %, MB), or None when absent/null/non-numeric."""
        v = self.entry.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v) * METRIC[key][2]

    @property
    def short(self):
        """Name within its budget group (the x axis of a comparison chart)."""
        return self.method + self.extra + self.suffix

    @property
    def budget_key(self):
        return (1, 0, CUSTOM) if self.budget == CUSTOM else (0, int(self.budget), "")


def parse_label(label):
    """'h2o_l2_512' -> ('h2o_l2', '512', ''); 'h2o_l2_512_2' (kvbench's duplicate-label
    suffix) -> ('h2o_l2', '512', '_2'); 'my_run' -> ('my_run', 'custom', '')."""
    for method in sorted(KNOWN_METHODS, key=len, reverse=True):
        m = re.fullmatch(re.escape(method) + r"_(\d+)((?:_\d+)?)", label)
        if m:
            return method, str(int(m.group(1))), m.group(2)
    m = re.fullmatch(r"(.+?)_(\d+)", label)
    if m:
        return m.group(1), str(int(m.group(2))), ""
    return label, CUSTOM, ""


def load(paths):
    runs, metas, seen = [], [], set()
    for index, path in enumerate(paths, start=1):
        if not os.path.exists(path):
            fail("file not found: %s" % path)
        if os.path.isdir(path):
            fail("%s is a directory, not a kvbench JSON file" % path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            fail("%s: invalid JSON: %s (line %d, column %d)" % (path, e.msg, e.lineno, e.colno))
        except (OSError, UnicodeDecodeError) as e:
            fail("cannot read %s: %s" % (path, e))
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            fail("%s: not kvbench output: no \"results\" list at the top level" % path)
        meta = {k: data.get(k) for k in ("model", "device", "dtype", "tokens", "positions", "skip_layers",
                                          "model_context", "runtime", "cuda_graph")}
        metas.append(meta)
        file_runs = []
        for i, entry in enumerate(data["results"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not entry["label"]:
                fail("%s: results[%d] is not an object with a \"label\" string" % (path, i))
            run = Run(entry, index, entry["label"], meta)
            if run.label in seen:
                run.suffix = "#%d" % index
                run.label += run.suffix
                n = 2
                while run.label in seen:  # a clash inside a later file, or a repeated path
                    run.suffix = "#%d.%d" % (index, n)
                    run.label = run.orig_label + run.suffix
                    n += 1
            seen.add(run.label)
            file_runs.append(run)
        runs.extend(file_runs)
    if not runs:
        fail("no results in %s" % ", ".join(paths))
    # Each run is compared with its own file's baseline, else with the first baseline.
    baselines = [r for r in runs if r.is_baseline]
    for r in runs:
        own = [b for b in baselines if b.file_index == r.file_index]
        r.ref = own[0] if own else (baselines[0] if baselines else None)
    return runs, metas


def describe(metas, extra):
    """'model · device · dtype · N tokens' over all files (distinct values joined by '/')."""
    def join(key, fmt="{}"):
        vals = []
        for m in metas:
            v = m.get(key)
            if v is not None and fmt.format(v) not in vals:
                vals.append(fmt.format(v))
        return "/".join(vals) if vals else "?"
    text = "%s · %s · %s · %s tokens" % (join("model"), join("device"), join("dtype"), join("tokens"))
    return text + (" — " + extra if extra else "")


def method_colors(runs):
    colors, extra = {}, 0
    for i, m in enumerate(KNOWN_METHODS):
        colors[m] = PALETTE[i]
    for r in runs:
        if not r.is_baseline and r.method not in colors:
            colors[r.method] = PALETTE[(len(KNOWN_METHODS) + extra) % len(PALETTE)]
            extra += 1
    colors["baseline"] = BASELINE_COLOR
    return colors


def budgets_of(runs):
    keys = sorted({r.budget_key for r in runs if not r.is_baseline})
    return [k[2] if k[0] else str(k[1]) for k in keys]


def ordered(runs):
    """Baselines first, then by budget, then by first appearance of the method."""
    first = {}
    for i, r in enumerate(runs):
        first.setdefault(r.method, i)
    base = [r for r in runs if r.is_baseline]
    rest = [r for r in runs if not r.is_baseline]
    rest.sort(key=lambda r: (r.budget_key, first[r.method], runs.index(r)))
    return base + rest


def fmt_value(key, v):
    if v is None:
        return "n/a"
    fmt = METRIC[key][4]
    if key == "ppl" and v >= 1000:
        fmt = "{:.0f}"
    elif key == "throughput_tok_s" and v >= 1000:
        fmt = "{:.0f}"
    return fmt.format(v)


def plain_log_ticks(axis, lo, hi):
    """Log-scale ticks labelled 50, 100, 200 ... instead of 10^2 only."""
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if math.log10(hi / lo) < 1.2 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))
    axis.set_minor_formatter(NullFormatter())


def save(fig, out_dir, name, dpi, extra=None):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white", bbox_extra_artists=extra)
    plt.close(fig)
    print(path)


# --------------------------------------------------------------------------------------------
# 1. comparison_<budget>.png


def plot_comparison(runs, budget, metas, args, colors):
    group = [r for r in ordered(runs) if not r.is_baseline and r.budget == budget]
    baselines = [r for r in runs if r.is_baseline]
    names = [r.short for r in group]
    width = max(10.0, 0.75 * len(group) * 2 + 3)
    fig, axes = plt.subplots(2, 2, figsize=(width, 8.2))
    x = np.arange(len(group))
    value_labels = []
    for ax, (key, title) in zip(axes.flat, PANELS):
        vals = [r.value(key) for r in group]
        base_vals = [(b, b.value(key)) for b in baselines if b.value(key) is not None]
        known = [v for v in vals if v is not None] + [v for _, v in base_vals]
        log = key == "ppl" and known and min(known) > 0 and max(known) / min(known) > 20
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(x, heights, width=0.7, color=[colors[r.method] for r in group],
                      edgecolor="black", linewidth=0.5, zorder=2)
        if log:
            ax.set_yscale("log")
        top = max(known) if known else 1.0
        # headroom above the tallest bar for its value label and the baseline legend
        if log:
            bottom = min(known) / 1.5
            ax.set_ylim(bottom, top * (top / bottom) ** 0.45)
            plain_log_ticks(ax.yaxis, *ax.get_ylim())
        else:
            ax.set_ylim(0, top * 1.32 if top > 0 else 1.0)
        value_labels.append((ax, bars, vals, [v for _, v in base_vals], key))
        styles = ["--", ":", "-."]
        for i, (b, v) in enumerate(base_vals):
            ax.axhline(v, color="dimgray" if i else BASELINE_COLOR, linestyle=styles[i % 3],
                       linewidth=1.3, zorder=4,
                       label="%s: %s" % (b.label, fmt_value(key, v)))
        if base_vals:
            ax.legend(loc="upper left", fontsize=8, framealpha=0.9, handlelength=2.5)
        ax.set_title(title, fontsize=10)
        pad = max(0.0, (4 - len(group)) / 2)  # keep bars narrow when there are few
        ax.set_xlim(-0.6 - pad, len(group) - 0.4 + pad)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", rotation_mode="anchor", fontsize=9)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
        if not group:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center")
    what = "KV-cache budget %s tokens" % budget if budget != CUSTOM else "runs with free labels"
    fig.suptitle("%s\n%s" % (what, describe(metas, args.title)), fontsize=12)
    fig.tight_layout()
    # Value labels go on once the layout is final, so that pixel distances are right: above
    # each bar, or just inside its top where a baseline line would run through the text.
    pt = fig.dpi / 72.0
    for ax, bars, vals, base_vals, key in value_labels:
        base_px = [ax.transData.transform((0, b))[1] for b in base_vals]
        for bar, v, c in zip(bars, vals, [b.get_facecolor() for b in bars]):
            cx = bar.get_x() + bar.get_width() / 2
            if v is None:
                ax.annotate("n/a", (cx, ax.get_ylim()[0]), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8, color="dimgray")
                continue
            top_px = ax.transData.transform((0, v))[1]
            bottom_px = ax.transData.transform((0, ax.get_ylim()[0]))[1]
            above = not any(top_px - 1 * pt <= y <= top_px + 14 * pt for y in base_px)
            if not above and top_px - bottom_px < 16 * pt:
                above = True  # bar too short to hold the text
            if above:
                ax.annotate(fmt_value(key, v), (cx, v), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7.5, zorder=5)
            else:
                dark = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 0.55
                ax.annotate(fmt_value(key, v), (cx, v), xytext=(0, -3), textcoords="offset points",
                            ha="center", va="top", fontsize=7.5, zorder=5,
                            color="white" if dark else "black")
    save(fig, args.out_dir, "comparison_%s.png" % budget, args.dpi)


# --------------------------------------------------------------------------------------------
# 2. tradeoff.png


def _overlap(a, b):
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(fig, ax, points, texts, colors, fontsize=8):
    """Greedy label placement: for each point try offsets around it (nearest first) and keep
    the first whose text box hits no other label, marker or the axes' edge."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    disp = ax.transData.transform(points)
    r = 7.0 * fig.dpi / 72.0  # marker half-size in pixels
    obstacles = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in disp]
    dirs = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    order = sorted(range(len(points)), key=lambda i: -disp[i][1])
    for i in order:
        best = None
        for dist in (7, 14, 24, 36, 50):
            for dx, dy in dirs:
                ox, oy = dx * dist, dy * dist
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                t = ax.annotate(texts[i], points[i], xytext=(ox, oy), textcoords="offset points",
                                ha=ha, va=va, fontsize=fontsize, color=colors[i], zorder=5)
                bb = t.get_window_extent(renderer).expanded(1.05, 1.15)
                cost = sum(_overlap(bb, o) for o in obstacles)
                outside = (max(0, axbox.x0 - bb.x0) + max(0, bb.x1 - axbox.x1)
                           + max(0, axbox.y0 - bb.y0) + max(0, bb.y1 - axbox.y1))
                cost += outside * 50 + dist * 0.01
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, t, bb, dist)
                else:
                    t.remove()
                if cost < 1:
                    break
            if best[0] < 1:
                break
        _, t, bb, dist = best
        if dist > 7:  # not right next to its point: redraw with a leader line
            t.remove()
            t = ax.annotate(t.get_text(), points[i], xytext=t.xyann, textcoords="offset points",
                            ha=t.get_ha(), va=t.get_va(), fontsize=fontsize, color=colors[i],
                            zorder=5, arrowprops=dict(arrowstyle="-", color="gray", lw=0.6,
                                                      shrinkA=0, shrinkB=4))
        obstacles.append(bb)


def plot_tradeoff(runs, metas, args, colors):
    pts = [r for r in ordered(runs) if r.value("ppl") is not None and r.value("throughput_tok_s") is not None]
    skipped = [r.label for r in runs if r not in pts]
    budgets = budgets_of(runs)
    markers = {b: BUDGET_MARKERS[i % len(BUDGET_MARKERS)] for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(11, 7))
    xs = np.array([r.value("throughput_tok_s") for r in pts])
    ys = np.array([r.value("ppl") for r in pts])
    for r, x, y in zip(pts, xs, ys):
        if r.is_baseline:
            ax.scatter([x], [y], marker="*", s=320, color="gold", edgecolor="black",
                       linewidth=1.2, zorder=4)
        else:
            ax.scatter([x], [y], marker=markers[r.budget], s=70, color=colors[r.method],
                       edgecolor="black", linewidth=0.6, zorder=3)
    if len(pts):
        log = ys.min() > 0 and ys.max() / ys.min() > 3
        if log:
            ax.set_yscale("log")
            ax.set_ylim(ys.min() / 1.25, ys.max() * 1.25)
            plain_log_ticks(ax.yaxis, *ax.get_ylim())
        else:
            span = (ys.max() - ys.min()) or abs(ys.max()) or 1.0
            ax.set_ylim(max(0, ys.min() - 0.18 * span), ys.max() + 0.18 * span)
        xlog = xs.min() > 0 and xs.max() / xs.min() > 5
        if xlog:  # e.g. CPU and GPU runs in one plot
            ax.set_xscale("log")
            ax.set_xlim(xs.min() / 1.3, xs.max() * 1.3)
            plain_log_ticks(ax.xaxis, *ax.get_xlim())
        else:
            xspan = (xs.max() - xs.min()) or abs(xs.max()) or 1.0
            ax.set_xlim(xs.min() - 0.2 * xspan, xs.max() + 0.2 * xspan)
        ax.set_xlabel("throughput, tok/s%s (higher is better)" % (" (log scale)" if xlog else ""))
        ax.set_ylabel("perplexity%s (lower is better)" % (" (log scale)" if log else ""))
        label_colors = ["black" if r.is_baseline else colors[r.method] for r in pts]
        label_colors = [tuple(0.75 * c for c in matplotlib.colors.to_rgb(c)) for c in label_colors]
        place_labels(fig, ax, np.column_stack([xs, ys]), [r.label for r in pts], label_colors)
    else:
        ax.text(0.5, 0.5, "no run has both PPL and throughput", transform=ax.transAxes, ha="center")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_xlabel("throughput, tok/s (higher is better)")
    ax.grid(alpha=0.3, which="both")
    methods = []
    for r in pts:
        if not r.is_baseline and r.method not in methods:
            methods.append(r.method)
    h1 = [Line2D([], [], marker="*", ls="", ms=15, mfc="gold", mec="black", label="baseline (full cache)")]
    h1 = h1 if any(r.is_baseline for r in pts) else []
    h1 += [Line2D([], [], marker="o", ls="", ms=9, mfc=colors[m], mec="black", label=m) for m in methods]
    legends = []
    if h1:
        legends.append(ax.legend(handles=h1, title="method", loc="upper left",
                                 bbox_to_anchor=(1.01, 1.0), fontsize=9, title_fontsize=9))
        ax.add_artist(legends[0])
    h2 = [Line2D([], [], marker=markers[b], ls="", ms=9, mfc="lightgray", mec="black",
                 label=(b + " tokens") if b != CUSTOM else CUSTOM)
          for b in budgets if any(r.budget == b for r in pts)]
    if h2:
        legends.append(ax.legend(handles=h2, title="budget", loc="lower left",
                                 bbox_to_anchor=(1.01, 0.0), fontsize=9, title_fontsize=9))
    title = "Quality vs speed: perplexity against throughput\n" + describe(metas, args.title)
    if skipped and pts:
        shown = ", ".join(skipped[:4]) + (", ... (%d more)" % (len(skipped) - 4) if len(skipped) > 4 else "")
        title += "\n(not shown, PPL or throughput missing: %s)" % shown
    ax.set_title(title, fontsize=11)
    save(fig, args.out_dir, "tradeoff.png", args.dpi, extra=legends)


# --------------------------------------------------------------------------------------------
# 3. summary_heatmap.png

SATURATE = 2.0  # colours saturate at this factor better/worse than the baseline


def plot_heatmap(runs, metas, args):
    rows = ordered(runs)
    nrow, ncol = len(rows), len(METRICS)
    score = np.full((nrow, ncol), np.nan)
    text = [["" for _ in range(ncol)] for _ in range(nrow)]
    lim = math.log2(SATURATE)
    for i, r in enumerate(rows):
        for j, (key, _, _, lower, _) in enumerate(METRICS):
            v = r.value(key)
            text[i][j] = fmt_value(key, v)
            b = r.ref.value(key) if r.ref is not None else None
            if v is None or b is None:
                continue
            if v == b:
                s = 0.0
            elif v <= 0 or b <= 0:
                s = lim if (v < b) == lower else -lim
            else:
                s = math.log2(b / v) if lower else math.log2(v / b)
            score[i, j] = max(-lim, min(lim, s))
            if not r.is_baseline and v > 0 and b > 0:
                text[i][j] += "\n×%.2f" % (v / b)
    cmap = LinearSegmentedColormap.from_list("rwg", ["#d73027", "#fc8d59", "#fee08b", "#f7f7f7",
                                                     "#d9ef8b", "#91cf60", "#1a9850"])
    cmap.set_bad("#e0e0e0")
    fig_h = 1.6 + 0.42 * nrow
    fig, ax = plt.subplots(figsize=(11.5, fig_h))
    im = ax.imshow(np.ma.masked_invalid(score), cmap=cmap, norm=TwoSlopeNorm(0, -lim, lim),
                   aspect="auto", interpolation="nearest")
    for i in range(nrow):
        for j in range(ncol):
            lines = text[i][j].split("\n")
            strong = not np.isnan(score[i, j]) and abs(score[i, j]) > 0.8 * lim
            c = "white" if strong else "black"
            if len(lines) == 2:
                ax.text(j, i - 0.13, lines[0], ha="center", va="center", fontsize=8.5, color=c)
                ax.text(j, i + 0.22, lines[1], ha="center", va="center", fontsize=6.5, color=c)
            else:
                ax.text(j, i, lines[0], ha="center", va="center", fontsize=8.5, color=c,
                        fontweight="bold" if rows[i].is_baseline else "normal")
    ax.set_xticks(range(ncol))
    ax.set_xticklabels([m[1] for m in METRICS], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(nrow))
    ax.set_yticklabels([r.label for r in rows], fontsize=9)
    for lab, r in zip(ax.get_yticklabels(), rows):
        if r.is_baseline:
            lab.set_fontweight("bold")
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, ncol), minor=True)
    ax.set_yticks(np.arange(-0.5, nrow), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    for i in range(1, nrow):  # a darker line between budget groups
        if rows[i].budget != rows[i - 1].budget:
            ax.axhline(i - 0.5, color="dimgray", linewidth=1.6)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    ticks = [-lim, -lim / 2, 0, lim / 2, lim]
    cbar.set_ticks(ticks)
    cbar.set_ticklabels(["%.2g× worse" % SATURATE, "%.2g× worse" % (SATURATE ** 0.5), "= baseline",
                         "%.2g× better" % (SATURATE ** 0.5), "%.2g× better" % SATURATE])
    cbar.ax.tick_params(labelsize=8)
    note = "cell: value (×ratio to baseline); colour: better/worse than the baseline"
    if len({r.file_index for r in runs}) > 1:
        note += " of the same file"
    if not any(r.is_baseline for r in runs):
        note = "no baseline run: cells are not coloured"
    ax.set_title("Summary of all runs\n%s\n%s" % (describe(metas, args.title), note),
                 fontsize=10, pad=12)
    save(fig, args.out_dir, "summary_heatmap.png", args.dpi)


# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# 4. streaming.png


def run_setting(run):
    """How a run was fed, for a legend: 'positions cache, skip []'."""
    m = run.meta
    skip = m.get("skip_layers")
    spec = run.entry.get("spec") or ""
    found = re.search(r"skip_layers=(\[[^\]]*\])", spec)
    if found:
        skip = found.group(1)
    return "positions %s, skip %s" % (m.get("positions") or "?", skip if skip is not None else "?")


def plot_streaming(runs, metas, args, colors):
    streamed = [r for r in runs if isinstance(r.entry.get("windows"), list) and r.entry["windows"]]
    if not streamed:
        return
    fig, (ax, ax_cache) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    styles = ["-", "--", ":", "-."]
    contexts = set()
    for n, r in enumerate(streamed):
        wins = [w for w in r.entry["windows"] if w.get("sample", 0) == 0 and w.get("ppl") is not None]
        x = [w["end"] for w in wins]
        # One colour per run here: the same method under different position rules is the point.
        reference = r.entry.get("reference")
        color = BASELINE_COLOR if r.is_baseline else "0.55" if reference else PALETTE[n % len(PALETTE)]
        name = "full cache" if r.is_baseline else r.orig_label
        setting = reference + ", no cache" if reference else run_setting(r)
        style = ":" if reference else styles[n % len(styles)] if not r.is_baseline else "-"
        lw = 3.0 if reference else 1.4
        ax.plot(x, [w["ppl"] for w in wins], style, color=color, lw=lw, label="%s (%s)" % (name, setting))
        ax_cache.plot(x, [w["cache_tokens"] for w in wins], style, color=color, lw=lw)
        if r.meta.get("model_context"):
            contexts.add(r.meta["model_context"])
    for c in sorted(contexts):
        for a in (ax, ax_cache):
            a.axvline(c, color="grey", lw=1, ls="--")
        ax.text(c, 0.98, " model context (%d)" % c, transform=ax.get_xaxis_transform(), va="top",
                ha="left", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_ylabel("PPL per window (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Perplexity while reading past the model's context\n" + describe(metas, args.title), fontsize=10)
    ax_cache.set_yscale("log")
    ax_cache.set_ylabel("cache tokens")
    ax_cache.set_xlabel("tokens read")
    ax_cache.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    legend = ax_cache.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2,
                             frameon=False)
    save(fig, args.out_dir, "streaming.png", args.dpi, extra=[legend])


def main():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the docstring at the top of this file for details.")
    p.add_argument("files", nargs="+", metavar="RESULTS.json", help="kvbench --json output")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help="folder for the PNGs (default: docs/figures in the repository)")
    p.add_argument("--title", default="", help="extra text for every figure title")
    p.add_argument("--dpi", type=int, default=120, help="PNG resolution (default 120)")
    args = p.parse_args()
    if args.dpi < 10 or args.dpi > 1200:
        fail("--dpi must be between 10 and 1200")
    runs, metas = load(args.files)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail("cannot create --out-dir %s: %s" % (args.out_dir, e))
    colors = method_colors(runs)
    for budget in budgets_of(runs):
        plot_comparison(runs, budget, metas, args, colors)
    plot_tradeoff(runs, metas, args, colors)
    plot_heatmap(runs, metas, args)
    plot_streaming(runs, metas, args, colors)


if __name__ == "__main__":
    main()
