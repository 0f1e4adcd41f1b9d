#!/usr/bin/env python3
"""Re-save a contract model file with this checkout's kvc_model.py (today: contract version 5),
keeping its weights bit for bit, its config facts and its tokenizer.

A version-1 file still works for kvbench's `original` positions and for `cache` positions when
every layer keeps the same number of tokens; per-layer positions (skip_layers, pyramid_kv under
`--positions cache`) need version 2; attention-aware policies (h2o_attention, h2o, snapkv, tova)
need version 3's scored methods; per-head budgets (adakv_snapkv, adakv_h2o) need version 4's
slot_bias; one-pass evaluation (kvbench --one-pass) needs version 5's per-row lengths.
Re-exporting from the checkpoint (export_pythia.py, export_small_model.py) gives the same
result; this script needs only the old file.

Run it with the PyTorch that the C++ driver links against (1.13 on Debian 12), so that the
file stays loadable there. It checks that the new file's logits equal the old file's.

Example:
  /usr/bin/python3 examples/python/upgrade_contract.py old.pt new.pt
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import fail  # noqa: E402

# Keys contract_config() computes itself; everything else in the old config is carried over.
COMPUTED = set(("intermediate_size", "layer_norm_eps", "dtype", "attention", "architecture",
                "use_parallel_residual", "fused_layers", "num_parameters", "tokenizer"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="contract model file to upgrade")
    ap.add_argument("dst", help="output file (may not be src)")
    args = ap.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        fail(__file__, "write to a new file, then move it over the old one")
    import torch
    import kvc_model as km

    try:
        old, cfg, tokenizer = km.load_contract_model(args.src)
    except (RuntimeError, ValueError, OSError) as e:
        fail(__file__, "cannot read %s: %s" % (args.src, str(e).splitlines()[0]))
    if cfg.get("architecture") != "gpt_neox":
        fail(__file__, "%s: architecture %r, expected gpt_neox" % (args.src, cfg.get("architecture")))
    fields = {k: cfg[k] for k in km.KVCConfig.__dataclass_fields__ if k in cfg}
    fields["rotary_pct"] = cfg["rotary_ndims"] / cfg["head_dim"]
    kcfg = km.KVCConfig(**fields)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    model = km.KVCModel(kcfg, attention=cfg["attention"], dtype=dtype).eval()
    if cfg.get("fused_layers"):
        km.fuse_layers(model)
    model.load_state_dict(old.state_dict(), strict=True)

    extra = {k: v for k, v in cfg.items() if k not in COMPUTED and k not in km.CONTRACT_ATTRS}
    new = km.save_contract_model(model, args.dst, config=extra, tokenizer_bytes=tokenizer)

    # The same function: logits of a short prefill and one decode step, in float32.
    old, new = old.float(), torch.jit.load(args.dst).float()
    ids = torch.arange(1, 17).remainder(kcfg.vocab_size).unsqueeze(0)
    pos = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        a = old(ids, pos, *km.empty_cache(old))[0]
        b = new(ids, pos, *km.empty_cache(new))[0]
    if not torch.equal(a, b):
        fail(__file__, "the upgraded file's logits differ from the old file's (max %g)" % (a - b).abs().max())
    print("%s -> %s: contract version %d -> %d, logits equal" % (
        args.src, args.dst, cfg["kvc_contract_version"], int(new.kvc_contract_version)))


if __name__ == "__main__":
    main()
