#!/usr/bin/env python3
"""Export the trained small model (train_small_model.py output) to a contract TorchScript file.

Reads <run-dir>/config.json and the weight shards it lists (or a single weights.npz), builds
the model with portable attention (LibTorch 1.13 / CPU safe), embeds the SentencePiece
tokenizer, and saves it in float16 (default) to data/pg19-neox-tiny.pt. Then it reloads the
saved file and checks, in float32 on CPU:
  - token-by-token decode through the cache == one full prefill (max abs diff < 1e-4)
  - the saved model vs the float32 training weights (half-precision rounding only)
and prints the perplexity of the first --ppl-tokens tokens of each data/eval_tokens/*.ids file.

Run it with the PyTorch that the C++ driver links against (1.13 here): a file saved by a newer
PyTorch may not load in an older LibTorch.

Note: LibTorch 1.13 has no float16 LayerNorm on CPU, so a CPU driver must move this model to
float32 (module.to(torch::kFloat32)) after loading; on CUDA it runs in float16 as saved.

Example:
  python3 examples/python/export_small_model.py --run-dir small   # files brought back from the GPU
"""

import argparse
import glob
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import DEFAULT_SPM, REPO_ROOT, fail, load_spm  # noqa: E402

DTYPES = ("float16", "float32", "bfloat16")


def load_weights(run_dir, conf, np, script):
    files = conf.get("weight_files") or ["weights.npz"]
    out = {}
    for name in files:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            fail(script, "weight file %s listed in config.json is missing" % path)
        with np.load(path) as z:
            for k in z.files:
                if k in out:
                    fail(script, "tensor %s appears in more than one weight file" % k)
                out[k] = z[k]
    return out


def read_ids_file(path):
    import tokenize_text
    ids, _ = tokenize_text.read_ids(path)
    return ids


def perplexity(module, ids, torch, km):
    """PPL and next-token accuracy of one prefill over ids (float32 logits)."""
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        logits, _, _ = module(x, pos, *km.empty_cache(module, 1))
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    target = x[0, 1:]
    nll = -logp.gather(1, target.unsqueeze(1)).mean().item()
    acc = (logits[0, :-1].argmax(-1) == target).float().mean().item()
    import math
    return math.exp(nll), acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="train_small_model.py --out-dir (config.json + weights)")
    ap.add_argument("--spm", default=DEFAULT_SPM, help="SentencePiece model to embed (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "data", "pg19-neox-tiny.pt"),
                    help="output TorchScript file (default: %(default)s)")
    ap.add_argument("--dtype", default="float16", choices=DTYPES, help="saved dtype (default: %(default)s)")
    ap.add_argument("--max-mib", type=float, default=16.0, help="fail if the file is larger (default: %(default)s MiB)")
    ap.add_argument("--check-tokens", type=int, default=64, help="tokens for the decode check (default: %(default)s)")
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="tokens per eval file for the PPL report")
    ap.add_argument("--eval-tokens-dir", default=os.path.join(REPO_ROOT, "data", "eval_tokens"))
    args = ap.parse_args(argv)
    if args.check_tokens < 2:
        fail(__file__, "--check-tokens must be >= 2")
    conf_path = os.path.join(args.run_dir, "config.json")
    if not os.path.isfile(conf_path):
        fail(__file__, "no config.json in %s (expected train_small_model.py output)" % args.run_dir)
    try:
        import numpy as np
        import torch
    except ImportError as e:
        fail(__file__, "missing Python package: %s" % e)
    import kvc_model as km

    with open(conf_path) as f:
        conf = json.load(f)
    fields = {k: conf[k] for k in km.KVCConfig.__dataclass_fields__ if k in conf}
    try:
        cfg = km.KVCConfig(**fields)
    except (TypeError, ValueError) as e:
        fail(__file__, "bad model config in %s: %s" % (conf_path, e))
    sp = load_spm(args.spm, __file__)
    if sp.GetPieceSize() != cfg.vocab_size:
        fail(__file__, "tokenizer vocab %d != model vocab %d" % (sp.GetPieceSize(), cfg.vocab_size))
    with open(args.spm, "rb") as f:
        spm_bytes = f.read()

    arrays = load_weights(args.run_dir, conf, np, __file__)
    ref = km.KVCModel(cfg, attention="portable").eval()
    expected = ref.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        fail(__file__, "weights do not match the config: missing %s; unexpected %s" % (missing[:10], unexpected[:10]))
    try:
        ref.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})
    except RuntimeError as e:
        fail(__file__, "cannot load weights: %s" % str(e).splitlines()[0])

    biggest = max(float(np.abs(v).max()) for v in arrays.values())
    if args.dtype == "float16" and biggest > 6e4:
        fail(__file__, "a weight of magnitude %.3g overflows float16; use --dtype bfloat16" % biggest)

    # Tokens for the checks: real text when available, so the logits have a realistic scale.
    eval_files = sorted(glob.glob(os.path.join(args.eval_tokens_dir, "*.ids")))
    if eval_files:
        check_ids = read_ids_file(eval_files[0])[:args.check_tokens]
    else:
        check_ids = torch.randint(0, cfg.vocab_size, (args.check_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    n = len(check_ids)
    ids = torch.tensor([check_ids])
    pos = torch.arange(n).unsqueeze(0)
    with torch.no_grad():
        ref_logits, _, _ = ref(ids, pos, *km.empty_cache(ref, 1))

    dtype = getattr(torch, args.dtype)
    train_log_path = os.path.join(args.run_dir, "train_log.json")
    train_log = json.load(open(train_log_path)) if os.path.isfile(train_log_path) else {}
    extra = {
        "source": "trained from scratch by examples/python/train_small_model.py on the split=train books of "
                  "shared/corpus (PG-19-style public-domain texts)",
        "tokenizer_name": os.path.basename(args.spm).replace(".spm.model", "").replace(".model", ""),
        "tokenizer_sha256": hashlib.sha256(spm_bytes).hexdigest(),
        "training": {k: train_log.get(k) for k in ("steps", "tokens_seen", "train_seconds", "gpu", "torch",
                                                   "final_eval_ppl", "final_eval_accuracy") if k in train_log},
    }
    model = ref.to(dtype)  # ref is not needed in float32 any more: its logits are kept
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    km.save_contract_model(model, args.out, extra, tokenizer_bytes=spm_bytes)
    size = os.path.getsize(args.out)
    print("saved %s: %d bytes (%.2f MiB), %s, %d parameters"
          % (args.out, size, size / 2 ** 20, args.dtype, sum(p.numel() for p in model.parameters())))

    # ---- checks on the file as saved
    loaded, cfg_json, tok = km.load_contract_model(args.out)
    if tok != spm_bytes:
        fail(__file__, "embedded tokenizer does not round-trip")
    for name in km.CONTRACT_ATTRS:
        if cfg_json.get(name) != getattr(loaded, name):
            fail(__file__, "config.json %s=%r but module attribute is %r" % (name, cfg_json.get(name), getattr(loaded, name)))
    loaded.to(torch.float32)
    with torch.no_grad():
        full, _, _ = loaded(ids, pos, *km.empty_cache(loaded, 1))
        pk, pv = km.empty_cache(loaded, 1)
        steps = []
        for t in range(n):
            logit, pk, pv = loaded(ids[:, t:t + 1], pos[:, t:t + 1], pk, pv)
            steps.append(logit)
    decode_diff = (torch.cat(steps, 1) - full).abs().max().item()
    round_diff = (full - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    print("check (float32 CPU, %d tokens): decode vs prefill max abs diff %.2e (bound 1e-4); "
          "saved %s vs float32 weights %.2e (logit scale %.1f)" % (n, decode_diff, args.dtype, round_diff, scale))
    if decode_diff > 1e-4:
        fail(__file__, "incremental decode disagrees with the full forward (%.3g)" % decode_diff)
    if round_diff > 0.05 * max(1.0, scale):
        fail(__file__, "saved model differs from the trained weights by %.3g" % round_diff)
    for path in eval_files:
        ppl, acc = perplexity(loaded, read_ids_file(path)[:args.ppl_tokens], torch, km)
        print("  %s: first %d tokens: ppl %.2f, accuracy %.4f"
              % (os.path.basename(path), min(args.ppl_tokens, len(read_ids_file(path))), ppl, acc))
    if size > args.max_mib * 2 ** 20:
        fail(__file__, "%s is %.2f MiB, over --max-mib %.1f" % (args.out, size / 2 ** 20, args.max_mib))


if __name__ == "__main__":
    main()
