#!/usr/bin/env python3
"""Export a Hugging Face GPT-NeoX / Pythia checkpoint to a kvcompress contract TorchScript file.

  --model PATH_OR_ID       a local checkpoint folder or a hub id (needs `transformers`)
  --random-init SIZE       no download: a Pythia-shaped model (layers/hidden/heads, vocab 50304,
                           rotary_pct 0.25, 2048 positions) with random weights (--seed)

The Hugging Face model is built directly in --dtype on --device (so a 2.8B model needs one
copy of its weights, plus the exported copy for the check). The contract module shares its
weights, is scripted, moved to CPU storage and saved with kvc/config.json. Then, unless
--check-tokens 0, the saved file is loaded back on --device and compared with the Hugging Face
model on random token ids: a full prefill of --check-tokens tokens, then --decode-steps
token-by-token steps through the cache. It prints

  max abs logit difference: prefill X, decode Y (bound B = TOL x logit scale S)

and exits with status 1 when either is above the bound (TOL: 1e-3 for float32, 5e-2 for
float16/bfloat16; S = max(1, largest |logit| of the reference)). The cached keys are compared
too, since the contract caches keys exactly as Hugging Face does (rotated).

The checkpoint's tokenizer.json (for --random-init the bundled Pythia one,
data/tokenizers/gpt-neox-20b/tokenizer.json; or --tokenizer FILE) is embedded as
kvc/tokenizer.json, so `kvbench --text`, `kvgen` and `kvtok` read and write text with the
export directly; --no-tokenizer leaves it out.

--fuse-layers exports the same function with fewer kernels per decode step (kvc_model.
fuse_layers: LayerNorm scales folded into the weights, QKV + MLP-up and attention-out +
MLP-down each one matrix product); the check then also measures what that rounding costs.

Examples (GPU machine, PyTorch 2.x + transformers):
  python3 examples/python/export_pythia.py --random-init pythia-160m --out /tmp/p160.pt --device cuda --dtype float16
  python3 examples/python/export_pythia.py --model EleutherAI/pythia-2.8b --out pythia-2.8b.pt --device cuda --dtype float16
Files meant for CPU / LibTorch 1.13 must use --attention portable (the default) and be saved
by a PyTorch that LibTorch can read.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import fail  # noqa: E402

# (layers, hidden, heads) of the released Pythia models; all use intermediate = 4 * hidden.
PYTHIA_SHAPES = {
    "pythia-14m": (6, 128, 4),
    "pythia-31m": (6, 256, 8),
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
    "pythia-1.4b": (24, 2048, 16),
    "pythia-2.8b": (32, 2560, 32),
    "pythia-6.9b": (32, 4096, 32),
    "pythia-12b": (36, 5120, 40),
}
PYTHIA_VOCAB = 50304
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 5e-2}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face checkpoint folder or hub id")
    src.add_argument("--random-init", choices=sorted(PYTHIA_SHAPES, key=lambda k: PYTHIA_SHAPES[k][1] * PYTHIA_SHAPES[k][0]),
                     help="random weights in this Pythia size's shape (no download)")
    ap.add_argument("--out", required=True, help="output TorchScript file")
    ap.add_argument("--dtype", default="float16", choices=sorted(TOLERANCE), help="(default: %(default)s)")
    ap.add_argument("--attention", default="portable", choices=["portable", "sdpa"],
                    help="portable: LibTorch 1.13 / CPU safe; sdpa: PyTorch >= 2.0 only (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --random-init weights and check tokens")
    ap.add_argument("--check-tokens", type=int, default=64, help="prefill length of the check (0 = no check)")
    ap.add_argument("--decode-steps", type=int, default=8, help="token-by-token steps of the check (default: %(default)s)")
    ap.add_argument("--hf-attention", choices=["eager", "sdpa"], default=None,
                    help="attention implementation of the Hugging Face reference (default: its own default)")
    ap.add_argument("--fuse-layers", action="store_true",
                    help="export kvc_model.fuse_layers(model): LayerNorms folded into the weights, four matrix "
                         "products per layer merged into two; same function up to rounding, fewer GPU kernels "
                         "per decode step (parallel-residual models only)")
    ap.add_argument("--name", help="model_name attribute (default: from --model / --random-init)")
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                     help="the tokenizer.json to embed as kvc/tokenizer.json (default: the checkpoint's own; "
                          "with --random-init the bundled Pythia tokenizer, data/tokenizers/gpt-neox-20b)")
    tok.add_argument("--no-tokenizer", action="store_true", help="embed no tokenizer (text then needs kvtok)")
    args = ap.parse_args(argv)
    if args.check_tokens < 0 or args.decode_steps < 0:
        fail(__file__, "--check-tokens and --decode-steps must be >= 0")
    if args.check_tokens == 1 and args.decode_steps == 0:
        fail(__file__, "a check needs at least 2 tokens")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        fail(__file__, "output folder does not exist: %s" % out_dir)
    return args


def import_transformers():
    try:
        import transformers
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except ImportError as e:
        fail(__file__, "this needs the Hugging Face `transformers` package (%s); it is not installed here" % e)
    return transformers, GPTNeoXConfig, GPTNeoXForCausalLM


def version_tuple(v):
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class default_dtype:
    """Context: new tensors default to dtype (and device, on PyTorch >= 2.0), so a random-init
    model is born in its final dtype/device without a float32 CPU copy."""

    def __init__(self, torch, dtype, device):
        self.torch, self.dtype, self.device = torch, dtype, device

    def __enter__(self):
        self.old = self.torch.get_default_dtype()
        self.torch.set_default_dtype(self.dtype)
        self.dev = self.torch.device(self.device) if hasattr(self.torch.device(self.device), "__enter__") else None
        if self.dev is not None:
            self.dev.__enter__()

    def __exit__(self, *exc):
        if self.dev is not None:
            self.dev.__exit__(*exc)
        self.torch.set_default_dtype(self.old)


def hf_value(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def kvc_config_from_hf(hf_cfg, name, km):
    """Our KVCConfig from a GPTNeoXConfig (transformers 4.x and 5.x spell rope settings differently)."""
    if getattr(hf_cfg, "model_type", "gpt_neox") != "gpt_neox":
        fail(__file__, "not a GPT-NeoX checkpoint (model_type=%r)" % hf_cfg.model_type)
    act = getattr(hf_cfg, "hidden_act", "gelu")
    if act != "gelu":
        fail(__file__, "hidden_act=%r is not supported (the contract model uses exact GELU)" % act)
    if getattr(hf_cfg, "attention_bias", True) is False:
        fail(__file__, "attention_bias=False checkpoints are not supported")
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        fail(__file__, "rope type %r is not supported (only plain GPT-NeoX rotary)" % rope_type)
    theta = rope.get("rope_theta")
    if theta is None:
        theta = hf_value(hf_cfg, "rope_theta", "rotary_emb_base", default=10000.0)
    pct = rope.get("partial_rotary_factor")
    if pct is None:
        pct = hf_value(hf_cfg, "partial_rotary_factor", "rotary_pct", default=0.25)
    eos = getattr(hf_cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    bos = getattr(hf_cfg, "bos_token_id", None)
    return km.KVCConfig(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
        num_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
        vocab_size=hf_cfg.vocab_size, rotary_pct=float(pct), rotary_base=float(theta),
        max_positions=int(getattr(hf_cfg, "max_position_embeddings", 2048)),
        layer_norm_eps=float(getattr(hf_cfg, "layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(getattr(hf_cfg, "use_parallel_residual", True)),
        bos_token_id=-1 if bos is None else int(bos), eos_token_id=-1 if eos is None else int(eos),
        model_name=name)


def build_hf_model(args, torch, dtype):
    transformers, GPTNeoXConfig, GPTNeoXForCausalLM = import_transformers()
    new_api = version_tuple(transformers.__version__) >= (4, 56)
    if args.random_init:
        layers, hidden, heads = PYTHIA_SHAPES[args.random_init]
        hf_cfg = GPTNeoXConfig(
            vocab_size=50688 if args.random_init == "pythia-12b" else PYTHIA_VOCAB,
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
            max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        if args.hf_attention:
            hf_cfg._attn_implementation = args.hf_attention
        torch.manual_seed(args.seed)
        with default_dtype(torch, dtype, args.device):
            hf = GPTNeoXForCausalLM(hf_cfg)
        hf = hf.to(args.device)  # no-op where the device context already placed it
        source = "random-init:%s seed=%d" % (args.random_init, args.seed)
    else:
        # transformers >= 4.56 renamed torch_dtype to dtype (and loads lazily by itself).
        kwargs = {"dtype": dtype} if new_api else {"torch_dtype": dtype, "low_cpu_mem_usage": True}
        if args.hf_attention:
            kwargs["attn_implementation"] = args.hf_attention
        try:
            hf = GPTNeoXForCausalLM.from_pretrained(args.model, **kwargs)
        except Exception as e:  # noqa: BLE001 - missing folder, no network, bad files: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(__file__, "cannot load %s: %s: %s" % (args.model, type(e).__name__, first))
        hf = hf.to(args.device)
        source = "huggingface:%s" % (os.path.abspath(args.model) if os.path.isdir(args.model) else args.model)
    hf.eval()
    bad = {str(p.dtype) for p in hf.parameters() if p.dtype != dtype}
    if bad:
        fail(__file__, "the Hugging Face model has parameters in %s, not %s" % (sorted(bad), dtype))
    return hf, source, transformers.__version__


def hf_cache_layer(cache, i):
    """(keys, values) of layer i from whichever cache object this transformers returns."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]


def check(args, hf, loaded, km, torch, vocab):
    """Compare the saved module with the Hugging Face model; returns (prefill, decode, bound, ok)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    high = min(vocab, 50254)  # ids the Pythia tokenizer really produces
    n, steps = args.check_tokens, args.decode_steps
    ids = torch.randint(0, high, (1, n + steps), generator=gen).to(args.device)
    with torch.no_grad():
        out = hf(input_ids=ids[:, :n], use_cache=True)
        ref_prefill = out.logits.float()
        cache = out.past_key_values
        ref_steps = []
        for t in range(n, n + steps):
            out = hf(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            ref_steps.append(out.logits.float())

        pos = torch.arange(n + steps, device=args.device).unsqueeze(0)
        got_prefill, pk, pv = loaded(ids[:, :n], pos[:, :n], *km.empty_cache(loaded, 1))
        got_steps = []
        for t in range(n, n + steps):
            logits, pk, pv = loaded(ids[:, t:t + 1], pos[:, t:t + 1], pk, pv)
            got_steps.append(logits)

    scale = max(1.0, ref_prefill.abs().max().item())
    bound = TOLERANCE[args.dtype] * scale
    d_prefill = (got_prefill - ref_prefill).abs().max().item()
    d_decode = max([(a - b).abs().max().item() for a, b in zip(got_steps, ref_steps)] or [0.0])
    agree = (got_prefill.argmax(-1) == ref_prefill.argmax(-1)).float().mean().item()
    print("max abs logit difference: prefill %.3g, decode %.3g (bound %.3g = %g x logit scale %.3g); "
          "top-1 agreement %.1f %%" % (d_prefill, d_decode, bound, TOLERANCE[args.dtype], scale, 100 * agree))
    try:
        worst = 0.0
        for i in (0, len(pk) - 1):
            hk, hv = hf_cache_layer(cache, i)
            kscale = max(1.0, hk.float().abs().max().item())
            worst = max(worst, (hk.float() - pk[i].float()).abs().max().item() / kscale,
                        (hv.float() - pv[i].float()).abs().max().item() / kscale)
        print("cached keys/values vs Hugging Face cache (first and last layer): max relative difference %.3g" % worst)
    except Exception as e:  # noqa: BLE001 - the cache API differs between transformers versions
        print("cache comparison skipped (%s: %s)" % (type(e).__name__, e))
    return d_prefill <= bound and d_decode <= bound


def tokenizer_json_for(args, vocab_size):
    """The bytes of the tokenizer.json to embed, or None with --no-tokenizer; checked to be a
    BPE tokenizer.json whose ids fit the model's vocabulary."""
    if args.no_tokenizer:
        return None
    path = args.tokenizer
    if path is None and args.random_init:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data", "tokenizers",
                            "gpt-neox-20b", "tokenizer.json")
    elif path is None and os.path.isdir(args.model):
        path = os.path.join(args.model, "tokenizer.json")
        if not os.path.isfile(path):
            fail(__file__, "%s has no tokenizer.json: pass --tokenizer FILE or --no-tokenizer" % args.model)
    elif path is None:
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(args.model, "tokenizer.json")
        except Exception as e:  # noqa: BLE001
            fail(__file__, "cannot get %s's tokenizer.json (%s): pass --tokenizer FILE or --no-tokenizer"
                 % (args.model, str(e).splitlines()[0] if str(e) else type(e).__name__))
    try:
        raw = open(path, "rb").read()
        spec = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        fail(__file__, "--tokenizer %s: not a readable tokenizer.json (%s)" % (path, e))
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        fail(__file__, "--tokenizer %s: not a Hugging Face BPE tokenizer.json" % path)
    ids = list(model["vocab"].values()) + [t.get("id", -1) for t in spec.get("added_tokens", [])]
    if max(ids) >= vocab_size:
        fail(__file__, "--tokenizer %s: ids up to %d do not fit the model's vocabulary of %d" % (path, max(ids), vocab_size))
    return raw


def main(argv=None):
    args = parse_args(argv)
    # PyTorch >= 2.9 warns on every torch.jit call; the contract is TorchScript by design.
    warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
    try:
        import torch
    except ImportError:
        fail(__file__, "PyTorch is not installed")
    import kvc_model as km

    dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(__file__, "--device cuda but PyTorch sees no GPU")
    if args.attention == "sdpa" and not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        fail(__file__, "--attention sdpa needs PyTorch >= 2.0 (this is %s)" % torch.__version__)
    t0 = time.time()
    hf, source, tf_version = build_hf_model(args, torch, dtype)
    name = args.name or (args.random_init + "-random" if args.random_init
                         else os.path.basename(os.path.normpath(args.model)))
    cfg = kvc_config_from_hf(hf.config, name, km)
    print("loaded %s (%s, %s on %s) in %.0f s: %d layers, hidden %d, heads %d, rotary %d of %d dims, vocab %d"
          % (source, args.dtype, "transformers " + tf_version, args.device, time.time() - t0, cfg.num_layers,
             cfg.hidden_size, cfg.num_heads, cfg.rotary_ndims, cfg.head_dim, cfg.vocab_size))
    tokenizer_json = tokenizer_json_for(args, cfg.vocab_size)  # before the slow part

    # Build the contract module around the Hugging Face tensors (no second copy where
    # PyTorch can adopt tensors: load_state_dict(assign=True), PyTorch >= 2.1).
    can_assign = version_tuple(torch.__version__) >= (2, 1)
    model = km.KVCModel(cfg, attention=args.attention, device="meta" if can_assign else args.device,
                        dtype=dtype)
    try:
        km.load_hf_state_dict(model, hf.state_dict(), assign=can_assign)
    except ValueError as e:
        fail(__file__, str(e))
    model.eval()
    if args.fuse_layers:
        try:
            km.fuse_layers(model)
        except ValueError as e:
            fail(__file__, "--fuse-layers: " + str(e))
    try:
        scripted = torch.jit.script(model)
    except Exception as e:  # noqa: BLE001
        hint = " (try --attention portable)" if args.attention == "sdpa" else ""
        fail(__file__, "torch.jit.script failed%s: %s" % (hint, str(e).splitlines()[0]))
    # Saved from CPU storage so the file loads anywhere without map_location.
    scripted = scripted.to("cpu")
    extra = {"source": source, "transformers_version": tf_version, "torch_version": torch.__version__}
    if tokenizer_json is not None:
        extra["tokenizer_sha256"] = hashlib.sha256(tokenizer_json).hexdigest()
    km.save_contract_model(scripted, args.out, extra, tokenizer_json=tokenizer_json)
    del scripted, model
    size = os.path.getsize(args.out)
    print("saved %s: %.1f MiB, attention %s, dtype %s%s, %s" % (
        args.out, size / 2 ** 20, args.attention, args.dtype, ", fused layers" if args.fuse_layers else "",
        "tokenizer.json embedded" if tokenizer_json is not None else "no tokenizer"))

    if args.check_tokens == 0:
        return
    loaded, saved_cfg, _ = km.load_contract_model(args.out, device=args.device)
    for attr in km.CONTRACT_ATTRS:
        if saved_cfg.get(attr) != getattr(loaded, attr):
            fail(__file__, "config.json %s=%r differs from the module attribute %r"
                 % (attr, saved_cfg.get(attr), getattr(loaded, attr)))
    if not check(args, hf, loaded, km, torch, cfg.vocab_size):
        fail(__file__, "the exported model does not match the Hugging Face model")
    print("check passed")


if __name__ == "__main__":
    main()
