#!/usr/bin/python3
"""Model files that break docs/MODEL_CONTRACT.md, one way each, for the tests of the errors a
user with an old or foreign file meets (CPU, PyTorch 1.13). Usage:

  /usr/bin/python3 tests/make_contract_error_models.py OUT_DIR

writes OUT_DIR/<case>.pt for each case in CASES (its docstring says what it breaks).
"""
import os
import sys
from typing import List, Tuple

import torch
from torch import Tensor, nn

ATTRS = dict(kvc_contract_version=5, model_name="broken", num_layers=2, num_heads=2, head_dim=4, vocab_size=16,
             rotary_ndims=2, rotary_base=10000.0, max_positions=64, bos_token_id=-1, eos_token_id=-1)


class Attrs(nn.Module):
    def __init__(self, drop=(), **over):
        super().__init__()
        for name, value in {**ATTRS, **over}.items():
            if name not in drop:
                setattr(self, name, value)


class Good(Attrs):
    """The contract's forward and step shapes (random logits; caches grow as they should)."""

    def forward(self, ids: Tensor, pos: Tensor, k: List[Tensor], v: List[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        b, t = ids.shape[0], ids.shape[1]
        new_k = [torch.cat([x, torch.zeros(b, 2, t, 4, dtype=x.dtype)], 2) for x in k]
        new_v = [torch.cat([x, torch.zeros(b, 2, t, 4, dtype=x.dtype)], 2) for x in v]
        return torch.zeros(b, t, 16), new_k, new_v


class NoStep(Good):
    """A version-1-style file: forward, no fixed-capacity `step`."""


class ReturnsTensor(Attrs):
    """forward returns the logits alone, not (logits, keys, values)."""

    def forward(self, ids: Tensor, pos: Tensor, k: List[Tensor], v: List[Tensor]) -> Tensor:
        return torch.zeros(ids.shape[0], ids.shape[1], 16)


class ReturnsPair(Attrs):
    """forward returns two elements."""

    def forward(self, ids: Tensor, pos: Tensor, k: List[Tensor], v: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        return torch.zeros(ids.shape[0], ids.shape[1], 16), k


class NoForward(Attrs):
    """Attributes only: no forward method."""

    @torch.jit.export
    def other(self, x: Tensor) -> Tensor:
        return x


CASES = {
    "version_0": lambda: Good(kvc_contract_version=0),
    "version_6": lambda: Good(kvc_contract_version=6),
    "no_version": lambda: Good(drop=("kvc_contract_version",)),
    "layers_as_text": lambda: Good(num_layers="two"),
    "rotary_base_int": lambda: Good(rotary_base=10000),
    "no_head_dim": lambda: Good(drop=("head_dim",)),
    "no_forward": NoForward,
    "forward_returns_tensor": ReturnsTensor,
    "forward_returns_pair": ReturnsPair,
    "no_step": NoStep,
}


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name, make in CASES.items():
        torch.jit.script(make()).save(os.path.join(out_dir, name + ".pt"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
