"""GPT-NeoX (Pythia) language model implementing the kvcompress model contract.

The contract (docs/MODEL_CONTRACT.md) is a TorchScript module whose forward takes the
per-layer KV cache as explicit lists of tensors, so a C++ driver can compress the cache
between calls and choose token positions itself.

This file must script under PyTorch 1.13 (LibTorch 1.13 loads the CPU/CI files) and 2.x.
Nothing here hard-codes a dtype or a device: masks and rotary tables are built from the
inputs' device and the weights' dtype, so a loaded module can be moved with .to().

Public helpers:
  KVCConfig              model shape (a dataclass, JSON-serialisable)
  KVCModel               the module (script it with torch.jit.script)
  lm_logits(model, ids)  full causal forward for training (not part of the contract)
  load_hf_state_dict     Hugging Face GPTNeoXForCausalLM weights -> KVCModel
  save_contract_model    script + save with kvc/config.json (+ kvc/tokenizer.model or .json)
  load_contract_model    load a contract file with its extra files
"""

import dataclasses
import json
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# 2: position_ids may be per layer, [num_layers, B, T].
# 3: forward_scored / step_scored also surface what attention-aware policies score with: the
#    attention each cached slot receives and the most recent queries.
# 4: forward_scored / step_scored take slot_bias, per layer an additive mask over the cached
#    slots per head (per-head budgets hide evicted slots in a dense cache).
CONTRACT_VERSION = 5
CONFIG_FILE = "kvc/config.json"
TOKENIZER_FILE = "kvc/tokenizer.model"       # a SentencePiece model
TOKENIZER_JSON_FILE = "kvc/tokenizer.json"    # a Hugging Face tokenizer.json (Pythia exports)
ATTENTION_KINDS = ("portable", "sdpa")


@dataclasses.dataclass
class KVCConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_positions: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    bos_token_id: int = -1
    eos_token_id: int = -1
    model_name: str = "gpt-neox"

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError("KVCConfig.%s must be positive, got %r" % (name, getattr(self, name)))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError("hidden_size %d is not a multiple of num_heads %d"
                             % (self.hidden_size, self.num_heads))
        if self.rotary_ndims % 2 != 0:
            raise ValueError("rotary_ndims (head_dim * rotary_pct = %d) must be even" % self.rotary_ndims)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        # Same rounding as Hugging Face: int(head_size * rotary_pct).
        return int(self.head_dim * self.rotary_pct)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "KVCConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError("unknown KVCConfig keys: %s" % ", ".join(unknown))
        return cls(**d)


def full_width_rotary(cos: Tensor, sin: Tensor, head_dim: int) -> Tuple[Tensor, Tensor]:
    """Rotary factors over the whole head for apply_rotary, from the rotary_ndims-wide cos /
    sin of KVCModel.rotary_tables: past rotary_ndims cos is 1 and sin 0 (those dims pass
    through), and sin's first half is negated, so that rotate_half(x) * sin ==
    swap_halves(x) * sin_full."""
    r = cos.size(-1)
    half = r // 2
    pad: List[int] = list(cos.size()[:-1]) + [head_dim - r]
    cos_full = torch.cat((cos, torch.ones(pad, dtype=cos.dtype, device=cos.device)), dim=-1)
    sin_full = torch.cat((-sin[..., :half], sin[..., half:],
                          torch.zeros(pad, dtype=sin.dtype, device=sin.device)), dim=-1)
    return cos_full, sin_full


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rotary_ndims: int) -> Tensor:
    """GPT-NeoX partial rotary on x's last dim, with factors from full_width_rotary:
    x * cos + swap_halves(x) * sin, where swap_halves exchanges the two halves of the first
    rotary_ndims dims. On the rotary dims these are the floats of Hugging Face's
    x * cos + rotate_half(x) * sin (negation is exact); the other dims come out as x + 0.
    Full-width elementwise ops and no slice assignment: few kernels, which TorchScript's fuser
    can merge (decode is kernel-count bound, docs/PERFORMANCE.md). The factors are cast to x's
    dtype here: a no-op normally, needed under autocast, where q/k come out of the Linear in
    lower precision."""
    if rotary_ndims == 0:
        return x
    half = rotary_ndims // 2
    swapped = torch.cat((x[..., half:rotary_ndims], x[..., :half], x[..., rotary_ndims:]), dim=-1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


def chunk_mask(t: int, s: int, past_len: int, device: torch.device) -> Tensor:
    """Boolean [t, s] mask, True = may attend: all past_len cached entries, then causal
    inside the chunk of t new tokens (s = past_len + t)."""
    rows = torch.arange(t, device=device).unsqueeze(1)
    cols = torch.arange(s, device=device).unsqueeze(0)
    return cols <= rows + past_len


class PortableAttention(nn.Module):
    """matmul + masked_fill + softmax: only ops that LibTorch 1.13 has."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, past_len: int) -> Tensor:
        t = q.size(2)
        # Scores and softmax in float32: fp16 logits of long rows lose too much otherwise.
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        if t > 1:
            mask = chunk_mask(t, k.size(2), past_len, q.device)
            scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)

    def masked(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Attention over whole cache buffers; bias [T, C] additive, 0 = may attend, -inf not."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale + bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)

    def masked_scored(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        """masked(), also returning the attention mass per slot (attention_mass): the output
        comes from the same probabilities, so it is masked()'s bitwise."""
        probs, mass = attention_mass(q, k, bias)
        return torch.matmul(probs.to(v.dtype), v), mass


class SdpaAttention(nn.Module):
    """torch.nn.functional.scaled_dot_product_attention (PyTorch >= 2.0 only). Kept in its
    own class so that a portable model never compiles a reference to it."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, past_len: int) -> Tensor:
        t = q.size(2)
        if t == 1:
            # A single new token sees everything: no mask at all.
            return F.scaled_dot_product_attention(q, k, v)
        if past_len == 0:
            # Pure prefill: is_causal lets the fused (flash) kernels run.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = chunk_mask(t, k.size(2), past_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def masked(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Attention over whole cache buffers; bias [T, C] additive in q's dtype, 0 = may
        attend, -inf not. A float mask whose row stride is a multiple of 16 goes to the fused
        kernel as is; a boolean one costs a conversion and an alignment copy in every layer."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def masked_scored(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        """masked() through the fused kernel (so the output is the unscored step's bitwise), and
        the attention mass per slot computed beside it (a fused kernel does not expose its
        probabilities): a few small kernels per layer, for the policies that need them."""
        return self.masked(q, k, v, bias), attention_mass(q, k, bias.float())[1]


def attention_mass(q: Tensor, k: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """(probs, mass): the attention probabilities softmax(q k^T / sqrt(D) + bias) in float32
    [B, H, T, S] and what every key slot received, summed over the T queries (float32
    [B, H, S]; a slot masked out for every query receives exactly 0). bias [T, S] additive
    (0 = may attend, -inf not). What contract version 3's scored methods report."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + bias
    probs = torch.softmax(scores, dim=-1)
    if probs.size(2) == 1:
        return probs, probs.squeeze(2)  # one query: a view, no reduction kernel
    return probs, probs.sum(2)


def make_attention_core(kind: str, head_dim: int) -> nn.Module:
    if kind == "portable":
        return PortableAttention(head_dim)
    if kind == "sdpa":
        if not hasattr(F, "scaled_dot_product_attention"):
            raise RuntimeError("attention 'sdpa' needs PyTorch >= 2.0 (this is %s); use 'portable'"
                               % torch.__version__)
        return SdpaAttention(head_dim)
    raise ValueError("attention must be one of %s, got %r" % (ATTENTION_KINDS, kind))


def split_heads(qkv: Tensor, num_heads: int, head_dim: int, rotary_ndims: int, cos: Tensor,
                sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused QKV projection [B, T, H * 3 * D] (HF layout: per head [q | k | v]) -> q, k, v
    [B, H, T, D], q and k rotated together (one set of kernels for both); cos / sin
    [B, T, 1, 1, D] from KVCModel.rotation."""
    b = qkv.size(0)
    t = qkv.size(1)
    qkv = qkv.view(b, t, num_heads, 3, head_dim)
    qk = apply_rotary(qkv[:, :, :, :2], cos, sin, rotary_ndims)
    return qk[:, :, :, 0].transpose(1, 2), qk[:, :, :, 1].transpose(1, 2), qkv[:, :, :, 2].transpose(1, 2)


class NeoXAttention(nn.Module):
    def __init__(self, cfg: KVCConfig, attention: str, factory: Dict):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.hidden_size = cfg.hidden_size
        self.rotary_ndims = cfg.rotary_ndims
        # Names and shapes follow Hugging Face GPT-NeoX so weights map one to one.
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, **factory)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, **factory)
        self.core = make_attention_core(attention, cfg.head_dim)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x [B, T, hidden] -> q, k, v [B, H, T, D] (q, k rotated)."""
        return split_heads(self.query_key_value(x), self.num_heads, self.head_dim, self.rotary_ndims, cos, sin)

    def merge(self, o: Tensor) -> Tensor:
        """o [B, H, T, D] -> dense(o as [B, T, hidden])."""
        b = o.size(0)
        t = o.size(2)
        return self.dense(o.transpose(1, 2).reshape(b, t, self.hidden_size))


class NeoXMLP(nn.Module):
    def __init__(self, cfg: KVCConfig, factory: Dict):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **factory)
        self.act = nn.GELU()  # exact (erf) GELU, as Pythia's hidden_act="gelu"
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class _Layer(nn.Module):
    """What NeoXLayer and FusedNeoXLayer share: the cache handling of forward (dynamic cache)
    and step (caller-owned buffers). A layer supplies
      project(x, cos, sin) -> q, k, v [B, H, T, D] and `carry` for finish,
      finish(x, o, carry) -> the layer's output from attention's o [B, H, T, D],
      attend(q, k, v, past_len) / attend_masked(q, k, v, bias) / attend_masked_scored (also the
      attention mass per slot): its attention core."""

    def __init__(self, index: int, num_heads: int, head_dim: int):
        super().__init__()
        self.layer_index = index
        self.num_heads = num_heads
        self.head_dim = head_dim

    def check_past(self, x: Tensor, past_k: Tensor, past_v: Tensor):
        ok = (past_k.dim() == 4 and past_v.dim() == 4
              and past_k.size(0) == x.size(0) and past_k.size(1) == self.num_heads
              and past_k.size(3) == self.head_dim and past_v.size() == past_k.size())
        if not ok:
            raise RuntimeError(
                "kvc model: layer {} cache has keys {} and values {}; expected both [B={}, H={}, P, D={}]"
                .format(self.layer_index, past_k.size(), past_v.size(), x.size(0), self.num_heads,
                        self.head_dim))
        if past_k.dtype != x.dtype or past_v.dtype != x.dtype:
            raise RuntimeError("kvc model: layer {} cache dtype {} / {} differs from the model dtype {}"
                               .format(self.layer_index, past_k.dtype, past_v.dtype, x.dtype))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, key_buffer: Tensor, value_buffer: Tensor,
             slots: Tensor, bias: Tensor, want_mass: bool, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Writes the new tokens' keys/values into the caller's buffers at `slots` ([T] int64,
        on the device; or [B, T], one row's slots per row) and attends with the additive mask
        `bias` ([T, C], or anything that broadcasts to [B, H, T, C]). Static shapes, no
        host synchronisation: capturable in a CUDA graph. Returns the output, the queries and,
        when want_mass, the attention every slot received (attention_mass; else empty). `rows` > 1
        with x of one row: every row's input is x (the same tokens), so its projections are
        computed once, rotated per row (cos / sin of `rows` rows), and only attention and what
        follows run per row."""
        if x.size(0) == 1 and rows > 1:
            qkv, carry = self.linear(x)
            # Copies, not stride-0 views: the ops after them take their fast, contiguous paths.
            x = x.expand(rows, x.size(1), x.size(2)).contiguous()
            q, k, v = self.split(qkv.expand(rows, qkv.size(1), qkv.size(2)).contiguous(), cos, sin)
            carry = carry.expand(rows, carry.size(1), carry.size(2)).contiguous()
        else:
            q, k, v, carry = self.project(x, cos, sin)
        if slots.dim() == 1:
            key_buffer.index_copy_(2, slots, k)
            value_buffer.index_copy_(2, slots, v)
        else:  # version 5: slots [B, T], each row at its own length
            index = slots.view(slots.size(0), 1, slots.size(1), 1).expand(k.size())
            key_buffer.scatter_(2, index, k)
            value_buffer.scatter_(2, index, v)
        if want_mass:
            o, mass = self.attend_masked_scored(q, key_buffer, value_buffer, bias)
        else:
            o = self.attend_masked(q, key_buffer, value_buffer, bias)
            mass = torch.empty([0], device=x.device)
        return self.finish(x, o, carry), q, mass

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor,
                past_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        y, k, v, _, _ = self.forward_scored(x, cos, sin, past_k, past_v, False, torch.empty([0]))
        return y, k, v

    def forward_scored(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor,
                       want_mass: bool, slot_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """forward, also returning the queries and (when want_mass) the attention each of the
        past + new slots received from the new tokens, summed over them (else empty).
        slot_bias [B, H, past] is added to the attention scores of the past slots (0 = visible,
        -inf = hidden from that head); an empty tensor = none."""
        self.check_past(x, past_k, past_v)
        has_bias = slot_bias.numel() > 0
        if has_bias and slot_bias.size() != past_k.size()[:3]:
            raise RuntimeError("kvc model: layer {} slot_bias {} must be [B, H, P] like its cache {}"
                               .format(self.layer_index, slot_bias.size(), past_k.size()))
        q, k, v, carry = self.project(x, cos, sin)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        if want_mass or has_bias:
            t = q.size(2)
            s = k.size(2)
            bias = torch.zeros([t, s], dtype=x.dtype, device=x.device)  # SDPA wants q's dtype
            if t > 1:
                bias = bias.masked_fill(chunk_mask(t, s, past_k.size(2), x.device).logical_not(), float("-inf"))
            if has_bias:
                new = torch.zeros([x.size(0), self.num_heads, t], dtype=x.dtype, device=x.device)
                bias = bias + torch.cat((slot_bias.to(x.dtype), new), dim=2).unsqueeze(2)
            if want_mass:
                o, mass = self.attend_masked_scored(q, k, v, bias)
            else:
                o = self.attend_masked(q, k, v, bias)
                mass = torch.empty([0], device=x.device)
        else:
            o = self.attend(q, k, v, past_k.size(2))
            mass = torch.empty([0], device=x.device)
        return self.finish(x, o, carry), k, v, q, mass

    def causal(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Whole-sequence causal pass without a cache (lm_logits; eager modules only)."""
        q, k, v, carry = self.project(x, cos, sin)
        return self.finish(x, _causal_attention(q, k, v), carry)


class NeoXLayer(_Layer):
    """One GPT-NeoX layer with Hugging Face's parameters and order of operations."""

    def __init__(self, cfg: KVCConfig, index: int, attention: str, factory: Dict):
        super().__init__(index, cfg.num_heads, cfg.head_dim)
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **factory)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **factory)
        self.attention = NeoXAttention(cfg, attention, factory)
        self.mlp = NeoXMLP(cfg, factory)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = self.attention.project(self.input_layernorm(x), cos, sin)
        return q, k, v, x

    def linear(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """project() before the heads are split and rotated: the QKV product and the carry."""
        return self.attention.query_key_value(self.input_layernorm(x)), x

    def split(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return split_heads(qkv, self.num_heads, self.head_dim, self.attention.rotary_ndims, cos, sin)

    def finish(self, x: Tensor, o: Tensor, carry: Tensor) -> Tensor:
        attn_out = self.attention.merge(o)
        # Summation order follows HF (mlp + attn + x) so low-precision results match closely.
        if self.use_parallel_residual:
            mlp_out = self.mlp(self.post_attention_layernorm(x))
            return mlp_out + attn_out + x
        h = attn_out + x
        return self.mlp(self.post_attention_layernorm(h)) + h

    def attend(self, q: Tensor, k: Tensor, v: Tensor, past_len: int) -> Tensor:
        return self.attention.core(q, k, v, past_len)

    def attend_masked(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        return self.attention.core.masked(q, k, v, bias)

    def attend_masked_scored(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        return self.attention.core.masked_scored(q, k, v, bias)


class FusedNeoXLayer(_Layer):
    """A parallel-residual NeoXLayer rewritten with fewer, larger kernels (what bounds decode,
    docs/PERFORMANCE.md): both LayerNorms share one normalisation, their scales and shifts
    folded into the weights after it (LN_i(x) = n * g_i + b_i, so W (n * g_i + b_i) + c =
    (W diag(g_i)) n + (W b_i + c)); QKV and the MLP's first Linear become one matrix product;
    the attention output and the MLP's second Linear another (dense(o) + W2 gelu(h) =
    [dense | W2] [o ; gelu(h)]). The same function as the layer it is built from, up to
    rounding: the folded weights are rounded once to the model's dtype."""

    def __init__(self, layer: NeoXLayer):
        super().__init__(layer.layer_index, layer.num_heads, layer.head_dim)
        if not layer.use_parallel_residual:
            raise ValueError("FusedNeoXLayer needs a parallel-residual layer (use_parallel_residual)")
        att, mlp = layer.attention, layer.mlp
        self.use_parallel_residual = True
        self.hidden_size = att.hidden_size
        self.rotary_ndims = att.rotary_ndims
        self.eps = float(layer.input_layernorm.eps)
        dtype, device = att.query_key_value.weight.dtype, att.query_key_value.weight.device
        with torch.no_grad():
            def folded(lin: nn.Linear, ln: nn.LayerNorm) -> Tuple[Tensor, Tensor]:
                w = lin.weight.double()
                return w * ln.weight.double().unsqueeze(0), lin.bias.double() + w @ ln.bias.double()
            w_qkv, b_qkv = folded(att.query_key_value, layer.input_layernorm)
            w_up, b_up = folded(mlp.dense_h_to_4h, layer.post_attention_layernorm)
            self.in_proj = nn.Linear(w_qkv.size(1), w_qkv.size(0) + w_up.size(0), device=device, dtype=dtype)
            self.in_proj.weight.copy_(torch.cat((w_qkv, w_up), 0))
            self.in_proj.bias.copy_(torch.cat((b_qkv, b_up), 0))
            w_out = torch.cat((att.dense.weight, mlp.dense_4h_to_h.weight), 1)
            self.out_proj = nn.Linear(w_out.size(1), w_out.size(0), device=device, dtype=dtype)
            self.out_proj.weight.copy_(w_out)
            self.out_proj.bias.copy_(att.dense.bias.double() + mlp.dense_4h_to_h.bias.double())
        self.act = nn.GELU()
        self.core = att.core

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        y = self.in_proj(F.layer_norm(x, [self.hidden_size], None, None, self.eps))
        q, k, v = split_heads(y[..., :3 * self.hidden_size], self.num_heads, self.head_dim, self.rotary_ndims,
                              cos, sin)
        return q, k, v, y[..., 3 * self.hidden_size:]

    def linear(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """project() before the heads are split and rotated: the QKV product and the carry."""
        y = self.in_proj(F.layer_norm(x, [self.hidden_size], None, None, self.eps))
        return y[..., :3 * self.hidden_size], y[..., 3 * self.hidden_size:]

    def split(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return split_heads(qkv, self.num_heads, self.head_dim, self.rotary_ndims, cos, sin)

    def finish(self, x: Tensor, o: Tensor, carry: Tensor) -> Tensor:
        b = o.size(0)
        t = o.size(2)
        z = torch.cat((o.transpose(1, 2).reshape(b, t, self.hidden_size), self.act(carry)), dim=-1)
        return self.out_proj(z) + x

    def attend(self, q: Tensor, k: Tensor, v: Tensor, past_len: int) -> Tensor:
        return self.core(q, k, v, past_len)

    def attend_masked(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        return self.core.masked(q, k, v, bias)

    def attend_masked_scored(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        return self.core.masked_scored(q, k, v, bias)


def fuse_layers(model: "KVCModel") -> "KVCModel":
    """Replaces every layer of `model` (weights loaded) by its FusedNeoXLayer, in place; the
    result keeps the contract and computes the same function up to rounding. Needs parallel
    residual layers (all Pythia models). Not for training: the Hugging Face names are gone."""
    for i in range(len(model.layers)):
        model.layers[i] = FusedNeoXLayer(model.layers[i])
    model.fused_layers = True
    return model


class KVCModel(nn.Module):
    """GPT-NeoX causal LM with an explicit, caller-managed KV cache (contract version 5)."""

    def __init__(self, cfg: KVCConfig, attention: str = "portable",
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # Contract attributes: plain int/float/str so C++ can read them with module.attr().
        self.kvc_contract_version = CONTRACT_VERSION
        self.model_name = str(cfg.model_name)
        self.num_layers = int(cfg.num_layers)
        self.num_heads = int(cfg.num_heads)
        self.head_dim = int(cfg.head_dim)
        self.hidden_size = int(cfg.hidden_size)
        self.intermediate_size = int(cfg.intermediate_size)
        self.vocab_size = int(cfg.vocab_size)
        self.rotary_ndims = int(cfg.rotary_ndims)
        self.rotary_base = float(cfg.rotary_base)
        self.max_positions = int(cfg.max_positions)
        self.bos_token_id = int(cfg.bos_token_id)
        self.eos_token_id = int(cfg.eos_token_id)
        self.layer_norm_eps = float(cfg.layer_norm_eps)
        self.attention_kind = str(attention)
        self.fused_layers = False  # fuse_layers() sets it

        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList([NeoXLayer(cfg, i, attention, factory) for i in range(cfg.num_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **factory)
        self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **factory)

    def rotary_tables(self, position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        """float32 cos/sin [B, 1, T, rotary_ndims] for the given positions.

        Built on every call (a few hundred floats) instead of stored as a buffer, because a
        buffer would be cast by module.to(float16) and lose precision."""
        r = self.rotary_ndims
        exponent = torch.arange(0, r, 2, dtype=torch.float32, device=position_ids.device) / r
        inv_freq = 1.0 / torch.pow(self.rotary_base, exponent)
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def rotation(self, position_ids: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """full_width_rotary factors, cos / sin in `dtype` as [B, T, 1, 1, head_dim] to
        broadcast against the q/k pair [B, T, H, 2, D] of split_heads; for per-layer positions
        ([L, B, T]) one such pair per layer, [L, B, T, 1, 1, head_dim]. Built once per call,
        not per layer."""
        per_layer = position_ids.dim() == 3
        flat = position_ids.reshape(-1, position_ids.size(-1)) if per_layer else position_ids
        cos, sin = self.rotary_tables(flat)
        cos, sin = full_width_rotary(cos, sin, self.head_dim)
        shape = [cos.size(0), cos.size(2), 1, 1, cos.size(3)]
        if per_layer:
            shape = [position_ids.size(0), position_ids.size(1), cos.size(2), 1, 1, cos.size(3)]
        return cos.to(dtype).view(shape), sin.to(dtype).view(shape)

    def check_positions(self, input_ids: Tensor, position_ids: Tensor, one_row_of_tokens: bool = False):
        """position_ids: [B, T] (one position per token, every layer) or [num_layers, B, T]
        (contract version 2: layer i rotates its new queries and keys at position_ids[i]).
        `one_row_of_tokens` (step, version 5): input_ids may also be [1, T], the tokens every
        row feeds."""
        ids = input_ids.size()
        if one_row_of_tokens and input_ids.dim() == 2 and input_ids.size(0) == 1 and position_ids.dim() >= 2:
            ids = [position_ids.size(-2), input_ids.size(1)]
        shared = position_ids.dim() == 2 and position_ids.size() == ids
        per_layer = (position_ids.dim() == 3 and position_ids.size(0) == self.num_layers
                     and position_ids.size()[1:] == ids)
        if input_ids.dim() != 2 or not (shared or per_layer):
            raise RuntimeError("kvc model: input_ids {} must be [B, T] and position_ids {} [B, T] or [{}, B, T]"
                               .format(input_ids.size(), position_ids.size(), self.num_layers))

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_keys: List[Tensor],
                past_values: List[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        empty: List[Tensor] = []
        logits, keys, values, _, _ = self.forward_scored(input_ids, position_ids, past_keys, past_values, False, 0,
                                                         empty)
        return logits, keys, values

    @torch.jit.export
    def forward_scored(self, input_ids: Tensor, position_ids: Tensor, past_keys: List[Tensor],
                       past_values: List[Tensor], attention: bool, query_window: int, slot_bias: List[Tensor]
                       ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Contract version 3: forward, plus per layer (when `attention`) the attention every
        slot of the returned cache received from the new tokens, summed over them (float32
        [B, H, past + T]), and the last min(T, query_window) queries as the layer used them
        ([B, H, n, D]). Empty lists for what is not asked for. A call is one step: its tokens'
        attention is summed, as the course project scored its prompt. Version 4: slot_bias, per
        layer [B, H, past] added to the attention scores of the past slots (0 = visible, -inf =
        hidden from that head; the new tokens are visible); an empty list = none."""
        self.check_positions(input_ids, position_ids)
        if len(past_keys) != self.num_layers or len(past_values) != self.num_layers:
            raise RuntimeError("kvc model: got {} past_keys and {} past_values, expected {} each"
                               .format(len(past_keys), len(past_values), self.num_layers))
        if len(slot_bias) != 0 and len(slot_bias) != self.num_layers:
            raise RuntimeError("kvc model: got {} slot_bias tensors, expected {} (or none)"
                               .format(len(slot_bias), self.num_layers))
        x = self.embed_in(input_ids)
        cos, sin = self.rotation(position_ids, x.dtype)
        new_keys: List[Tensor] = []
        new_values: List[Tensor] = []
        masses: List[Tensor] = []
        queries: List[Tensor] = []
        per_layer = position_ids.dim() == 3
        t = input_ids.size(1)
        keep = min(t, query_window)
        no_bias = torch.empty([0], device=x.device)
        for i, layer in enumerate(self.layers):
            sb = slot_bias[i] if len(slot_bias) > 0 else no_bias
            if per_layer:
                x, k, v, q, mass = layer.forward_scored(x, cos[i], sin[i], past_keys[i], past_values[i], attention, sb)
            else:
                x, k, v, q, mass = layer.forward_scored(x, cos, sin, past_keys[i], past_values[i], attention, sb)
            new_keys.append(k)
            new_values.append(v)
            if attention:
                masses.append(mass)
            if keep > 0:
                queries.append(q[:, :, t - keep:])
        logits = self.embed_out(self.final_layer_norm(x)).float()
        return logits, new_keys, new_values, masses, queries

    @torch.jit.export
    def step(self, input_ids: Tensor, position_ids: Tensor, key_buffers: List[Tensor],
             value_buffers: List[Tensor], lengths: Tensor) -> Tensor:
        """Contract `step` (fixed-capacity caches): layer i's cache lives in caller-owned
        buffers [B, H, C_i, D] whose first lengths[i] slots are valid (lengths: int64
        [num_layers] on the model's device; version 5: or [num_layers, B], one length per row).
        The T new tokens' keys/values are written to slots
        lengths[i] .. lengths[i] + T - 1; each token attends to the valid slots and the new ones
        up to itself. Returns float32 logits [B, T, vocab]; the caller advances its lengths."""
        empty: List[Tensor] = []
        return self.step_scored(input_ids, position_ids, key_buffers, value_buffers, lengths, empty, 1.0, empty,
                                lengths[:0], empty)

    @torch.jit.export
    def step_scored(self, input_ids: Tensor, position_ids: Tensor, key_buffers: List[Tensor],
                    value_buffers: List[Tensor], lengths: Tensor, attention_buffers: List[Tensor], decay: float,
                    query_buffers: List[Tensor], query_slots: Tensor, slot_bias: List[Tensor]) -> Tensor:
        """Contract version 3: step, plus what attention-aware policies score with, written into
        caller-owned buffers (still capturable in a CUDA graph):
          attention_buffers[i] float32 [B, H, C_i]: becomes decay * itself + the attention each
            slot received from the new tokens, summed over them (masked slots receive 0, so
            slots past the valid ones keep what they hold times decay: the caller keeps them 0);
          query_buffers[i] [B, H, W, D]: the last n = query_slots.size(0) new queries written at
            slots query_slots (int64 [n] on the device; a ring of the W most recent queries).
        Empty lists skip either; with both empty this is `step` exactly. Version 4: slot_bias[i]
        [B, H, C_i] in the model's dtype, added to every query's attention scores over layer i's
        slots (0 = visible, -inf = hidden from that head, as a per-head budget leaves evicted
        tokens in a dense cache); an empty list = none. Version 5: lengths may be
        [num_layers, B], each row's own valid length per layer (rows of one batch that hold
        different caches): row b's new tokens go to its slots lengths[i, b] .. and it attends to
        its own valid slots only. And a prefix of layers may have buffers (and attention, query
        and slot_bias buffers) of one row while the batch has B > 1: those layers run once, on row
        0, and every row continues from their output -- for rows that feed the same tokens and
        keep those layers uncompressed, whose keys and values there are the same."""
        if len(key_buffers) != self.num_layers or len(value_buffers) != self.num_layers:
            raise RuntimeError("kvc model: got {} key and {} value buffers, expected {} each"
                               .format(len(key_buffers), len(value_buffers), self.num_layers))
        want_mass = len(attention_buffers) > 0
        want_queries = len(query_buffers) > 0
        want_bias = len(slot_bias) > 0
        if (want_mass and len(attention_buffers) != self.num_layers) or (
                want_queries and len(query_buffers) != self.num_layers) or (
                want_bias and len(slot_bias) != self.num_layers):
            raise RuntimeError("kvc model: got {} attention, {} query and {} slot_bias buffers, expected {} each "
                               "(or none)".format(len(attention_buffers), len(query_buffers), len(slot_bias),
                                                  self.num_layers))
        self.check_positions(input_ids, position_ids, True)
        rows = position_ids.size(-2)
        # Version 5: a prefix of layers whose buffers hold one row while the batch holds more is
        # shared: it runs once, on row 0, and every row continues from its output (rows that feed
        # the same tokens and keep those layers whole hold the same keys and values there). And
        # input_ids of one row are the tokens every row feeds: whatever depends on them alone
        # (the embedding, the shared layers, the next layer's projections) is computed once.
        shared = 0
        if rows > 1:
            while shared < self.num_layers and key_buffers[shared].size(0) == 1:
                shared += 1
        x = self.embed_in(input_ids[:1] if shared > 0 else input_ids)
        cos, sin = self.rotation(position_ids, x.dtype)
        per_layer = position_ids.dim() == 3
        # Slots and masks of all layers at once (a handful of kernels per step, not per layer).
        # Mask rows are `width` apart, a multiple of 16, so SDPA's fused kernel takes each
        # layer's [T, C_i] slice without an alignment copy.
        t = input_ids.size(1)
        per_row = lengths.dim() == 2
        if not ((lengths.dim() == 1 and lengths.size(0) == self.num_layers) or (
                per_row and lengths.size(0) == self.num_layers and lengths.size(1) == rows)):
            raise RuntimeError("kvc model: lengths {} must be [{}] or (version 5) [{}, B={}]"
                               .format(lengths.size(), self.num_layers, self.num_layers, rows))
        slots = lengths.unsqueeze(-1) + torch.arange(t, device=input_ids.device)  # [L, T] or [L, B, T]
        width = 16
        for kb in key_buffers:
            width = max(width, (kb.size(2) + 15) // 16 * 16)
        cols = torch.arange(width, device=input_ids.device)
        allowed = cols <= slots.unsqueeze(-1)  # [L, T, width] or [L, B, T, width]
        bias = torch.full(allowed.size(), float("-inf"), dtype=x.dtype, device=x.device).masked_fill(allowed, 0.0)
        n = query_slots.size(0)
        for i, layer in enumerate(self.layers):
            kb = key_buffers[i]
            layer_rows = 1 if i < shared else rows
            if kb.size(0) != layer_rows:
                raise RuntimeError("kvc model: layer {} buffers hold {} rows for a batch of {} (only a prefix of "
                                   "layers may hold 1 row, shared by every row)".format(i, kb.size(0), rows))
            if per_row:
                b = bias[i, :layer_rows, :, :kb.size(2)].unsqueeze(1)  # [B, 1, T, C_i]
                if want_bias:
                    b = b + slot_bias[i].unsqueeze(2)  # [B, H, T, C_i]
            else:
                b = bias[i, :, :kb.size(2)]
                if want_bias:
                    b = b.unsqueeze(0).unsqueeze(0) + slot_bias[i].unsqueeze(2)  # [B, H, T, C_i]
            layer_slots = slots[i, :layer_rows] if per_row else slots[i]
            if per_layer:
                x, q, mass = layer.step(x, cos[i, :layer_rows], sin[i, :layer_rows], kb, value_buffers[i], layer_slots,
                                        b, want_mass, layer_rows)
            else:
                x, q, mass = layer.step(x, cos[:layer_rows], sin[:layer_rows], kb, value_buffers[i], layer_slots, b,
                                        want_mass, layer_rows)
            if want_mass:
                ab = attention_buffers[i]
                torch.add(mass, ab, alpha=decay, out=ab)
            if want_queries and n > 0:
                query_buffers[i].index_copy_(2, query_slots, q[:, :, t - n:])
        if x.size(0) != rows:  # every layer shared
            x = x.expand(rows, x.size(1), x.size(2)).contiguous()
        return self.embed_out(self.final_layer_norm(x)).float()


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def empty_cache(model, batch: int = 1) -> Tuple[List[Tensor], List[Tensor]]:
    """Per-layer [B, H, 0, D] tensors in the model's dtype and device (works for eager and
    scripted modules)."""
    p = next(model.parameters())
    shape = (batch, int(model.num_heads), 0, int(model.head_dim))
    n = int(model.num_layers)
    return ([p.new_zeros(shape) for _ in range(n)], [p.new_zeros(shape) for _ in range(n)])


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return PortableAttention(q.size(-1))(q, k, v, 0)


def lm_logits(model: KVCModel, ids: Tensor) -> Tensor:
    """Full causal forward for training/eval: logits [B, T, vocab] in the compute dtype
    (no float32 cast, no cache). Runs on the eager module only; it is deliberately not part
    of the scripted interface. Uses fused causal attention when PyTorch has it."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
    x = model.embed_in(ids)
    cos, sin = model.rotation(pos, x.dtype)
    for layer in model.layers:
        x = layer.causal(x, cos, sin)
    return model.embed_out(model.final_layer_norm(x))


# ---------------------------------------------------------------------------------------
# Hugging Face weights

_HF_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


def hf_to_kvc_name(name: str) -> Optional[str]:
    """Map a GPTNeoXForCausalLM state_dict key to ours; None for buffers we don't use."""
    if any(name.endswith(s) for s in _HF_IGNORED_SUFFIXES):
        return None
    if name.startswith("gpt_neox."):
        return name[len("gpt_neox."):]
    if name == "lm_head.weight":  # transformers 5.x names the output projection lm_head
        return "embed_out.weight"
    return name  # embed_out.weight (transformers 4.x) keeps its name


def load_hf_state_dict(model: KVCModel, sd: Dict[str, Tensor], assign: bool = False) -> None:
    """Copy Hugging Face GPT-NeoX weights into model; raises ValueError listing missing or
    unexpected keys and mismatched shapes. assign=True (PyTorch >= 2.1) adopts the tensors
    instead of copying them, which lets a big model be built on the meta device."""
    mapped: Dict[str, Tensor] = {}
    for name, tensor in sd.items():
        ours = hf_to_kvc_name(name)
        if ours is not None:
            mapped[ours] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong_shape = sorted("%s: checkpoint %s, model %s" % (k, tuple(mapped[k].shape), tuple(expected[k].shape))
                         for k in set(expected) & set(mapped) if mapped[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append("missing keys (%d): %s" % (len(missing), ", ".join(missing[:20])))
        if unexpected:
            parts.append("unexpected keys (%d): %s" % (len(unexpected), ", ".join(unexpected[:20])))
        if wrong_shape:
            parts.append("shape mismatches: %s" % "; ".join(wrong_shape[:20]))
        raise ValueError("Hugging Face GPT-NeoX weights do not fit the model: " + " | ".join(parts))
    if assign:
        model.load_state_dict(mapped, strict=True, assign=True)
    else:
        model.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------
# Saving / loading contract files

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
CONTRACT_ATTRS = ("kvc_contract_version", "model_name", "num_layers", "num_heads", "head_dim",
                  "hidden_size", "vocab_size", "rotary_ndims", "rotary_base", "max_positions",
                  "bos_token_id", "eos_token_id")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def contract_config(model, extra: Optional[Dict] = None) -> Dict:
    """The kvc/config.json content: every contract attribute plus dtype, attention kind and
    whatever the caller adds (source of the weights, tokenizer, training facts)."""
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise ValueError("contract models keep all parameters in one dtype, found %s" % sorted(map(str, dtypes)))
    cfg = {name: getattr(model, name) for name in CONTRACT_ATTRS}
    cfg.update({
        "intermediate_size": int(model.intermediate_size),
        "layer_norm_eps": float(model.layer_norm_eps),
        "dtype": dtype_name(dtypes.pop()),
        "attention": str(model.attention_kind),
        "architecture": "gpt_neox",
        "use_parallel_residual": bool(model.layers[0].use_parallel_residual),
        "fused_layers": bool(model.fused_layers),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    })
    if extra:
        cfg.update(extra)
    return cfg


def save_contract_model(model, path: str, config: Optional[Dict] = None,
                        tokenizer_bytes: Optional[bytes] = None, tokenizer_json: Optional[bytes] = None):
    """Script (if needed) and save model to path with kvc/config.json and, when given, its
    tokenizer: a SentencePiece model as kvc/tokenizer.model or a Hugging Face tokenizer.json as
    kvc/tokenizer.json (one of them). config holds extra keys for config.json (e.g. "source").
    Returns the scripted module."""
    if tokenizer_bytes is not None and tokenizer_json is not None:
        raise ValueError("embed one tokenizer: a SentencePiece model or a tokenizer.json, not both")
    scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model.eval())
    extra = dict(config or {})
    extra["tokenizer"] = (TOKENIZER_FILE if tokenizer_bytes is not None else
                          TOKENIZER_JSON_FILE if tokenizer_json is not None else extra.get("tokenizer"))
    cfg = contract_config(model, extra)
    files = {CONFIG_FILE: json.dumps(cfg, indent=2, sort_keys=True) + "\n"}
    if tokenizer_bytes is not None:
        files[TOKENIZER_FILE] = bytes(tokenizer_bytes)
    if tokenizer_json is not None:
        files[TOKENIZER_JSON_FILE] = bytes(tokenizer_json)
    torch.jit.save(scripted, path, _extra_files=files)
    return scripted


def load_contract_model(path: str, device: str = "cpu"):
    """(module, config dict, tokenizer bytes or None) from a contract file: the embedded
    kvc/tokenizer.json, else kvc/tokenizer.model."""
    files = {CONFIG_FILE: "", TOKENIZER_FILE: "", TOKENIZER_JSON_FILE: ""}
    module = torch.jit.load(path, map_location=device, _extra_files=files)
    raw = files[CONFIG_FILE]
    if not raw:
        raise ValueError("%s has no %s: not a kvcompress contract model" % (path, CONFIG_FILE))
    cfg = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    tok = files[TOKENIZER_JSON_FILE] or files[TOKENIZER_FILE]
    if isinstance(tok, str):
        tok = tok.encode("latin-1")  # older torch hands back str; keep the raw bytes
    return module, cfg, (tok if tok else None)
