#!/usr/bin/env python3
"""Where the time of one decode step goes: the contract model's `step` on fixed-capacity
buffers (what `kvbench --schedule ... --cuda-graph` runs), timed eagerly and replayed from a
CUDA graph, and its kernels listed by the PyTorch profiler.

Reports, per one-token step: the number of GPU kernels and their summed time, split into
matrix products (the weight-streaming part), attention and everything else; the graph replay
time; the weight bytes over the card's copy bandwidth (the weight-streaming limit); and the
kernels that cost the most. The gap between the graph replay and the matrix products is what
fusing the other kernels could win at most.

  python3 examples/python/profile_step.py --model p28.pt --cache 512 --capacity 576 --json prof.json

The buffers hold random keys/values; a step writes slot `--cache` of every layer and attends
to the slots before it, like a decode step at a cache of that length.
"""

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import fail  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="contract TorchScript file with a `step` method")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="model", choices=["model", "float32", "float16", "bfloat16"],
                    help="cast the weights (default: keep the file's dtype)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", type=int, default=512, help="valid slots before the new token (default: %(default)s)")
    ap.add_argument("--capacity", type=int, default=576, help="slots per layer buffer (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (default: %(default)s)")
    ap.add_argument("--profiled-steps", type=int, default=5, help="steps under the profiler (default: %(default)s)")
    ap.add_argument("--top", type=int, default=20, help="kernels listed (default: %(default)s)")
    ap.add_argument("--jit-optimize", action="store_true",
                    help="leave TorchScript's profiling executor on (kvbench's --jit-optimize)")
    ap.add_argument("--sdpa-backend", default="default", choices=["default", "cudnn", "flash", "efficient", "math"],
                    help="restrict scaled_dot_product_attention to one backend (PyTorch >= 2.3)")
    ap.add_argument("--copy-gib", type=float, default=4.0, help="buffer size of the bandwidth test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.cache < 0 or args.capacity <= args.cache:
        fail("--capacity (%d) must exceed --cache (%d): the step writes slot --cache" % (args.capacity, args.cache))
    for name in ("batch", "steps", "profiled_steps"):
        if getattr(args, name) <= 0:
            fail("--%s must be positive" % name.replace("_", "-"))
    return args


def kernel_kind(name):
    n = name.lower()
    if any(w in n for w in ("gemm", "gemv", "xmma", "cutlass", "cublas", "nvjet", "splitkreduce")):
        return "matmul"
    if any(w in n for w in ("fmha", "flash", "attention", "cudnn")):
        return "attention"
    return "other"


def main(argv=None):
    args = parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this PyTorch has no CUDA device")
    if not os.path.isfile(args.model):
        fail("no model file %s" % args.model)
    torch._C._set_graph_executor_optimize(bool(args.jit_optimize))
    import kvc_model as km
    model, cfg, _ = km.load_contract_model(args.model, args.device)
    if not hasattr(model, "step"):
        fail("%s has no `step` method: re-export it with export_pythia.py" % args.model)
    if args.dtype != "model":
        model.to(getattr(torch, args.dtype))
    params = list(model.parameters())
    dtype = params[0].dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    # The input embedding is read one row per token; every other weight once per step.
    streamed_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if not n.startswith("embed_in."))
    layers, heads, dim = int(model.num_layers), int(model.num_heads), int(model.head_dim)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, heads, args.capacity, dim)
    keys = [torch.randn(shape, generator=gen, device=dev).to(dtype) for _ in range(layers)]
    values = [torch.randn(shape, generator=gen, device=dev).to(dtype) for _ in range(layers)]
    lengths = torch.full((layers,), args.cache, dtype=torch.long, device=dev)
    ids = torch.randint(0, int(model.vocab_size), (args.batch, 1), generator=gen, device=dev)
    pos = torch.full((args.batch, 1), args.cache, dtype=torch.long, device=dev)

    def step():
        return model.step(ids, pos, keys, values, lengths)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n

    out = {"model": args.model, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
           "batch": args.batch, "cache": args.cache, "capacity": args.capacity, "jit_optimize": args.jit_optimize,
           "weight_bytes": weight_bytes, "streamed_weight_bytes": streamed_bytes, "torch": torch.__version__}
    if args.device == "cuda":
        out["card"] = torch.cuda.get_device_name()
    backend = contextlib.nullcontext()
    if args.sdpa_backend != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
        backend = sdpa_kernel(getattr(SDPBackend, names[args.sdpa_backend]))
    out["sdpa_backend"] = args.sdpa_backend
    with torch.inference_mode(), backend:
        for _ in range(5):
            step()
        out["eager_step_s"] = timed(step, args.steps)
        if args.device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            for _ in range(5):
                graph.replay()
            out["graph_step_s"] = timed(graph.replay, args.steps)
            # What a decode loop adds around each replay (kvbench's StaticDecoder): timed by
            # leaving parts out and taking differences.
            host_lengths = lengths.cpu().pin_memory()

            def replay_argmax():
                graph.replay()
                return logits[:, -1].argmax(-1, keepdim=True)

            def decode_step():
                lengths.copy_(host_lengths, non_blocking=True)
                nxt = replay_argmax()
                ids.copy_(nxt)
                pos.fill_(args.cache)

            out["graph_argmax_step_s"] = timed(replay_argmax, args.steps)
            out["decode_loop_step_s"] = timed(decode_step, args.steps)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profiled_steps):
                step()
            sync()
    n = args.profiled_steps
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        # Kernels are the events with device time and no CPU-side operator time of their own.
        if args.device == "cuda" and (t <= 0 or e.cpu_time_total > 0):
            continue
        if args.device == "cpu" and (not e.key.startswith("aten::") or e.cpu_time_total <= 0):
            continue
        if args.device == "cpu":
            t = e.self_cpu_time_total
        rows.append({"name": e.key, "per_step": e.count / n, "us_per_step": t / n, "kind": kernel_kind(e.key)})
    rows.sort(key=lambda r: -r["us_per_step"])
    kinds = {}
    for r in rows:
        k = kinds.setdefault(r["kind"], {"kernels_per_step": 0.0, "us_per_step": 0.0})
        k["kernels_per_step"] += r["per_step"]
        k["us_per_step"] += r["us_per_step"]
    out["kernels_per_step"] = sum(r["per_step"] for r in rows)
    out["kernel_us_per_step"] = sum(r["us_per_step"] for r in rows)
    out["by_kind"] = kinds
    out["top"] = rows[:args.top]
    if args.device == "cuda":
        from hf_reference import copy_bandwidth
        del keys, values
        bw = copy_bandwidth(torch, "cuda", args.copy_gib)
        out["copy_bandwidth_Bps"] = bw
        out["weight_limit_s"] = weight_bytes / bw

    print("%s on %s, %s, batch %d, cache %d of %d slots, jit optimize %s, SDPA backend %s" % (
        args.model, out.get("card", "cpu"), out["dtype"], args.batch, args.cache, args.capacity,
        "on" if args.jit_optimize else "off", args.sdpa_backend))
    print("eager step %.3f ms" % (out["eager_step_s"] * 1e3), end="")
    if "graph_step_s" in out:
        print(", CUDA graph replay %.3f ms (+ argmax %.3f ms, + lengths upload and id/position writes: "
              "decode loop %.3f ms)" % (out["graph_step_s"] * 1e3, out["graph_argmax_step_s"] * 1e3,
                                        out["decode_loop_step_s"] * 1e3), end="")
    # On the CPU the profiler sees operators, nested ones included, not kernels.
    unit = "kernels" if args.device == "cuda" else "aten ops (nested ones counted)"
    print("; %.1f %s per step, %.3f ms of their time" % (out["kernels_per_step"], unit, out["kernel_us_per_step"] / 1e3))
    for kind, k in sorted(kinds.items()):
        print("  %-9s %7.1f %s %8.3f ms" % (kind, k["kernels_per_step"], unit.split()[0], k["us_per_step"] / 1e3))
    if "weight_limit_s" in out:
        mm = kinds.get("matmul", {"us_per_step": 0.0})["us_per_step"] * 1e-6
        print("copy bandwidth %.2f TB/s: weights %.3f GB -> limit %.3f ms; matrix products stream all but the input embedding at %.2f TB/s"
              % (out["copy_bandwidth_Bps"] / 1e12, weight_bytes / 1e9, out["weight_limit_s"] * 1e3,
                 streamed_bytes / mm / 1e12 if mm > 0 else 0.0))
    print("%-80s %8s %10s" % ("kernel", "per step", "us/step"))
    for r in out["top"]:
        print("%-80s %8.1f %10.1f" % (r["name"][:80], r["per_step"], r["us_per_step"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
