#!/usr/bin/env python3
"""Hugging Face transformers reference for kvbench's decode timings, plus the card's copy
bandwidth, so every kvbench figure can also be read as a ratio.

Runs the same workload as `kvbench --no-eval --prompt-tokens P --generate N --batch B`:
prefill P random token ids, then N greedy tokens one at a time with transformers' own cache
(full cache: transformers has no compression). Reports TTFT (prefill + first token) and TPOT
(mean of the other steps, each timed with a device synchronisation, as kvbench times its own),
and measures the device-to-device copy bandwidth (bytes read + written per second); the
weight-streaming limit is weight bytes / that bandwidth.

  python3 examples/python/hf_reference.py --random-init pythia-2.8b --dtype float16 \\
      --prompt-tokens 2000 --generate 128 --batch 1 --json hf.json

`--runtime static-compile --hf-attention sdpa` measures transformers' fastest path instead:
generate(..., cache_implementation="static") compiling its decoding step with torch.compile
(mode="reduce-overhead": CUDA graphs; generate's own compile_config where transformers has it,
else the forward compiled by hand); TTFT is a one-token generate(), TPOT the extra time of the
other tokens.

Needs PyTorch 2.x with CUDA and `transformers` (a GPU machine).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_pythia import PYTHIA_SHAPES, build_hf_model  # noqa: E402
from kvc_common import fail  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face checkpoint folder or hub id")
    src.add_argument("--random-init", choices=sorted(PYTHIA_SHAPES), help="Pythia-shaped random weights")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--hf-attention", default="eager", choices=["eager", "sdpa"],
                    help="transformers attention implementation (default: %(default)s)")
    ap.add_argument("--runtime", default="eager", choices=["eager", "static-compile"],
                    help="eager: a Python loop over the model with transformers' dynamic cache; static-compile: "
                         "generate(..., cache_implementation='static') with the model's forward under "
                         "torch.compile(mode='reduce-overhead') (CUDA graphs), the fastest transformers path "
                         "(default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--generate", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed generations; TTFT/TPOT are their medians (eager decoding is bound by the "
                         "host CPU, whose speed varies between machines and moments) (default: %(default)s)")
    ap.add_argument("--copy-gib", type=float, default=4.0, help="buffer size of the bandwidth test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.prompt_tokens < 1 or args.generate < 2 or args.batch < 1 or args.repeats < 1:
        ap.error("--prompt-tokens >= 1, --generate >= 2, --batch >= 1 and --repeats >= 1 are required")
    return args


def host_cpu():
    """The host CPU's model name: eager decoding is bound by it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(torch, device, gib):
    """Bytes read + written per second of a device-to-device copy (best of 10)."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        sync(torch, device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(torch, device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n / best


def main(argv=None):
    args = parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(__file__, "--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype)
    hf, source, tf_version = build_hf_model(args, torch, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    vocab = hf.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=g).to(args.device)

    def decode(n):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            sync(torch, args.device)
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            sync(torch, args.device)
            ttft = time.perf_counter() - t0
            steps = []
            for i in range(1, n):
                t = time.perf_counter()
                out = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                sync(torch, args.device)
                steps.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else -1
        return ttft, sum(steps) / len(steps), peak

    def generate(n):
        """Seconds of generate() for n new tokens (forced: no early stop), and the peak memory."""
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            sync(torch, args.device)
            t0 = time.perf_counter()
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, cache_implementation="static", pad_token_id=0, **compile_kwargs)
            sync(torch, args.device)
            seconds = time.perf_counter() - t0
        if out.shape[1] != ids.shape[1] + n:
            fail(__file__, "generate() gave %d new tokens, asked for %d" % (out.shape[1] - ids.shape[1], n))
        return seconds, torch.cuda.max_memory_allocated() if args.device == "cuda" else -1

    def compiled(n):
        """TTFT = generate() of one token; TPOT = the extra time of n tokens over one, per token."""
        first, _ = generate(1)
        whole, peak = generate(n)
        return first, (whole - first) / (n - 1), peak

    compile_kwargs = {}
    if args.runtime == "static-compile":
        try:  # generate() compiles its decoding steps itself (transformers >= 4.48; the way 5.x supports)
            from transformers import CompileConfig
            compile_kwargs["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
        except ImportError:  # older: the forward under torch.compile, as their docs then said
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        for n in (1, args.generate, args.generate):  # compilation and graph capture of both shapes
            generate(n)
        decode = compiled
    else:
        decode(4)  # warm-up: kernels, allocator
    runs = [decode(args.generate) for _ in range(args.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    tpot = statistics.median(r[1] for r in runs)
    peak = max(r[2] for r in runs)
    bw = copy_bandwidth(torch, args.device, args.copy_gib) if args.device == "cuda" else float("nan")
    limit = weight_bytes / bw
    res = {
        "source": source, "transformers": tf_version, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype, "attention": args.hf_attention, "runtime": args.runtime, "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.generate,
        "ttft_s": ttft, "tpot_s": tpot, "tok_s": args.batch / tpot, "peak_memory_bytes": peak,
        "repeats_tpot_s": [r[1] for r in runs], "host_cpu": host_cpu(),
        "weight_bytes": weight_bytes, "copy_bandwidth_bytes_s": bw, "weight_streaming_limit_s": limit,
    }
    print("transformers %s (%s, %s attention), %s %s, batch %d, prompt %d, %d new tokens"
          % (tf_version, args.runtime, args.hf_attention, res["device"], args.dtype, args.batch, args.prompt_tokens,
             args.generate))
    print("TTFT %.2f ms  TPOT %.3f ms  (%.1f tok/s)  peak %.2f GiB  [median of %d; TPOT of each: %s ms; host %s]"
          % (ttft * 1e3, tpot * 1e3, res["tok_s"], peak / 2**30, args.repeats,
             " ".join("%.3f" % (r[1] * 1e3) for r in runs), res["host_cpu"]))
    print("weights %.3f GB, copy bandwidth %.2f TB/s (read + write) -> weight-streaming limit %.3f ms; TPOT = %.2f x limit"
          % (weight_bytes / 1e9, bw / 1e12, limit * 1e3, tpot / limit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
