#!/usr/bin/python3
"""examples/python/compare_decode.py on hand-made files: the ratios it writes (TPOT over the
weight-streaming limit, speed-ups over every peer) from the numbers in the files, targets met
and missed (exit 1), and bad input refused (exit 2) with a message naming it."""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "examples", "python", "compare_decode.py")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL: " + what)


def kvbench(tpot, label="streaming_llm", prompt=2000, device="cuda:0"):
    return {"schema": 2, "device": device, "dtype": "float16", "prompt_tokens": prompt, "generate": 128, "batch": 1,
            "cuda_graph": True, "native_step": False,
            "results": [{"label": "baseline", "spec": None, "ttft_s": 0.05, "tpot_s": tpot * 1.1,
                         "tpot_s_min": tpot, "tpot_s_max": tpot * 1.2},
                        {"label": label, "spec": "streaming_llm(start_size=4, recent_size=508)", "ttft_s": 0.05,
                         "tpot_s": tpot, "tpot_s_min": tpot * 0.99, "tpot_s_max": tpot * 1.01}]}


def peer(tpot, limit, runtime="static-compile"):
    return {"runtime": runtime, "attention": "sdpa", "device": "NVIDIA H200", "dtype": "float16", "batch": 1,
            "prompt_tokens": 2000, "new_tokens": 128, "ttft_s": 0.08, "tpot_s": tpot,
            "repeats_tpot_s": [tpot, tpot * 1.05], "weight_streaming_limit_s": limit,
            "copy_bandwidth_bytes_s": 4.25e12}


def run(files, *args):
    d = tempfile.mkdtemp()
    paths = {}
    for name, doc in files.items():
        paths[name] = os.path.join(d, name + ".json")
        with open(paths[name], "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
    argv = [a.format(**paths, out=os.path.join(d, "out.json")) for a in args]
    p = subprocess.run([sys.executable, SCRIPT] + argv, capture_output=True, text=True)
    out = os.path.join(d, "out.json")
    return p, (json.load(open(out)) if os.path.exists(out) else None)


files = {"ts": kvbench(0.0026), "native": kvbench(0.0018), "eager": peer(0.023, 0.0013, "eager"),
         "static": peer(0.0043, 0.00131)}
p, doc = run(files, "--kvbench", "ts={ts}", "--kvbench", "native={native}", "--peer", "eager={eager}",
             "--peer", "static={static}", "--json", "{out}")
check(p.returncode == 0, "a plain comparison exits 0: %s" % p.stderr)
by = {r["name"]: r for r in doc["runs"]}
check(abs(doc["weight_streaming_limit_s"] - 0.0013) < 1e-12, "the tightest limit of the peers' files")
check(abs(by["native"]["tpot_over_limit"] - 0.0018 / 0.0013) < 1e-12, "TPOT / limit")
check(abs(by["native"]["speedup_over"]["static"] - 0.0043 / 0.0018) < 1e-12, "speed-up over a peer")
check(abs(by["eager"]["speedup_over"]["static"] - 0.0043 / 0.023) < 1e-12, "peers compared with each other too")
check(by["ts"]["label"] == "streaming_llm", "the first compressed result by default")
check("| native | kvbench streaming_llm |" in p.stdout, "a table row per run: " + p.stdout)

p, doc = run(files, "--kvbench", "ts={ts}", "--kvbench", "native={native}", "--peer", "static={static}",
             "--target-limit", "1.5", "--target-speedup", "static=2", "--json", "{out}")
check(p.returncode == 1, "targets missed exit 1")
check(len(doc["targets_missed"]) == 2 and all(m.startswith("ts:") for m in doc["targets_missed"]),
      "only the TorchScript run misses both targets: %s" % doc["targets_missed"])
p, _ = run(files, "--kvbench", "native={native}", "--peer", "static={static}", "--target-limit", "1.5",
           "--target-speedup", "static=2")
check(p.returncode == 0 and "target missed" not in p.stdout, "targets met exit 0")
p, doc = run(files, "--kvbench", "ts={ts}", "--label", "baseline", "--peer", "static={static}", "--json", "{out}")
check(p.returncode == 0 and doc["runs"][0]["label"] == "baseline", "--label picks the result")

bad = [
    ({"ts": kvbench(0.002, prompt=512), "static": peer(0.004, 0.0013)}, ["--kvbench", "ts={ts}", "--peer", "static={static}"],
     "measured different workloads: prompt_tokens"),
    ({"ts": kvbench(0.002, device="cpu"), "static": peer(0.004, 0.0013)}, ["--kvbench", "ts={ts}", "--peer", "static={static}"],
     "mix CPU and GPU"),
    ({"ts": kvbench(0.002), "static": peer(0.004, 0.0013)}, ["--kvbench", "ts={ts}", "--peer", "static={static}",
                                                              "--label", "h2o"], "no result 'h2o'"),
    ({"ts": "{not json", "static": peer(0.004, 0.0013)}, ["--kvbench", "ts={ts}", "--peer", "static={static}"],
     "not valid JSON"),
    ({"ts": kvbench(0.002), "static": {"x": 1}}, ["--kvbench", "ts={ts}", "--peer", "static={static}"],
     "not an hf_reference.py --json file"),
    ({"ts": kvbench(0.002)}, ["--kvbench", "ts={ts}"], "give at least one --kvbench and one --peer"),
    ({"ts": kvbench(0.002), "static": peer(0.004, 0.0013)}, ["--kvbench", "ts={ts}", "--peer", "static={static}",
                                                              "--target-speedup", "nobody=2"], "expected PEER=X"),
    ({"ts": kvbench(0.002), "static": peer(0.004, 0.0013)}, ["--kvbench", "ts", "--peer", "static={static}"],
     "expected NAME=FILE"),
]
for files_, args, message in bad:
    p, _ = run(files_, *args)
    check(p.returncode == 2 and message in p.stderr, "refused (%s): rc %d, %r" % (message, p.returncode, p.stderr))

print("compare_decode: %d checks failed" % len(failures) if failures else "compare_decode: all checks passed")
sys.exit(1 if failures else 0)
