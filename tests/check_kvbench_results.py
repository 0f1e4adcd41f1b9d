#!/usr/bin/python3
"""Checks a kvbench run's --json and --csv output: every documented field present with a value
of the right type and range, the CSV equal to the JSON, and what the run was asked for.

Usage: check_kvbench_results.py --json F [--csv F] [--compare-all] [--labels L1,L2,...]
                                [--cache LABEL=N ...] [--expect KEY=VALUE ...] [--no-eval]
                                [--spec LABEL=SPEC ...] [--gen KEY=VALUE ...] [--gen-cache LABEL=N ...]
                                [--evaluation MODE] [--same-quality-as F] [--throughput [--largest-batch]]

--compare-all  the results are README's main command: the baseline, then the course project's
               compare-all table at 512 and 1024 (labels and canonical specs written out below
               from ../shared/SEED_ALGORITHMS.md, independently of kvbench's code), each row's
               cache at the size its rule keeps for a text longer than the budget.
--cache L=N    result L ends with N cache tokens; --expect K=V: top-level field K equals V.
--evaluation   how the runs were evaluated: one_pass, separate or none.
--same-quality-as F  every result's PPL within 1e-4 relative of F's result of the same label,
               its accuracy within one token per 2,000 scored (at least one token), its cache
               the same: the one-pass evaluation against the separate passes (issue #13).
"""
import argparse
import csv
import json
import math
import sys

# The course project's compare-all set (SEED_ALGORITHMS.md), with skip_layers=[0,1] as its
# benchmark passed to every method, in kvcompress's canonical spec form; and the tokens each
# keeps in its first compressed layer (layer 2) once the text is longer than the budget:
# pyramid_kv int(base * 0.9**2); adaptive_l2 settles at soft_limit (every step's seq is
# soft_limit + 1, whose n = max(int(seq * ~0.9), soft_limit) = soft_limit).
COMPARE_ALL = {
    512: [
        ("streaming_llm_512", "streaming_llm(start_size=4, recent_size=508, skip_layers=[0,1])", 512),
        ("h2o_l2_512", "h2o_l2(start_size=4, heavy_hitter_size=64, recent_size=444, skip_layers=[0,1])", 512),
        ("recent_only_512", "recent_only(window_size=512, skip_layers=[0,1])", 512),
        ("snapkv_lite_512", "snapkv_lite(observation_window=32, keep_size=512, pooling_kernel=5, skip_layers=[0,1])", 512),
        ("pyramid_kv_512", "pyramid_kv(base_size=512, layer_decay=0.9, min_size=64, profile=exponential, skip_layers=[0,1])", 414),
        ("adaptive_l2_512", "adaptive_l2(target_size=512, soft_limit=256, hard_limit=1024, keep_ratio_min=0.3, "
                            "keep_ratio_max=0.9, skip_layers=[0,1])", 256),
        ("fix_size_l2_512", "fix_size_l2(fix_kv_size=512, keep_ratio=0.5, strategy=keep_low, skip_layers=[0,1])", 512),
    ],
    1024: [
        ("streaming_llm_1024", "streaming_llm(start_size=4, recent_size=1020, skip_layers=[0,1])", 1024),
        ("h2o_l2_1024", "h2o_l2(start_size=4, heavy_hitter_size=128, recent_size=892, skip_layers=[0,1])", 1024),
        ("recent_only_1024", "recent_only(window_size=1024, skip_layers=[0,1])", 1024),
        ("snapkv_lite_1024", "snapkv_lite(observation_window=64, keep_size=1024, pooling_kernel=5, skip_layers=[0,1])", 1024),
        ("pyramid_kv_1024", "pyramid_kv(base_size=1024, layer_decay=0.9, min_size=128, profile=exponential, "
                            "skip_layers=[0,1])", 829),
        ("adaptive_l2_1024", "adaptive_l2(target_size=1024, soft_limit=512, hard_limit=2048, keep_ratio_min=0.3, "
                             "keep_ratio_max=0.9, skip_layers=[0,1])", 512),
        ("fix_size_l2_1024", "fix_size_l2(fix_kv_size=1024, keep_ratio=0.5, strategy=keep_low, skip_layers=[0,1])", 1024),
    ],
}

TOP = {  # field: check
    "model": lambda v: isinstance(v, str) and v,
    "model_file": lambda v: isinstance(v, str) and v.endswith(".pt"),
    "contract_version": lambda v: isinstance(v, int) and 1 <= v <= 5,
    "model_context": lambda v: isinstance(v, int) and v > 0,
    "device": lambda v: v in ("cpu",) or (isinstance(v, str) and v.startswith("cuda")),
    "dtype": lambda v: v in ("float32", "float16", "bfloat16"),
    "tokens": lambda v: isinstance(v, int) and v >= 2,
    "samples": lambda v: isinstance(v, int) and v >= 1,
    "max_tokens": lambda v: isinstance(v, int) and v >= 0,
    "window": lambda v: isinstance(v, int) and v >= 0,
    "positions": lambda v: v in ("original", "cache"),
    "runtime": lambda v: v in ("static", "dynamic"),
    "schedule": lambda v: v in ("every", "chunked"),
    "slack": lambda v: isinstance(v, int) and v >= 0,
    "prefill_chunk": lambda v: isinstance(v, int) and v >= 0,
    "compress_prefill": lambda v: isinstance(v, bool),
    "shared_prompt": lambda v: isinstance(v, bool),
    "cuda_graph": lambda v: isinstance(v, bool),
    "native_step": lambda v: isinstance(v, bool),
    "native_gemv": lambda v: v in ("", "default", "0", "1"),
    "native_pdl": lambda v: v in ("", "default", "0", "1"),
    "native_chunk": lambda v: v in ("", "default") or (isinstance(v, str) and v.isdigit() and 8 <= int(v) <= 512),
    "jit_optimize": lambda v: isinstance(v, bool),
    "skip_layers": lambda v: isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v),
    "inputs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "results": lambda v: isinstance(v, list) and v,
    "schema": lambda v: v == 2,
    "kvbench_version": lambda v: isinstance(v, str) and v,
    "generate": lambda v: isinstance(v, int) and v >= 0,
    "prompt_tokens": lambda v: isinstance(v, int) and v >= 1,
    "batch": lambda v: isinstance(v, int) and v >= 1,
    "repeats": lambda v: isinstance(v, int) and v >= 1,
    "process_per_repeat": lambda v: isinstance(v, bool),
    # Which clock gave each timing; what each timing means.
    "clock": lambda v: isinstance(v, dict) and set(v) == set(TIMINGS) | {"compress_s"}
                       and all(c in ("host", "device") for c in v.values()),
    "timing": lambda v: isinstance(v, dict) and set(TIMINGS) <= set(v) and all(isinstance(x, str) for x in v.values()),
    "evaluation": lambda v: isinstance(v, dict) and v.get("mode") in ("one_pass", "separate", "none"),
}


def check_evaluation(ev, doc):
    """The one pass's own figures: its rows, workers, calls, time and peak memory."""
    if ev["mode"] != "one_pass":
        if set(ev) != {"mode"}:
            fail("evaluation %r: figures of a one pass that did not run" % ev)
        return
    evaluating = sum(1 for r in doc["results"] if r.get("reference") is None)
    need = {"rows": lambda v: v == evaluating, "workers": lambda v: isinstance(v, int) and v >= 1,
            "calls_per_step": lambda v: isinstance(v, int) and 1 <= v <= evaluating, "runtime": lambda v: v == "static",
            "seconds": positive, "step_s": positive, "step_s_min": positive, "step_s_max": positive,
            "peak_memory_bytes": lambda v: isinstance(v, int) and (v == -1 or v > 0)}
    for key, ok in need.items():
        if key not in ev or not ok(ev[key]):
            fail("evaluation.%s = %r is missing, or out of type or range" % (key, ev.get(key)))
    if not ev["step_s_min"] <= ev["step_s"] <= ev["step_s_max"]:
        fail("evaluation.step_s %r outside its min %r / max %r" % (ev["step_s"], ev["step_s_min"], ev["step_s_max"]))


def check_same_quality(doc, path):
    other = {r["label"]: r for r in json.load(open(path))["results"]}
    for r in doc["results"]:
        o = other.get(r["label"])
        if o is None:
            fail("%s has no result %r" % (path, r["label"]))
        if r["ppl"] is None or o["ppl"] is None:
            continue
        if abs(r["ppl"] - o["ppl"]) > 1e-4 * o["ppl"]:
            fail("%s: PPL %r, %s has %r (beyond 1e-4 relative)" % (r["label"], r["ppl"], path, o["ppl"]))
        scored = r["scored_tokens"]
        tokens_off = abs(r["accuracy"] - o["accuracy"]) * scored
        if tokens_off > max(1, scored // 2000) + 1e-6:
            fail("%s: accuracy %r, %s has %r (%.0f tokens apart of %d)" % (r["label"], r["accuracy"], path,
                                                                           o["accuracy"], tokens_off, scored))
        if r["cache_tokens"] != o["cache_tokens"]:
            fail("%s: %d cache tokens, %s has %d" % (r["label"], r["cache_tokens"], path, o["cache_tokens"]))

# Every result's timings: "<key>" the median over repeats, "<key>_min" and "<key>_max" beside it.
TIMINGS = ("eval_step_s", "ttft_s", "tpot_s", "throughput_tok_s")


def positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def nonneg_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def fail(msg):
    sys.exit("check_kvbench_results: " + msg)


def check_result(r, doc, evaluated):
    where = "result %r" % r.get("label")
    tokens, samples = doc["tokens"], doc["samples"]
    need = {
        "label": lambda v: isinstance(v, str) and v,
        "spec": lambda v: v is None or (isinstance(v, str) and v.endswith(")")),
        "cache_tokens": nonneg_int, "cache_bytes": nonneg_int, "max_layer_tokens": nonneg_int,
        "peak_memory_bytes": lambda v: isinstance(v, int) and (v == -1 or v > 0),
        "held_before_bytes": nonneg_int,
        "scored_tokens": nonneg_int,
        "warnings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    }
    recompute = r.get("reference") is not None
    if evaluated:
        need.update({"ppl": lambda v: positive(v) and v >= 1.0,
                     "accuracy": lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0})
    else:
        need.update({k: (lambda v: v is None) for k in ("ppl", "accuracy")})
    # Timings: measured ones positive with min <= median <= max, the others null throughout.
    generated = not recompute and "throughput" not in doc  # --throughput times its points instead
    measured = {"eval_step_s": evaluated and not recompute and doc["evaluation"]["mode"] == "separate",
                "ttft_s": doc["generate"] > 0 and generated,
                "tpot_s": doc["generate"] > 1 and generated,
                "throughput_tok_s": doc["generate"] > 1 and generated}
    for key in TIMINGS:
        for k in (key, key + "_min", key + "_max"):
            need[k] = positive if measured[key] else (lambda v: v is None)
    for key, ok in need.items():
        if key not in r:
            fail("%s lacks %r" % (where, key))
        if not ok(r[key]):
            fail("%s: %r = %r is out of type or range" % (where, key, r[key]))
    for key in TIMINGS:
        if measured[key] and not r[key + "_min"] <= r[key] <= r[key + "_max"]:
            fail("%s: %s median %r outside its min %r / max %r" % (where, key, r[key], r[key + "_min"], r[key + "_max"]))
    timing_keys = [k for k in list(r) + ["generation." + g for g in r.get("generation", {})]
                   if k.endswith("_s") and not k.split(".")[-1] in ("compress_share",)]
    for k in timing_keys:
        obj, name = (r["generation"], k.split(".")[1]) if k.startswith("generation.") else (r, k)
        if name + "_min" not in obj or name + "_max" not in obj:
            fail("%s: timing %s has no _min/_max beside it" % (where, k))
    if evaluated:
        if r["scored_tokens"] != tokens - samples:
            fail("%s scored %d tokens, expected %d (each sample's tokens but its first)" % (where, r["scored_tokens"], tokens - samples))
        if not r["cache_tokens"] <= r["max_layer_tokens"] <= tokens:
            fail("%s: cache_tokens %d, max_layer_tokens %d, tokens %d" % (where, r["cache_tokens"], r["max_layer_tokens"], tokens))
        if r["cache_tokens"] > 0 and r["cache_bytes"] <= 0:
            fail("%s: cache_bytes %d for %d tokens" % (where, r["cache_bytes"], r["cache_tokens"]))
    if "generation" in r:
        g = r["generation"]
        nonneg = lambda v: isinstance(v, (int, float)) and v >= 0  # noqa: E731
        gen = {"batch": lambda v: isinstance(v, int) and v >= 1, "prompt_tokens": lambda v: isinstance(v, int) and v >= 1,
               "new_tokens": lambda v: isinstance(v, int) and v >= 1,
               "repeats": lambda v: v == doc["repeats"],
               "compress_share": lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "cache_tokens": nonneg_int}
        for key in ("tpot_first_half_s", "tpot_second_half_s", "compress_s"):
            for k in (key, key + "_min", key + "_max"):
                gen[k] = nonneg
        for key, ok in gen.items():
            if key not in g or not ok(g[key]):
                fail("%s: generation.%s = %r is missing, or out of type or range" % (where, key, g.get(key)))
        if r["spec"] is None and g["compress_s"] != 0:
            fail("%s: the full cache spent %r s compressing" % (where, g["compress_s"]))


def check_throughput(doc, largest):
    """--throughput: every (label, context) measured from its smallest listed batch up, each
    point's figures consistent (tok/s = batch / TPOT at both ends of the spread, a peak under the
    limit where it fits, the reason where it does not); with --largest-batch, each largest batch
    measured as fitting and the next one as not."""
    t = doc.get("throughput")
    if not isinstance(t, dict):
        fail("no throughput section")
    labels = [r["label"] for r in doc["results"] if r.get("reference") is None]
    contexts, limit = t["contexts"], t["memory_limit_bytes"]
    if not contexts or not all(isinstance(c, int) and c >= 1 for c in contexts):
        fail("throughput.contexts %r" % contexts)
    if t["new_tokens"] != doc["generate"] or not isinstance(limit, int) or limit < 0:
        fail("throughput.new_tokens %r / memory_limit_bytes %r" % (t["new_tokens"], limit))
    points = {}
    for p in t["points"]:
        where = "throughput point %s context %s batch %s" % (p.get("label"), p.get("context"), p.get("batch"))
        key = (p["label"], p["context"], p["batch"])
        if key in points:
            fail("%s measured twice" % where)
        points[key] = p
        if p["label"] not in labels or p["context"] not in contexts or not (isinstance(p["batch"], int) and p["batch"] >= 1):
            fail("%s: not a run, context or batch of this command" % where)
        peak = p["peak_memory_bytes"]
        if p["fits"]:
            for k in ("ttft_s", "tpot_s", "throughput_tok_s"):
                if not (positive(p[k + "_min"]) and p[k + "_min"] <= p[k] <= p[k + "_max"]):
                    fail("%s: %s %r (%r-%r)" % (where, k, p[k], p[k + "_min"], p[k + "_max"]))
            for a, b in (("_min", "_max"), ("_max", "_min")):
                if not math.isclose(p["throughput_tok_s" + a], p["batch"] / p["tpot_s" + b], rel_tol=1e-9):
                    fail("%s: tok/s%s %r is not batch / TPOT%s" % (where, a, p["throughput_tok_s" + a], b))
            if limit > 0 and not 0 < peak <= limit:
                fail("%s fits with a peak of %r bytes, the limit %r" % (where, peak, limit))
            if not nonneg_int(p["cache_tokens"]):
                fail("%s: cache_tokens %r" % (where, p["cache_tokens"]))
        elif not (isinstance(p.get("why"), str) and p["why"]):
            fail("%s does not fit and says no why" % where)
    for label in labels:
        for c in contexts:
            if not any(k[0] == label and k[1] == c for k in points):
                fail("throughput: %s at context %d has no point" % (label, c))
    if largest:
        got = {(e["label"], e["context"]): e for e in t["largest_batch"]}
        if set(got) != {(label, c) for label in labels for c in contexts}:
            fail("throughput.largest_batch covers %s" % sorted(got))
        for (label, c), e in got.items():
            b = e["batch"]
            if b >= 1 and not points.get((label, c, b), {}).get("fits"):
                fail("%s context %d: largest batch %d not measured as fitting" % (label, c, b))
            nxt = points.get((label, c, b + 1))
            if not e["next_fails"] or nxt is None or nxt["fits"]:
                fail("%s context %d: batch %d after the largest %d not measured as not fitting" % (label, c, b + 1, b))


def check_csv(path, doc, evaluated):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    results = doc["results"]
    if len(rows) != len(results):
        fail("CSV has %d rows, JSON %d results" % (len(rows), len(results)))
    for row, r in zip(rows, results):
        if row["label"] != r["label"] or row["spec"] != (r["spec"] or ""):
            fail("CSV row %r / %r differs from JSON %r / %r" % (row["label"], row["spec"], r["label"], r["spec"]))
        for key in ("cache_tokens", "cache_bytes", "peak_memory_bytes"):
            if int(row[key]) != r[key]:
                fail("CSV %s %s = %s, JSON %r" % (r["label"], key, row[key], r[key]))
        keys = ["ppl", "accuracy", "max_layer_tokens"] + [k + x for k in TIMINGS for x in ("", "_min", "_max")]
        for key in keys:
            if r[key] is None:
                if row[key] != "":
                    fail("CSV %s %s = %r where JSON has null" % (r["label"], key, row[key]))
            elif not math.isclose(float(row[key]), r[key], rel_tol=1e-12, abs_tol=1e-15):
                fail("CSV %s %s = %s, JSON %r" % (r["label"], key, row[key], r[key]))
        share = r["generation"]["compress_share"] if "generation" in r else None
        if (row["compress_share"] == "") != (share is None) or (
                share is not None and not math.isclose(float(row["compress_share"]), share, rel_tol=1e-12)):
            fail("CSV %s compress_share = %r, JSON %r" % (r["label"], row["compress_share"], share))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--csv")
    ap.add_argument("--compare-all", action="store_true")
    ap.add_argument("--labels")
    ap.add_argument("--cache", action="append", default=[])
    ap.add_argument("--expect", action="append", default=[])
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--spec", action="append", default=[], help="LABEL=SPEC: that result's canonical spec")
    ap.add_argument("--gen", action="append", default=[], help="KEY=VALUE: every result's generation.KEY")
    ap.add_argument("--gen-cache", action="append", default=[], help="LABEL=N: generation.cache_tokens of LABEL")
    ap.add_argument("--evaluation", choices=("one_pass", "separate", "none"))
    ap.add_argument("--same-quality-as", metavar="F")
    ap.add_argument("--throughput", action="store_true", help="the run used --throughput")
    ap.add_argument("--largest-batch", action="store_true", help="... and --largest-batch")
    a = ap.parse_args()
    doc = json.load(open(a.json))
    for key, ok in TOP.items():
        if key not in doc or not ok(doc[key]):
            fail("top-level %r = %r is missing, or out of type or range" % (key, doc.get(key)))
    check_evaluation(doc["evaluation"], doc)
    if a.evaluation and doc["evaluation"]["mode"] != a.evaluation:
        fail("evaluation.mode %r, expected %s" % (doc["evaluation"]["mode"], a.evaluation))
    if len(doc["inputs"]) != doc["samples"]:
        fail("%d inputs for %d samples" % (len(doc["inputs"]), doc["samples"]))
    for e in a.expect:
        key, value = e.split("=", 1)
        if json.dumps(doc.get(key)) != value and str(doc.get(key)) != value:
            fail("top-level %s = %r, expected %s" % (key, doc.get(key), value))
    labels = [r.get("label") for r in doc["results"]]
    if len(set(labels)) != len(labels):
        fail("labels repeat: %s" % labels)
    for r in doc["results"]:
        check_result(r, doc, not a.no_eval)
    if a.labels and labels != a.labels.split(","):
        fail("labels %s, expected %s" % (labels, a.labels))
    by_label = {r["label"]: r for r in doc["results"]}
    expected_cache = dict((c.split("=")[0], int(c.split("=")[1])) for c in a.cache)
    if a.compare_all:
        table = [("baseline", None, doc["tokens"] // doc["samples"])]  # every token fed
        for budget in (512, 1024):
            table += COMPARE_ALL[budget]
        got = [(r["label"], r["spec"]) for r in doc["results"]]
        want = [(label, spec) for label, spec, _ in table]
        if got != want:
            fail("compare-all rows differ from the course project's table:\n got  %s\n want %s" % (got, want))
        if doc["skip_layers"] != [0, 1]:
            fail("compare-all skip_layers %r, expected [0, 1]" % doc["skip_layers"])
        longest = doc["tokens"] // doc["samples"]
        if longest <= 1025:
            fail("the compare-all check needs a text longer than the largest budget (got %d tokens)" % longest)
        for label, _, kept in table:
            expected_cache.setdefault(label, kept)
    for label, n in expected_cache.items():
        if label not in by_label:
            fail("no result %r" % label)
        if by_label[label]["cache_tokens"] != n:
            fail("%s ends with %d cache tokens, expected %d" % (label, by_label[label]["cache_tokens"], n))
    for e in a.spec:
        label, spec = e.split("=", 1)
        if label not in by_label or by_label[label]["spec"] != spec:
            fail("%s has spec %r, expected %r" % (label, by_label.get(label, {}).get("spec"), spec))
    for e in a.gen:
        key, value = e.split("=", 1)
        for r in doc["results"]:
            if "generation" not in r or str(r["generation"].get(key)) != value:
                fail("%s: generation.%s = %r, expected %s" % (r["label"], key, r.get("generation", {}).get(key), value))
    for e in a.gen_cache:
        label, n = e.split("=", 1)
        got = by_label.get(label, {}).get("generation", {}).get("cache_tokens")
        if got != int(n):
            fail("%s: generation.cache_tokens = %r, expected %s" % (label, got, n))
    if a.same_quality_as:
        check_same_quality(doc, a.same_quality_as)
    if a.throughput or a.largest_batch:
        check_throughput(doc, a.largest_batch)
    elif "throughput" in doc:
        fail("a throughput section in a run without --throughput")
    if a.csv:
        check_csv(a.csv, doc, not a.no_eval)
    print("kvbench results ok: %d results%s" % (len(labels), ", CSV equal" if a.csv else ""))


if __name__ == "__main__":
    main()
