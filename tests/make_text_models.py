#!/usr/bin/python3
"""Two small random-weight contract models with Pythia's vocabulary (50,304 ids), for the CLI
tests of kvbench --text, kvtok and kvgen on a tokenizer.json (CPU, PyTorch 1.13):

  OUT_DIR/neox_tokenizer.pt   embeds data/tokenizers/gpt-neox-20b/tokenizer.json (kvc/tokenizer.json)
  OUT_DIR/no_tokenizer.pt     the same model without a tokenizer

Usage: /usr/bin/python3 tests/make_text_models.py OUT_DIR
"""
import os
import sys

import torch

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(repo, "examples", "python"))
import kvc_model as km  # noqa: E402


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = km.KVCConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=50304,
                       rotary_pct=0.25, bos_token_id=0, eos_token_id=0, model_name="neox-vocab-random")
    model = km.KVCModel(cfg).eval()
    tokenizer = open(os.path.join(repo, "data", "tokenizers", "gpt-neox-20b", "tokenizer.json"), "rb").read()
    km.save_contract_model(model, os.path.join(out_dir, "neox_tokenizer.pt"), {"source": "random"},
                           tokenizer_json=tokenizer)
    km.save_contract_model(model, os.path.join(out_dir, "no_tokenizer.pt"), {"source": "random"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
