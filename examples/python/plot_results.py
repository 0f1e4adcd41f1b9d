#!/usr/bin/env python3
"""Plot the JSON that `kvbench --json FILE` writes: which KV-cache method is better, by how much.

Usage:
  python3 examples/python/plot_results.py RESULTS.json [MORE.json ...] --out-dir DIR
      [--title TEXT] [--dpi N]

  RESULTS.json   one or more kvbench JSON files; their "results" lists are concatenated in
                 the order given. A label that already appeared in an earlier file gets the
                 suffix "#N" (N = the file's position on the command line, from 1).
  --out-dir DIR  where the PNGs go (required; created if missing). Nothing is written elsewhere.
  --title TEXT   extra text added to every figure title
  --dpi N        resolution of the PNGs (default 120)

Figures (file names are fixed; each one written is printed):
  quality_vs_cache.png     the answer in one figure: ΔPPL % against the full cache (top) and
                           Δaccuracy in percentage points (bottom) versus the cache tokens each
                           run really keeps (log2 axis), one line per method across budgets,
                           the full cache at 0; legend ordered best first (mean rank of PPL
                           within each budget)
  comparison_<budget>.png  one per label budget: ΔPPL %, Δaccuracy pp and KV cache MiB per
                           method (top row), and the timings (bottom row: TTFT, TPOT, eval step
                           or throughput, whichever the files have) as bars with min–max error
                           bars and the baseline as a line with its min–max band; each tick reads
                           "method (tokens kept)"
  tradeoff.png             ΔPPL % against TPOT (else throughput, else eval step), with min–max
                           error bars; colour = method, marker shape = cache tokens kept, full
                           cache a gold star with its spread shaded
  summary_heatmap.png      runs x metrics, file by file: tokens kept, ΔPPL, Δaccuracy, timings,
                           KV cache and peak memory (MiB); green better, red worse than the
                           baseline of the same file (saturating at 5 % PPL, 1 pp accuracy, 2x
                           time or memory); a timing whose [min, max] overlaps the baseline's is
                           left white and marked "≈"; timings with no spread (schema 1, a single
                           repeat) are not coloured either, only their ×ratio is printed
  throughput.png           only when the file has "throughput" (kvbench --throughput): decode
                           tokens/s (top) and peak memory (bottom) against the batch, one
                           column per context, one line per run, the largest batch that fits
                           starred, the memory limit dashed (throughput_N.png for a later file)
  streaming.png            only when results carry "windows" (kvbench --window, long texts):
                           PPL of every window against the tokens read, one line per run, the
                           model's context marked (StreamingLLM's figure 3), cache tokens below
A figure with nothing to draw (e.g. no PPL after --no-eval) is skipped with a note on stderr.

Rules the figures keep:
  * Quality is shown relative to the full cache: the run labelled "baseline" (spec null) of the
    same file. ΔPPL % = 100 (PPL / PPL_baseline - 1); Δaccuracy = accuracy - accuracy_baseline
    in percentage points. Axes are linear around 0, and become logarithmic beyond ±10 % (PPL)
    or ±2 pp (accuracy) when a run is far off, so that 1-3 % differences stay visible. A file
    with no baseline is said so (stderr and figure), and its absolute values are drawn on an
    axis not from 0; a run is never compared with another file's baseline.
  * A run is drawn at the cache it really keeps ("cache_tokens": first compressed layer), not
    at its label's budget (pyramid_kv_512 keeps 414 tokens, adaptive_l2_1024 keeps 512).
  * Bytes are shown in MiB (2**20 bytes).
  * Timings are drawn with min–max error bars where the file has *_min / *_max, the
    baseline's as a band; a difference inside the spread is marked "≈", not coloured.
    Schema-1 timings are labelled "eval loop: single run, no spread".

Input schemas, told apart by the top-level key "schema":
  schema 1 (no "schema" key; the older files in docs/results): "ttft_s", "tpot_s" and
      "throughput_tok_s" time kvbench's evaluation loop (TTFT = its first step); one
      measurement each, no spread. The figures call them "eval loop" and say "no spread".
  schema 2 ("schema": 2): "ttft_s", "tpot_s", "throughput_tok_s" are the generation
      measurement (prompt prefill through the first new token; time per later token;
      batch / TPOT), medians over "repeats" runs with "<key>_min" / "<key>_max";
      "eval_step_s" (+ _min/_max over samples) is the quality pass's time per token.
      Any field may be null ("--generate 0": no generation timings; "--no-eval": no PPL,
      accuracy or eval step). A larger "schema" number is read as 2, with a warning.

Labels: the full-cache run is "baseline" (spec null); a run with spec null and a "reference"
(e.g. "recompute_2048") is a reference without a cache. A compressed run labelled
<method>_<budget> (h2o_l2_512, streaming_llm_1024) is split at its trailing integer (the label's
budget, used only to group the comparison figures); a label with no trailing integer is a free
label and goes to the budget "custom". kvbench's duplicate suffix (h2o_l2_512_2) keeps the
budget 512. Missing or null figures are shown as "n/a".

Errors (exit status 2, one line on stderr): a missing, unreadable or non-JSON file, a JSON
without a "results" list, an unknown "schema" value, an --out-dir that cannot be created or
written.

Example:
  ./build/examples/kvbench --compare-all --json /tmp/kvbench.json
  python3 examples/python/plot_results.py /tmp/kvbench.json --out-dir /tmp/figures

Needs only matplotlib (Agg backend, no display) and numpy.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, Normalize, to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

PROG = "plot_results.py"
MIB = float(2 ** 20)

# kvbench's method names, in its --compare-all order; they get fixed colours so that a method
# has the same colour in every figure and every run of this script.
KNOWN_METHODS = ["streaming_llm", "h2o_l2", "recent_only", "snapkv_lite", "pyramid_kv",
                 "adaptive_l2", "fix_size_l2", "l2"]
PALETTE = list(plt.get_cmap("tab10").colors) + ["#1b2a7a", "#00a087", "#b8860b", "#e7298a", "#a50f15",
                                                "#4d4d4d", "#80b1d3", "#fb9a99"]
CACHE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "d"]
FILE_STYLES = ["-", "--", ":", "-."]
METHOD_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "h", "<", ">", "p", "d"]  # lines that coincide stay told apart
BASELINE_COLOR = "black"
REFERENCE_COLOR = "0.45"
CUSTOM = "custom"

# key: name, unit, scale from the JSON unit, lower_is_better, value format.
METRIC = {
    "ppl": ("PPL", "", 1.0, True, "{:.2f}"),
    "accuracy": ("accuracy", "%", 100.0, False, "{:.2f}"),
    "ttft_s": ("TTFT", "ms", 1e3, True, "{:.2f}"),
    "tpot_s": ("TPOT", "ms", 1e3, True, "{:.2f}"),
    "throughput_tok_s": ("throughput", "tok/s", 1.0, False, "{:.1f}"),
    "eval_step_s": ("eval step", "ms", 1e3, True, "{:.2f}"),
    "cache_bytes": ("KV cache", "MiB", 1.0 / MIB, True, "{:.2f}"),
    "peak_memory_bytes": ("peak memory", "MiB", 1.0 / MIB, True, "{:.1f}"),
}
TIMINGS = ("ttft_s", "tpot_s", "eval_step_s", "throughput_tok_s")
# What a timing measures, by schema.
TIMING_NAME = {
    2: {"ttft_s": "TTFT (generation: prefill + 1st token)", "tpot_s": "TPOT (generation)",
        "throughput_tok_s": "decode throughput (generation)", "eval_step_s": "eval step (quality pass)"},
    1: {"ttft_s": "first step (eval loop)", "tpot_s": "TPOT (eval loop)",
        "throughput_tok_s": "throughput (eval loop)", "eval_step_s": "eval step"},
}
TIMING_SHORT = {2: {"ttft_s": "gen.", "tpot_s": "gen.", "throughput_tok_s": "gen.", "eval_step_s": "quality pass"},
                1: {"ttft_s": "eval loop", "tpot_s": "eval loop", "throughput_tok_s": "eval loop",
                    "eval_step_s": "eval loop"}}

# Δ axes: linear within ±LINEAR, logarithmic beyond when a run is further off than 3×LINEAR.
DELTA_LINEAR = {"ppl": 10.0, "accuracy": 2.0}
DELTA_UNIT = {"ppl": "%", "accuracy": "pp"}
DELTA_STEP = {"ppl": 2.0, "accuracy": 0.5}  # tick step inside the linear part
LINSCALE = 1.5  # decades' worth of height given to the linear part of a symlog axis
# The heatmap's colours saturate at these differences from the baseline.
SATURATE = {"ppl": 5.0, "accuracy": 1.0, "ratio": 2.0}


def fail(message):
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    sys.exit(2)


def warn(message):
    sys.stderr.write("%s: warning: %s\n" % (PROG, message))


def note(message):
    sys.stderr.write("%s: %s\n" % (PROG, message))


def num(v):
    """A finite number as float, else None (null, strings, booleans, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# --------------------------------------------------------------------------------------------
# Loading


class Run:
    """One entry of a results list, with its parsed method/budget and display names."""

    def __init__(self, entry, file_index, meta):
        self.entry = entry
        self.file_index = file_index
        self.meta = meta
        self.schema = meta["schema"]
        self.orig_label = self.label = entry["label"]  # label may get a "#N" suffix
        spec = entry.get("spec")
        self.is_reference = spec is None and bool(entry.get("reference"))
        self.is_baseline = spec is None and not self.is_reference and self.label.startswith("baseline")
        if self.is_baseline:
            self.method, self.budget, self.extra = "baseline", None, ""
        else:
            self.method, self.budget, self.extra = parse_label(self.label)
        self.suffix = ""
        self.ref = None  # the baseline Run of the same file, if any

    def value(self, key):
        """The figure in display units (ms, %, MiB), or None when absent/null/not measured."""
        v = num(self.entry.get(key))
        if v is None or (key.endswith("_bytes") and v < 0):
            return None
        return v * METRIC[key][2]

    def spread(self, key):
        """(min, max) in display units from <key>_min/<key>_max (schema 2 timings), else None."""
        if self.schema < 2 or key not in TIMINGS or self.value(key) is None:
            return None
        lo, hi = num(self.entry.get(key + "_min")), num(self.entry.get(key + "_max"))
        if lo is None or hi is None:
            return None
        s = METRIC[key][2]
        return min(lo, hi) * s, max(lo, hi) * s

    def has_spread(self, key):
        sp = self.spread(key)
        return sp is not None and sp[1] > sp[0]

    @property
    def cache_tokens(self):
        """Tokens the run really keeps (first compressed layer); the generation block's when the
        evaluation did not run; None when unknown."""
        for v in (self.entry.get("cache_tokens"), (self.entry.get("generation") or {}).get("cache_tokens")
                  if isinstance(self.entry.get("generation"), dict) else None):
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    def delta(self, key):
        """ΔPPL % or Δaccuracy pp against the baseline of the same file; None without one."""
        v = self.value(key)
        b = self.ref.value(key) if self.ref is not None else None
        if v is None or b is None:
            return None
        if key == "ppl":
            return 100.0 * (v / b - 1.0) if b > 0 else None
        return v - b

    @property
    def short(self):
        """Name within its budget group."""
        return self.method + self.extra + self.suffix

    def kept_name(self, name=None):
        """'pyramid_kv (414)': the name with the tokens it really keeps."""
        name = name or self.short
        ct = self.cache_tokens
        return "%s (%d)" % (name, ct) if ct else name

    def point_name(self):
        """The label, plus the tokens kept where they differ from the label's budget."""
        ct = self.cache_tokens
        if ct and not self.is_baseline and str(ct) != self.budget:
            return "%s (%d)" % (self.label, ct)
        return self.label

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


def read_json(path):
    if not os.path.exists(path):
        fail("%s: no such file" % path)
    if os.path.isdir(path):
        fail("%s: is a directory, not a kvbench JSON file" % path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            fail("%s: empty file, not a kvbench JSON file" % path)
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail("%s: not valid JSON: %s (line %d, column %d)" % (path, e.msg, e.lineno, e.colno))
    except UnicodeDecodeError as e:
        fail("%s: not valid JSON: not UTF-8 text (%s)" % (path, e.reason))
    except OSError as e:
        fail("cannot read %s: %s" % (path, e.strerror or e))


def load(paths):
    runs, metas, seen = [], [], set()
    for index, path in enumerate(paths, start=1):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            fail("%s: no \"results\" list at the top level: not the output of kvbench --json" % path)
        schema = data.get("schema", 1)
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
            fail("%s: \"schema\" is %s; this script reads schema 1 (no \"schema\" key) and 2"
                 % (path, json.dumps(schema)))
        if schema > 2:
            warn("%s: schema %d is newer than this script (2); read as schema 2" % (path, schema))
            schema = 2
        meta = {k: data.get(k) for k in ("model", "device", "dtype", "tokens", "samples", "positions",
                                          "skip_layers", "model_context", "repeats", "generate",
                                          "prompt_tokens", "batch", "process_per_repeat")}
        meta.update(schema=schema, path=path, index=index, throughput=data.get("throughput"))
        metas.append(meta)
        if not data["results"]:
            warn("%s: \"results\" is empty" % path)
        for i, entry in enumerate(data["results"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not entry["label"]:
                fail("%s: results[%d] is not an object with a \"label\" string" % (path, i))
            run = Run(entry, index, meta)
            if run.label in seen:
                run.suffix = "#%d" % index
                run.label += run.suffix
                n = 2
                while run.label in seen:  # a clash inside a later file, or a repeated path
                    run.suffix = "#%d.%d" % (index, n)
                    run.label = run.orig_label + run.suffix
                    n += 1
            seen.add(run.label)
            runs.append(run)
    if not runs:
        fail("no results in %s" % ", ".join(paths))
    # Each run is compared with the baseline of its own file only (other files may hold other
    # texts, models or devices).
    for r in runs:
        own = [b for b in runs if b.is_baseline and b.file_index == r.file_index]
        r.ref = own[0] if own else None
    for meta in metas:
        file_runs = [r for r in runs if r.file_index == meta["index"]]
        if any(not r.is_baseline for r in file_runs) and not any(r.is_baseline for r in file_runs):
            warn("%s: no \"baseline\" (full cache) run: its quality is shown as absolute values"
                 % meta["path"])
    if len({m["schema"] for m in metas}) > 1:
        warn("schema 1 and schema 2 files mixed: their timings measure different things "
             "(eval loop vs generation)")
    return runs, metas


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail("--out-dir %s: exists and is not a directory" % out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail("--out-dir %s: cannot create it: %s" % (out_dir, e.strerror or e))
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        fail("--out-dir %s: cannot write there: %s" % (out_dir, e.strerror or e))


# --------------------------------------------------------------------------------------------
# Shared helpers


def describe(metas, extra):
    """'model · device · dtype · N tokens' over all files (distinct values joined by '/')."""
    def join(key):
        vals = []
        for m in metas:
            v = m.get(key)
            if v is not None and str(v) not in vals:
                vals.append(str(v))
        return "/".join(vals) if vals else "?"
    text = "%s · %s · %s · %s tokens" % (join("model"), join("device"), join("dtype"), join("tokens"))
    return text + (" — " + extra if extra else "")


def timing_context(runs):
    """How the timings of these runs were taken, in one line."""
    parts = []
    metas = []
    for r in runs:
        if r.meta not in metas:
            metas.append(r.meta)
    m2 = [m for m in metas if m["schema"] >= 2]
    if m2:
        gen = []
        for m in m2:
            if m.get("generate") == 0:
                text = "no generation (--generate 0)"
            else:
                text = "generation: batch %s, %s-token prompt + %s new tokens, median of %s repeats" % (
                    m.get("batch") if m.get("batch") is not None else "?",
                    m.get("prompt_tokens") if m.get("prompt_tokens") is not None else "?",
                    m.get("generate") if m.get("generate") is not None else "?",
                    m.get("repeats") if m.get("repeats") is not None else "?")
                if m.get("process_per_repeat"):
                    text += " (each in a fresh process)"
            if text not in gen:
                gen.append(text)
        parts.append("; ".join(gen) + "; error bars: min–max")
    if any(m["schema"] < 2 for m in metas):
        parts.append("schema-1 file%s: timings of the eval loop, single run, no spread"
                     % ("s" if sum(m["schema"] < 2 for m in metas) > 1 else ""))
    return "\n".join(parts)


def timing_title(key, runs):
    """Axis title of a timing: what it is, its unit and direction; and a note on its spread."""
    schemas = sorted({2 if r.schema >= 2 else 1 for r in runs if r.value(key) is not None}) or [2]
    name = " / ".join(TIMING_NAME[s][key] for s in schemas)
    unit = METRIC[key][1]
    better = "lower" if METRIC[key][3] else "higher"
    notes = []
    if 2 in schemas:
        if any(r.has_spread(key) for r in runs):
            notes.append("bars: min–max over samples" if key == "eval_step_s" else "median, bars: min–max")
        else:
            notes.append("no spread (one measurement)")
    if 1 in schemas:
        notes.append("eval loop: single run, no spread")
    return "%s, %s (%s is better)" % (name, unit, better), "; ".join(notes)


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


def run_color(r, colors):
    if r.is_baseline:
        return BASELINE_COLOR
    if r.is_reference:
        return REFERENCE_COLOR
    return colors[r.method]


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
    if key in ("ppl", "throughput_tok_s") and v >= 1000:
        fmt = "{:.0f}"
    elif key in ("ppl", "throughput_tok_s", "peak_memory_bytes") and v >= 100:
        fmt = "{:.1f}"
    elif METRIC[key][1] == "ms" and v >= 100:
        fmt = "{:.1f}"
    return fmt.format(v)


def fmt_delta(key, v):
    if v is None:
        return "n/a"
    unit = DELTA_UNIT[key]
    if abs(v) < 0.005:
        return "0 %s" % unit
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return "%+.*f %s" % (digits, v, unit)


def plain_log_ticks(axis, lo, hi, base=10):
    """Log-scale ticks labelled 50, 100, 200 ... instead of 10^2 only."""
    if base == 2:
        ticks = [2.0 ** e for e in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(hi))) + 1)]
        axis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    else:
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if math.log10(hi / lo) < 1.2 else (1.0, 2.0, 5.0)
        axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


class DeltaAxis:
    """A Δ axis (ΔPPL % or Δaccuracy pp): linear around 0; symmetric-log beyond ±LINEAR when a
    run is further off than 3×LINEAR, so that a +97 % outlier does not flatten 1-3 %."""

    def __init__(self, key, values):
        self.key = key
        self.unit = DELTA_UNIT[key]
        self.lin = DELTA_LINEAR[key]
        vals = [v for v in values if v is not None] + [0.0]
        self.lo, self.hi = min(vals), max(vals)
        self.log = max(-self.lo, self.hi) > 3 * self.lin

    def fwd(self, v):
        if not self.log:
            return v
        a = abs(v)
        t = a / self.lin * LINSCALE if a <= self.lin else LINSCALE + math.log10(a / self.lin)
        return math.copysign(t, v)

    def inv(self, t):
        if not self.log:
            return t
        a = abs(t)
        v = a / LINSCALE * self.lin if a <= LINSCALE else self.lin * 10 ** (a - LINSCALE)
        return math.copysign(v, t)

    def apply(self, ax, axis="y", pad_lo=0.1, pad_hi=0.14):
        tlo, thi = self.fwd(self.lo), self.fwd(self.hi)
        span = (thi - tlo) or (1.0 if self.log else max(0.5 * self.lin / 10, 0.1))
        lo = self.inv(tlo - pad_lo * span) if self.lo < 0 else self.inv(-0.04 * span)
        hi = self.inv(thi + pad_hi * span) if self.hi > 0 else self.inv(0.04 * span)
        a = ax.yaxis if axis == "y" else ax.xaxis
        if self.log:
            (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=self.lin, linscale=LINSCALE)
            step = DELTA_STEP[self.key]
            n = int(round(self.lin / step))
            ticks = [k * step for k in range(-n, n + 1)]
            for e in range(-1, 7):
                for m in (1, 2, 5):
                    t = m * 10.0 ** e
                    if t > self.lin * 1.5:
                        ticks += [t, -t]
            ticks = sorted({t for t in ticks if lo <= t <= hi})
            a.set_major_locator(FixedLocator(ticks))
            a.set_minor_locator(NullLocator())
            for t in (-self.lin, self.lin):  # where the scale changes
                if lo < t < hi:
                    (ax.axhline if axis == "y" else ax.axvline)(t, color="0.55", lw=0.8, ls=":", zorder=1)
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
        a.set_major_formatter(FuncFormatter(
            lambda v, _: "0" if abs(v) < 1e-9 else "%+g %s" % (float("%.3g" % v), self.unit)))

    def note(self):
        return ("±%g %s" % (self.lin, self.unit)) if self.log else ""


def scale_note(notes):
    """'axis linear within ±10 % / ±2 pp, logarithmic beyond' from DeltaAxis.note()s."""
    notes = [n for n in dict.fromkeys(notes) if n]
    return "Δ axis linear within %s, logarithmic beyond" % " / ".join(notes) if notes else ""


def save(fig, out_dir, name, dpi, extra=None):
    path = os.path.join(out_dir, name)
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white", bbox_extra_artists=extra)
    except OSError as e:
        fail("cannot write %s: %s" % (path, e.strerror or e))
    plt.close(fig)
    print(path)


def _overlap(a, b):
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(fig, ax, points, texts, colors, fontsize=8, segments=(), radii=None):
    """Greedy label placement: for each point try offsets around it (nearest first) and keep
    the first whose text box hits no other label, marker, error bar (segments: pairs of data
    points) or the axes' edge."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    disp = ax.transData.transform(points)
    pt = fig.dpi / 72.0
    radii = [6.0 * pt if radii is None else radii[i] * pt for i in range(len(points))]  # marker half-sizes
    obstacles = [Bbox([[px - r, py - r], [px + r, py + r]]) for (px, py), r in zip(disp, radii)]
    for a, b in segments:
        (x0, y0), (x1, y1) = ax.transData.transform([a, b])
        obstacles.append(Bbox([[min(x0, x1) - 1, min(y0, y1) - 2], [max(x0, x1) + 1, max(y0, y1) + 2]]))
    dirs = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    order = sorted(range(len(points)), key=lambda i: -disp[i][1])
    for i in order:
        best = None
        for dist in [d + radii[i] / pt - 6 for d in (7, 14, 24, 36, 50, 66)]:
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
        if dist > 7 + radii[i] / pt - 6:  # not right next to its point: redraw with a leader line
            t.remove()
            t = ax.annotate(t.get_text(), points[i], xytext=t.xyann, textcoords="offset points",
                            ha=t.get_ha(), va=t.get_va(), fontsize=fontsize, color=colors[i],
                            zorder=5, arrowprops=dict(arrowstyle="-", color="gray", lw=0.6,
                                                      shrinkA=0, shrinkB=4))
        obstacles.append(bb)


def darker(color, f=0.75):
    return tuple(f * c for c in to_rgb(color))


LABEL_BOX = dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.75)


# --------------------------------------------------------------------------------------------
# 1. quality_vs_cache.png


def series_of(runs):
    """Compressed runs grouped into lines: one per method (and file, when several files hold it)."""
    files_of = {}
    for r in runs:
        if not r.is_baseline and not r.is_reference:
            files_of.setdefault(r.method + r.extra, set()).add(r.file_index)
    series = {}
    for r in runs:
        if r.is_baseline or r.is_reference:
            continue
        name = r.method + r.extra
        if len(files_of[name]) > 1:
            name += " #%d" % r.file_index
        series.setdefault(name, []).append(r)
    return series


def mean_ranks(series, quality):
    """Mean rank (1 = best PPL) of each series within each (file, label budget) group."""
    groups = {}
    for name, rs in series.items():
        for r in rs:
            q = quality(r)
            if q is not None and r.budget != CUSTOM:
                groups.setdefault((r.file_index, r.budget), []).append((q, name))
    ranks = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()
        for i, (q, name) in enumerate(members):
            tied = [j for j, (q2, _) in enumerate(members) if q2 == q]
            ranks.setdefault(name, []).append(1 + sum(tied) / len(tied))
    return {n: sum(v) / len(v) for n, v in ranks.items()}


def plot_quality_vs_cache(runs, metas, args, colors):
    delta = any(r.ref is not None for r in runs if not r.is_baseline)
    series = series_of(runs)

    def quality(r, key="ppl"):
        return r.delta(key) if delta else r.value(key)

    keys = ["ppl"] + (["accuracy"] if any(quality(r, "accuracy") is not None
                                         for rs in series.values() for r in rs) else [])
    drawn = {n: [r for r in rs if r.cache_tokens and quality(r) is not None] for n, rs in series.items()}
    drawn = {n: rs for n, rs in drawn.items() if rs}
    refs = [r for r in runs if r.is_reference and r.cache_tokens and quality(r) is not None]
    bases = [r for r in runs if r.is_baseline and r.cache_tokens and r.value("ppl") is not None
             and (not delta or any(x.ref is r for x in runs if not x.is_baseline))]
    skipped = [r.label for rs in series.values() for r in rs if not r.cache_tokens or quality(r) is None]
    if delta:
        skipped += [r.label for r in runs if r.is_reference and r.ref is None]
    if not drawn and not refs:
        note("quality_vs_cache.png not drawn: no compressed run has both PPL and a cache size")
        return
    ranks = mean_ranks(drawn, quality)
    names = sorted(drawn, key=lambda n: (ranks.get(n, float("inf")), n))
    files = sorted({r.file_index for rs in drawn.values() for r in rs})  # line style per file
    heights = [3.2 if k == "ppl" else 2.2 for k in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 1.8 + sum(heights)), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    xs_all = [r.cache_tokens for rs in drawn.values() for r in rs] + [r.cache_tokens for r in refs + bases]
    notes = []
    for ax, key in zip(axes, keys):
        vals = []
        for n in names:
            rs = sorted(drawn[n], key=lambda r: r.cache_tokens)
            pts = [(r.cache_tokens, quality(r, key)) for r in rs if quality(r, key) is not None]
            if not pts:
                continue
            c = colors[rs[0].method]
            mk = METHOD_MARKERS[list(colors).index(rs[0].method) % len(METHOD_MARKERS)]
            ls = FILE_STYLES[files.index(rs[0].file_index) % len(FILE_STYLES)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=mk, color=c, lw=1.6, ms=7,
                    mec="black", mew=0.5, zorder=3, alpha=0.9, label=n)
            vals += [p[1] for p in pts]
        for r in refs:
            q = quality(r, key)
            if q is not None:
                ax.plot([r.cache_tokens], [q], "D", color=REFERENCE_COLOR, ms=7, mec="black", mew=0.5,
                        zorder=3, label="%s (reference, no cache)" % r.label if key == "ppl" else None)
                vals.append(q)
        for b in bases:
            q = 0.0 if delta else b.value(key)
            if q is None:
                continue
            ax.plot([b.cache_tokens], [q], "*", color="gold", ms=16, mec="black", mew=1.0, zorder=4,
                    label=("full cache (%s, %d tokens)" % (b.label, b.cache_tokens)) if key == "ppl" else None)
            vals.append(q)
        if delta:
            ax.axhline(0, color=BASELINE_COLOR, lw=1.0, ls="--", zorder=2)
            scale = DeltaAxis(key, vals)
            scale.apply(ax)
            notes.append(scale.note())
            ax.set_ylabel("%s vs full cache, %s\n(%s is better)" % (
                "ΔPPL" if key == "ppl" else "Δaccuracy", DELTA_UNIT[key], "lower" if key == "ppl" else "higher"))
        else:
            vv = [v for v in vals if v is not None]
            if key == "ppl" and vv and min(vv) > 0 and max(vv) / min(vv) > 3:
                ax.set_yscale("log")
                ax.set_ylim(min(vv) / 1.2, max(vv) * 1.2)
                plain_log_ticks(ax.yaxis, *ax.get_ylim())
            elif vv:
                span = (max(vv) - min(vv)) or abs(max(vv)) * 0.05 or 1.0
                ax.set_ylim(min(vv) - 0.15 * span, max(vv) + 0.15 * span)
            ax.set_ylabel("%s (absolute: no baseline)\n(%s is better)" % (
                "PPL" if key == "ppl" else "accuracy, %", "lower" if key == "ppl" else "higher"))
        ax.grid(True, alpha=0.3)
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        if hi / lo > 4:
            axes[-1].set_xscale("log", base=2)
            axes[-1].set_xlim(lo / 1.25, hi * 1.25)
            plain_log_ticks(axes[-1].xaxis, lo / 1.25, hi * 1.25, base=2)
            xlabel = "cache tokens kept (log2 scale; first compressed layer)"
        else:
            pad = (hi - lo) * 0.08 or lo * 0.1
            axes[-1].set_xlim(lo - pad, hi + pad)
            xlabel = "cache tokens kept (first compressed layer)"
        axes[-1].set_xlabel(xlabel)
    handles, labels = axes[0].get_legend_handles_labels()
    order = [labels.index(n) for n in names if n in labels] + \
            [i for i, lab in enumerate(labels) if lab not in names]
    shown = [labels[i] + ("  (rank %.1f)" % ranks[labels[i]] if labels[i] in ranks else "") for i in order]
    title = "method, best first\n(mean rank of PPL\nwithin each budget)" if ranks else "method"
    legend = axes[0].legend([handles[i] for i in order], shown, title=title, loc="upper left",
                            bbox_to_anchor=(1.01, 1.0), fontsize=8.5, title_fontsize=8.5)
    head = ("Quality lost against the full cache, by cache tokens kept" if delta
            else "Quality by cache tokens kept (no baseline run: absolute values)")
    sub = [describe(metas, args.title)]
    if scale_note(notes):
        sub.append(scale_note(notes))
    if not delta and len({r.file_index for r in runs}) > 1:
        sub.append("values from different files (texts, lengths) are not a like-for-like comparison")
    if skipped:
        sub.append("not shown (no PPL%s or cache size): %s" % (
            " relative to a baseline" if delta else "", ", ".join(skipped[:5]) + (
                " ... (%d more)" % (len(skipped) - 5) if len(skipped) > 5 else "")))
    axes[0].set_title(head + "\n" + "\n".join(sub), fontsize=10)
    fig.tight_layout()
    save(fig, args.out_dir, "quality_vs_cache.png", args.dpi, extra=[legend])


# --------------------------------------------------------------------------------------------
# 2. comparison_<budget>.png


def bar_labels(ax, xs, tops, texts, colors=None, below=None):
    """Value labels just past each bar's end (above, or below for negative bars)."""
    for i, (x, top, text) in enumerate(zip(xs, tops, texts)):
        neg = below[i] if below else False
        ax.annotate(text, (x, top), xytext=(0, -3 if neg else 3), textcoords="offset points",
                    ha="center", va="top" if neg else "bottom", fontsize=7.5, zorder=6,
                    color=colors[i] if colors else "black", bbox=LABEL_BOX)


def panel_delta(ax, group, key, colors):
    vals = [r.delta(key) for r in group]
    x = np.arange(len(group))
    scale = DeltaAxis(key, vals)
    ax.bar(x, [v if v is not None else 0.0 for v in vals], width=0.7,
           color=[colors[r.method] for r in group], edgecolor="black", linewidth=0.5, zorder=2)
    ax.axhline(0, color=BASELINE_COLOR, lw=1.2, zorder=3)
    scale.apply(ax, pad_lo=0.16, pad_hi=0.16)
    bar_labels(ax, x, [v if v is not None else 0.0 for v in vals],
               [fmt_delta(key, v) if v is not None else "n/a" for v in vals],
               below=[v is not None and v < 0 for v in vals])
    better = "lower" if key == "ppl" else "higher"
    title = ("ΔPPL vs full cache, %% (%s is better)" if key == "ppl"
             else "Δaccuracy vs full cache, pp (%s is better)") % better
    return title, scale_note([scale.note()])


def panel_absolute_quality(ax, group, key, colors):
    """No baseline: absolute values as dots on an axis that does not start at 0."""
    vals = [r.value(key) for r in group]
    x = np.arange(len(group))
    for xi, r, v in zip(x, group, vals):
        if v is not None:
            ax.plot([xi], [v], "o", color=colors[r.method], ms=9, mec="black", mew=0.6, zorder=3)
    vv = [v for v in vals if v is not None]
    if vv:
        if key == "ppl" and min(vv) > 0 and max(vv) / min(vv) > 3:
            ax.set_yscale("log")
            ax.set_ylim(min(vv) / 1.3, max(vv) * 1.5)
            plain_log_ticks(ax.yaxis, *ax.get_ylim())
        else:
            span = (max(vv) - min(vv)) or abs(max(vv)) * 0.05 or 1.0
            ax.set_ylim(min(vv) - 0.2 * span, max(vv) + 0.3 * span)
    bar_labels(ax, x, [v if v is not None else ax.get_ylim()[0] for v in vals],
               [fmt_value(key, v) for v in vals])
    name = "PPL" if key == "ppl" else "accuracy, %"
    return ("%s (%s is better)" % (name, "lower" if key == "ppl" else "higher"),
            "no baseline in the file: absolute values, axis not from 0")


def panel_value(ax, group, baselines, key, colors):
    """Bars from 0 with min–max error bars; the baselines as lines with their min–max band."""
    vals = [r.value(key) for r in group]
    x = np.arange(len(group))
    heights = [v if v is not None else 0.0 for v in vals]
    err = np.array([[v - r.spread(key)[0], r.spread(key)[1] - v] if r.has_spread(key) else [0.0, 0.0]
                    for r, v in zip(group, heights)]).T.reshape(2, len(group))
    ax.bar(x, heights, width=0.7, color=[colors[r.method] for r in group], edgecolor="black",
           linewidth=0.5, zorder=2)
    if err.any():
        ax.errorbar(x, heights, yerr=err, fmt="none", ecolor="black", elinewidth=1.0, capsize=3, zorder=4)
    base_vals = [(b, b.value(key)) for b in baselines if b.value(key) is not None]
    tops = [h + e for h, e in zip(heights, err[1])]
    known = [v for v in tops if v > 0] + [v for _, v in base_vals] + \
            [b.spread(key)[1] for b, _ in base_vals if b.has_spread(key)]
    log = known and min(known) > 0 and max(known) / min(known) > 20
    styles = ["--", ":", "-."]
    base_text = []
    for i, (b, v) in enumerate(base_vals):
        ax.axhline(v, color=BASELINE_COLOR if i == 0 else "dimgray", ls=styles[i % 3], lw=1.3, zorder=3)
        sp = b.spread(key) if b.has_spread(key) else None
        if sp:
            ax.axhspan(sp[0], sp[1], color="0.5", alpha=0.18, lw=0, zorder=1)
        text = "%s line: %s %s %s" % ({"--": "dashed", ":": "dotted", "-.": "dash-dot"}[styles[i % 3]],
                                "full cache" if len(base_vals) == 1 else b.label,
                                fmt_value(key, v), METRIC[key][1])
        if sp:
            text += ", band: its min–max"
        base_text.append(text)
    top = max(known) if known else 1.0
    if log:
        ax.set_yscale("log")
        bottom = min(known) / 1.5
        ax.set_ylim(bottom, top * (top / bottom) ** 0.3)
        plain_log_ticks(ax.yaxis, *ax.get_ylim())
    else:
        ax.set_ylim(0, top * 1.22 if top > 0 else 1.0)
    texts = []
    for r, v in zip(group, vals):
        text = fmt_value(key, v)
        if v is not None and within_spread(r, key):
            text = "≈" + text  # its min–max overlaps its baseline's
        texts.append(text)
    bar_labels(ax, x, [t if v is not None else ax.get_ylim()[0] for t, v in zip(tops, vals)], texts)
    if key in TIMINGS:
        title, note = timing_title(key, group + [b for b, _ in base_vals])
    else:
        title, note = "%s, %s (lower is better)" % (METRIC[key][0], METRIC[key][1]), ""
    if base_text:
        spread = any(b.has_spread(key) for b, _ in base_vals)
        note = "\n".join(t for t in [note, "; ".join(base_text)] if t)
        if spread and any(within_spread(r, key) for r in group):
            note += "; ≈: overlaps"
    return title, note


def within_spread(r, key):
    """True when the run's min–max overlaps its baseline's (a timing difference not measured)."""
    b = r.ref
    if b is None or r.is_baseline or key not in TIMINGS or not (r.has_spread(key) or b.has_spread(key)):
        return False
    v, bv = r.value(key), b.value(key)
    if v is None or bv is None:
        return False
    rs, bs = r.spread(key) or (v, v), b.spread(key) or (bv, bv)
    return rs[0] <= bs[1] and bs[0] <= rs[1]


def plot_comparison(runs, budget, metas, args, colors):
    group = [r for r in ordered(runs) if not r.is_baseline and r.budget == budget]
    if not group:
        return
    baselines = []
    for r in group:
        if r.ref is not None and r.ref not in baselines:
            baselines.append(r.ref)
    delta = any(r.ref is not None for r in group)
    timing_keys = [k for k in TIMINGS if any(r.value(k) is not None for r in group + baselines)][:3]
    top_keys = ["ppl", "accuracy", "cache_bytes"]
    ncol = 3
    nrow = 2 if timing_keys else 1
    width = max(14.0, ncol * (0.55 * len(group) + 1.6))
    fig, axes = plt.subplots(nrow, ncol, figsize=(width, 4.6 * nrow + 1.2), squeeze=False)
    x = np.arange(len(group))
    names = [r.kept_name() for r in group]
    cells = [(axes[0][i], k) for i, k in enumerate(top_keys)]
    cells += [(axes[1][i], k) for i, k in enumerate(timing_keys)] if nrow == 2 else []
    for ax, key in cells:
        if key in ("ppl", "accuracy") and all(r.value(key) is None for r in group):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no %s in the results\n(evaluation not run: --no-eval)" % METRIC[key][0],
                    transform=ax.transAxes, ha="center", va="center", fontsize=10, color="dimgray")
            continue
        if key in ("ppl", "accuracy"):
            if delta:
                title, note = panel_delta(ax, group, key, colors)
            else:
                title, note = panel_absolute_quality(ax, group, key, colors)
        else:
            title, note = panel_value(ax, group, baselines, key, colors)
        ax.set_title(title + ("\n" + note if note else ""), fontsize=9.5 if not note else 9)
        pad = max(0.0, (4 - len(group)) / 2)  # keep bars narrow when there are few
        ax.set_xlim(-0.6 - pad, len(group) - 0.4 + pad)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", rotation_mode="anchor", fontsize=8.5)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
    if nrow == 2:
        for ax in axes[1][len(timing_keys):]:
            ax.axis("off")
    what = "KV-cache budget %s tokens (label); ticks: method (tokens really kept)" % budget \
        if budget != CUSTOM else "runs with free labels; ticks: label (tokens kept)"
    sub = describe(metas, args.title)
    ctx = timing_context(group + baselines) if timing_keys else ""
    missing = [r.label for r in group if delta and r.ref is None]
    text = "%s\n%s" % (what, sub) + ("\n" + ctx if ctx else "")
    if missing:
        text += "\nno baseline in their file (Δ n/a): " + ", ".join(missing)
    fig.suptitle(text, fontsize=11)
    fig.tight_layout()
    save(fig, args.out_dir, "comparison_%s.png" % budget, args.dpi)


# --------------------------------------------------------------------------------------------
# 3. tradeoff.png


def plot_tradeoff(runs, metas, args, colors):
    delta = any(r.ref is not None for r in runs if not r.is_baseline)
    refs_used = {id(r.ref) for r in runs if not r.is_baseline and r.ref is not None}

    def quality(r):
        if not delta:
            return r.value("ppl")
        if r.is_baseline:
            return 0.0 if id(r) in refs_used and r.value("ppl") is not None else None
        return r.delta("ppl")

    xkey = None
    for k in ("tpot_s", "throughput_tok_s", "eval_step_s"):
        if any(r.value(k) is not None and quality(r) is not None for r in runs if not r.is_baseline):
            xkey = k
            break
    if xkey is None:
        note("tradeoff.png not drawn: no compressed run has both PPL and a timing")
        return
    fig, ax = plt.subplots(figsize=(11.5, 7))
    pts = [r for r in ordered(runs) if quality(r) is not None and r.value(xkey) is not None]
    skipped = [r.label for r in runs if r not in pts and (not r.is_baseline or id(r) in refs_used)]
    sizes = sorted({r.cache_tokens for r in pts if not r.is_baseline and r.cache_tokens})
    markers = {s: CACHE_MARKERS[i % len(CACHE_MARKERS)] for i, s in enumerate(sizes)}
    xs = np.array([r.value(xkey) for r in pts])
    ys = np.array([quality(r) for r in pts])
    for r, xv, yv in zip(pts, xs, ys):
        sp = r.spread(xkey) if r.has_spread(xkey) else None
        if r.is_baseline:
            if sp:
                ax.axvspan(sp[0], sp[1], color="gold", alpha=0.18, lw=0, zorder=1)
            ax.scatter([xv], [yv], marker="*", s=340, color="gold", edgecolor="black", linewidth=1.2, zorder=5)
        else:
            c = run_color(r, colors)
            ax.scatter([xv], [yv], marker=markers.get(r.cache_tokens, "o"), s=70, color=c,
                       edgecolor="black", linewidth=0.6, zorder=4)
        if sp:
            ax.errorbar([xv], [yv], xerr=[[xv - sp[0]], [sp[1] - xv]], fmt="none",
                        ecolor=darker(run_color(r, colors), 0.8), elinewidth=1.1, capsize=3, zorder=3)
    notes = []
    if delta:
        ax.axhline(0, color=BASELINE_COLOR, lw=1.0, ls="--", zorder=2)
        scale = DeltaAxis("ppl", list(ys))
        scale.apply(ax)
        if scale.note():
            notes.append(scale_note([scale.note()]))
        ax.set_ylabel("ΔPPL vs full cache, % (lower is better)")
    else:
        log = ys.min() > 0 and ys.max() / ys.min() > 3
        if log:
            ax.set_yscale("log")
            ax.set_ylim(ys.min() / 1.25, ys.max() * 1.25)
            plain_log_ticks(ax.yaxis, *ax.get_ylim())
        else:
            span = (ys.max() - ys.min()) or abs(ys.max()) * 0.05 or 1.0
            ax.set_ylim(ys.min() - 0.18 * span, ys.max() + 0.18 * span)
        ax.set_ylabel("perplexity (absolute; lower is better)")
        notes.append("no file holds both a baseline and compressed runs: absolute PPL")
    lo = min([x for x in xs] + [r.spread(xkey)[0] for r in pts if r.has_spread(xkey)])
    hi = max([x for x in xs] + [r.spread(xkey)[1] for r in pts if r.has_spread(xkey)])
    if lo > 0 and hi / lo > 5:  # e.g. CPU and GPU runs in one plot
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.3, hi * 1.3)
        plain_log_ticks(ax.xaxis, *ax.get_xlim())
    else:
        span = (hi - lo) or abs(hi) * 0.1 or 1.0
        ax.set_xlim(lo - 0.15 * span, hi + 0.15 * span)
    title, spread_note = timing_title(xkey, pts)
    ax.set_xlabel(title + ("\n" + spread_note if spread_note else ""))
    label_colors = [darker(run_color(r, colors)) for r in pts]
    segments = [((r.spread(xkey)[0], y), (r.spread(xkey)[1], y)) for r, y in zip(pts, ys) if r.has_spread(xkey)]
    place_labels(fig, ax, np.column_stack([xs, ys]),
                 ["full cache" if r.is_baseline and len(refs_used) == 1 else r.point_name() for r in pts],
                 label_colors, segments=segments, radii=[12.0 if r.is_baseline else 6.0 for r in pts])
    ax.grid(alpha=0.3, which="major")
    methods = []
    for r in pts:
        if not r.is_baseline and r.method not in methods:
            methods.append(r.method)
    h1 = [Line2D([], [], marker="*", ls="", ms=15, mfc="gold", mec="black", label="full cache (baseline)")]
    h1 = h1 if any(r.is_baseline for r in pts) else []
    h1 += [Line2D([], [], marker="o", ls="", ms=9, mfc=REFERENCE_COLOR if any(
        r.is_reference and r.method == m for r in pts) else colors[m], mec="black", label=m) for m in methods]
    if any(r.is_baseline and r.has_spread(xkey) for r in pts):
        h1.append(Patch(color="gold", alpha=0.3, label="baseline's min–max"))
    legends = []
    if h1:
        legends.append(ax.legend(handles=h1, title="method", loc="upper left",
                                 bbox_to_anchor=(1.01, 1.0), fontsize=9, title_fontsize=9))
        ax.add_artist(legends[0])
    h2 = [Line2D([], [], marker=markers[s], ls="", ms=9, mfc="lightgray", mec="black", label="%d" % s)
          for s in sizes]
    if h2:
        legends.append(ax.legend(handles=h2, title="cache tokens\nkept", loc="lower left",
                                 bbox_to_anchor=(1.01, 0.0), fontsize=9, title_fontsize=9,
                                 ncol=2 if len(h2) > 6 else 1))
    head = "Quality vs speed: %s against %s" % ("ΔPPL" if delta else "PPL", METRIC[xkey][0])
    sub = [describe(metas, args.title), timing_context(pts)]
    if notes:
        sub.append("; ".join(notes))
    if skipped:
        sub.append("not shown (PPL%s or %s missing): %s" % (
            " vs a baseline" if delta else "", METRIC[xkey][0],
            ", ".join(skipped[:4]) + (" ... (%d more)" % (len(skipped) - 4) if len(skipped) > 4 else "")))
    ax.set_title(head + "\n" + "\n".join(s for s in sub if s), fontsize=10)
    save(fig, args.out_dir, "tradeoff.png", args.dpi, extra=legends)


# --------------------------------------------------------------------------------------------
# 4. summary_heatmap.png


def ratio_score(v, b, lower):
    """+1 = SATURATE× better than the baseline, -1 = that much worse."""
    if v == b:
        return 0.0
    if v <= 0 or b <= 0:
        return 1.0 if (v < b) == lower else -1.0
    s = math.log2(b / v) if lower else math.log2(v / b)
    return max(-1.0, min(1.0, s / math.log2(SATURATE["ratio"])))


def heat_cell(r, key, delta):
    """(main text, small text, score or None, state) of one cell; state: 'colour', 'neutral',
    'spread' (inside the measured spread: not coloured, '≈'), 'na'."""
    if key == "cache_tokens":
        ct = r.cache_tokens
        return ("%d" % ct if ct else "n/a"), "", None, "neutral" if ct else "na"
    v = r.value(key)
    if v is None:
        return "n/a", "", None, "na"
    b = r.ref.value(key) if r.ref is not None else None
    if key in ("ppl", "accuracy"):
        raw = fmt_value(key, v) + (" %" if key == "accuracy" else "")
        if not delta or b is None:
            return raw, "", None, "neutral"
        if r.is_baseline:
            return raw, "full cache", None, "neutral"
        d = r.delta(key)
        score = -d / SATURATE["ppl"] if key == "ppl" else d / SATURATE["accuracy"]
        return fmt_delta(key, d), raw, max(-1.0, min(1.0, score)), "colour"
    main = fmt_value(key, v)
    if r.is_baseline or b is None:
        sp = r.spread(key) if r.has_spread(key) else None
        return main, ("%s–%s" % (fmt_value(key, sp[0]), fmt_value(key, sp[1])) if sp else ""), None, "neutral"
    ratio = ("×%.2f" % (v / b) if v / b >= 0.1 else "×%.2g" % (v / b)) if b > 0 else ""
    if key in TIMINGS:
        if not (r.has_spread(key) or r.ref.has_spread(key)):
            return main, ratio, None, "neutral"  # no spread: no claim either way
        if within_spread(r, key):
            return main, "≈ " + ratio, None, "spread"
    return main, ratio, ratio_score(v, b, METRIC[key][3]), "colour"


def plot_heatmap(runs, metas, args):
    rows = [r for f in sorted({r.file_index for r in runs})  # file by file: each has its own baseline
            for r in ordered([r for r in runs if r.file_index == f])]
    delta = any(r.ref is not None for r in runs if not r.is_baseline)
    timing_keys = [k for k in TIMINGS if any(r.value(k) is not None for r in runs)]
    cols = ["cache_tokens", "ppl", "accuracy"] + timing_keys + ["cache_bytes", "peak_memory_bytes"]
    headers = []
    for k in cols:
        if k == "cache_tokens":
            headers.append("cache tokens\nkept")
        elif k in ("ppl", "accuracy"):
            headers.append(("ΔPPL\nvs full cache" if k == "ppl" else "Δaccuracy\nvs full cache") if delta
                           else ("PPL" if k == "ppl" else "accuracy"))
        elif k in TIMINGS:
            schemas = sorted({2 if r.schema >= 2 else 1 for r in runs if r.value(k) is not None})
            headers.append("%s, %s\n(%s)" % (METRIC[k][0], METRIC[k][1],
                                             " / ".join(TIMING_SHORT[s][k] for s in schemas)))
        else:
            headers.append("%s\n(%s)" % (METRIC[k][0], METRIC[k][1]))
    nrow, ncol = len(rows), len(cols)
    cmap = LinearSegmentedColormap.from_list("rwg", ["#d73027", "#fc8d59", "#fee08b", "#ffffff",
                                                     "#d9ef8b", "#91cf60", "#1a9850"])
    image = np.ones((nrow, ncol, 3))
    cells = [[heat_cell(r, k, delta) for k in cols] for r in rows]
    for i in range(nrow):
        for j in range(ncol):
            _, _, score, state = cells[i][j]
            if state == "colour":
                image[i, j] = cmap(0.5 + 0.5 * score)[:3]
            elif state == "na":
                image[i, j] = to_rgb("#e6e6e6")
    width = max(10.0, 1.2 * ncol + 3.4)
    fig, ax = plt.subplots(figsize=(width, 2.3 + 0.44 * nrow))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    for i in range(nrow):
        for j in range(ncol):
            main, small, score, state = cells[i][j]
            strong = score is not None and abs(score) > 0.8
            c = "white" if strong else "dimgray" if state == "na" else "black"
            bold = "bold" if rows[i].is_baseline else "normal"
            if small:
                ax.text(j, i - 0.14, main, ha="center", va="center", fontsize=8.5, color=c, fontweight=bold)
                ax.text(j, i + 0.24, small, ha="center", va="center", fontsize=6.8, color=c)
            else:
                ax.text(j, i, main, ha="center", va="center", fontsize=8.5, color=c, fontweight=bold)
    ax.set_xticks(range(ncol))
    ax.set_xticklabels(headers, fontsize=8.5)
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
    for j in range(ncol):  # white cells need an outline to read as cells
        for i in range(nrow):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="0.85", lw=0.6, zorder=0.5))
    for s in ax.spines.values():
        s.set_visible(False)
    for i in range(1, nrow):  # a line between budget groups, a heavier one between files
        if rows[i].file_index != rows[i - 1].file_index:
            ax.axhline(i - 0.5, color="black", linewidth=3.0)
        elif rows[i].budget != rows[i - 1].budget:
            ax.axhline(i - 0.5, color="dimgray", linewidth=1.4)
    if any(c[3] == "colour" for row in cells for c in row):
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(-1, 1), cmap=cmap), ax=ax, fraction=0.03, pad=0.015,
                            shrink=1.0 if nrow <= 12 else 0.5)
        cbar.set_ticks([-1, 0, 1])
        cbar.set_ticklabels(["worse", "= baseline", "better"])
        cbar.ax.tick_params(labelsize=8)
    if delta:
        note = ("colour: better/worse than the full cache of the same file, saturating at %g %% PPL, "
                "%g pp accuracy, %g× time or memory" % (SATURATE["ppl"], SATURATE["accuracy"], SATURATE["ratio"]))
    else:
        note = ("no file holds both a baseline (full cache) and compressed runs: quality shown as "
                "absolute values; nothing is coloured")
    lines = [note]
    if delta and any(r.ref is None and not r.is_baseline for r in runs):
        lines.append("rows of files without a baseline: absolute PPL and accuracy, not coloured")
    if any(c[3] == "spread" for row in cells for c in row) or any(
            r.has_spread(k) for r in runs for k in timing_keys):
        lines.append("timings: small text ×ratio to the baseline; white with ≈: the run's min–max "
                     "overlaps the baseline's (no measurable difference)")
    if timing_keys and any(r.value(k) is not None and not r.is_baseline and r.ref is not None
                           and not (r.has_spread(k) or r.ref.has_spread(k)) for r in runs for k in timing_keys):
        lines.append("timings without a measured spread (single run) are not coloured: small text ×ratio to the baseline")
    ctx = timing_context(runs)
    ax.set_title("Summary of all runs\n%s\n%s%s" % (describe(metas, args.title), ctx + "\n" if ctx else "",
                                                    "\n".join(lines)), fontsize=9.5, pad=12)
    save(fig, args.out_dir, "summary_heatmap.png", args.dpi)


# --------------------------------------------------------------------------------------------
# 5. streaming.png


def run_setting(run):
    """How a run was fed, for a legend: 'positions cache, skip []'."""
    m = run.meta
    skip = m.get("skip_layers")
    spec = run.entry.get("spec") or ""
    found = re.search(r"skip_layers=(\[[^\]]*\])", spec)
    if found:
        skip = found.group(1)
    elif isinstance(skip, list):
        skip = "[%s]" % ",".join(str(s) for s in skip)
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
        wins = [w for w in r.entry["windows"] if isinstance(w, dict) and w.get("sample", 0) == 0
                and num(w.get("ppl")) is not None and num(w.get("end")) is not None]
        if not wins:
            continue
        x = [w["end"] for w in wins]
        # One colour per run here: the same method under different position rules is the point.
        reference = r.entry.get("reference")
        color = BASELINE_COLOR if r.is_baseline else "0.55" if reference else PALETTE[n % len(PALETTE)]
        name = "full cache" if r.is_baseline else r.orig_label
        setting = reference + ", no cache" if reference else run_setting(r)
        style = ":" if reference else styles[n % len(styles)] if not r.is_baseline else "-"
        lw = 3.0 if reference else 1.4
        ax.plot(x, [w["ppl"] for w in wins], style, color=color, lw=lw,
                label="%s (%s) — %s" % (name, setting, os.path.basename(r.meta["path"])))
        cache = [(w["end"], w.get("cache_tokens")) for w in wins if num(w.get("cache_tokens"))]
        ax_cache.plot([c[0] for c in cache], [c[1] for c in cache], style, color=color, lw=lw)
        if r.meta.get("model_context"):
            contexts.add(r.meta["model_context"])
    for c in sorted(contexts):
        for a in (ax, ax_cache):
            a.axvline(c, color="grey", lw=1, ls="--")
        ax.text(c, 0.98, " model context (%d)" % c, transform=ax.get_xaxis_transform(), va="top",
                ha="left", fontsize=8, color="grey")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis, *ax.get_ylim())
    ax.set_ylabel("PPL per window (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Perplexity while reading past the model's context (lower is better)\n"
                 + describe(metas, args.title), fontsize=10)
    ax_cache.set_yscale("log")
    plain_log_ticks(ax_cache.yaxis, *ax_cache.get_ylim())
    ax_cache.set_ylabel("cache tokens\n(first compressed\nlayer)")
    ax_cache.set_xlabel("tokens read")
    ax_cache.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    legend = ax_cache.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.42),
                             ncol=1, frameon=False)
    save(fig, args.out_dir, "streaming.png", args.dpi, extra=[legend])


# --------------------------------------------------------------------------------------------
# 6. throughput.png


def plot_throughput(runs, metas, args):
    """kvbench --throughput: decode tokens/s and peak memory against the batch, one column per
    context, one line per run; each run's largest batch that fits starred, the memory limit
    drawn. One figure per file that has the section (throughput.png, then throughput_N.png)."""
    drawn = 0
    for meta in metas:
        t = meta.get("throughput")
        if not isinstance(t, dict) or not t.get("points"):
            continue
        contexts = [c for c in t.get("contexts", []) if isinstance(c, int)]
        labels = [r.orig_label for r in runs if r.file_index == meta["index"] and not r.is_reference]
        largest = {(e["label"], e["context"]): e["batch"] for e in t.get("largest_batch", [])}
        limit = num(t.get("memory_limit_bytes"))
        fig, axes = plt.subplots(2, len(contexts), figsize=(5.2 * len(contexts) + 1.5, 7.5), squeeze=False,
                                 sharex="col")
        for col, context in enumerate(contexts):
            ax_tok, ax_mem = axes[0][col], axes[1][col]
            for n, label in enumerate(labels):
                pts = sorted((p for p in t["points"] if p["label"] == label and p["context"] == context),
                             key=lambda p: p["batch"])
                fit = [p for p in pts if p["fits"] and num(p.get("throughput_tok_s")) is not None]
                if not fit:
                    continue
                color = BASELINE_COLOR if label.startswith("baseline") else PALETTE[n % len(PALETTE)]
                name = "full cache" if label.startswith("baseline") else label
                xs = [p["batch"] for p in fit]
                ax_tok.plot(xs, [p["throughput_tok_s"] for p in fit], "o-", color=color, ms=3.5, lw=1.4, label=name)
                lo = [p["throughput_tok_s"] - p["throughput_tok_s_min"] for p in fit]
                hi = [p["throughput_tok_s_max"] - p["throughput_tok_s"] for p in fit]
                ax_tok.errorbar(xs, [p["throughput_tok_s"] for p in fit], yerr=[lo, hi], fmt="none", ecolor=color,
                                elinewidth=0.8, capsize=2)
                ax_mem.plot(xs, [p["peak_memory_bytes"] / 2**30 for p in fit], "o-", color=color, ms=3.5, lw=1.4)
                best = largest.get((label, context))
                top = [p for p in fit if p["batch"] == best]
                if top:
                    ax_tok.plot([best], [top[0]["throughput_tok_s"]], "*", color=color, ms=13, mec="white", mew=0.8)
                    ax_tok.annotate("%d" % best, (best, top[0]["throughput_tok_s"]), textcoords="offset points",
                                    xytext=(5, 5), fontsize=8, color=darker(color) if color != "black" else color)
            if limit:
                ax_mem.axhline(limit / 2**30, color="grey", ls="--", lw=1)
                ax_mem.text(0.01, limit / 2**30, " memory limit %.1f GiB" % (limit / 2**30), va="bottom",
                            transform=ax_mem.get_yaxis_transform(), fontsize=8, color="grey")
            for a in (ax_tok, ax_mem):
                a.set_xscale("log", base=2)
                a.grid(True, which="major", alpha=0.3)
            ax_tok.set_yscale("log")
            ax_tok.set_title("context %d tokens" % context, fontsize=10)
            ax_mem.set_xlabel("batch (sequences decoded together)")
            if col == 0:
                ax_tok.set_ylabel("decode tokens/s (batch / TPOT)")
                ax_mem.set_ylabel("peak memory (GiB)")
        handles, names = axes[0][0].get_legend_handles_labels()
        legend = fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(names) or 1),
                            fontsize=8.5, frameon=False)
        title = fig.suptitle("Decode throughput and memory against the batch (★ the largest batch that fits)\n%s, "
                     "%s new tokens per sequence" % (describe([meta], args.title), t.get("new_tokens")), fontsize=10)
        drawn += 1
        save(fig, args.out_dir, "throughput.png" if drawn == 1 else "throughput_%d.png" % drawn, args.dpi,
             extra=[legend, title])


def main():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the docstring at the top of this file for the figures and rules.")
    p.add_argument("files", nargs="+", metavar="RESULTS.json", help="kvbench --json output (schema 1 or 2)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="folder for the PNGs (required; created if missing)")
    p.add_argument("--title", default="", help="extra text for every figure title")
    p.add_argument("--dpi", type=int, default=120, help="PNG resolution (default 120)")
    args = p.parse_args()
    if args.dpi < 10 or args.dpi > 1200:
        fail("--dpi must be between 10 and 1200")
    runs, metas = load(args.files)
    check_out_dir(args.out_dir)
    colors = method_colors(runs)
    plot_quality_vs_cache(runs, metas, args, colors)
    for budget in budgets_of(runs):
        plot_comparison(runs, budget, metas, args, colors)
    plot_tradeoff(runs, metas, args, colors)
    plot_heatmap(runs, metas, args)
    plot_streaming(runs, metas, args, colors)
    plot_throughput(runs, metas, args)


if __name__ == "__main__":
    main()
