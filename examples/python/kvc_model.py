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
  save_contract_model    script + save with kvc/config.json (+ kvc/tokenizer.model)
  load_contract_model    load a contract file with its extra files
"""

import dataclasses
import json
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTRACT_VERSION = 1
CONFIG_FILE = "kvc/config.json"
TOKENIZER_FILE = "kvc/tokenizer.model"
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


def rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rotary_ndims: int) -> Tensor:
    """Rotate the first rotary_ndims dims of each head (GPT-NeoX partial rotary).

    cos/sin are float32 [B, 1, T, rotary_ndims]; they are cast to x's dtype here (not by the
    caller) because under autocast q/k come out of the Linear in a lower precision."""
    if rotary_ndims == 0:
        return x
    x_rot = x[..., :rotary_ndims]
    x_pass = x[..., rotary_ndims:]
    c = cos.to(x.dtype)
    s = sin.to(x.dtype)
    return torch.cat((x_rot * c + rotate_half(x_rot) * s, x_pass), dim=-1)


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

    def masked(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Attention over whole cache buffers; allowed [T, C] bool, True = may attend."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        scores = scores.masked_fill(allowed.logical_not(), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)


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

    def masked(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Attention over whole cache buffers; allowed [T, C] bool, True = may attend."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def make_attention_core(kind: str, head_dim: int) -> nn.Module:
    if kind == "portable":
        return PortableAttention(head_dim)
    if kind == "sdpa":
        if not hasattr(F, "scaled_dot_product_attention"):
            raise RuntimeError("attention 'sdpa' needs PyTorch >= 2.0 (this is %s); use 'portable'"
                               % torch.__version__)
        return SdpaAttention(head_dim)
    raise ValueError("attention must be one of %s, got %r" % (ATTENTION_KINDS, kind))


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
        """x [B, T, hidden] -> q, k, v [B, H, T, D], with q and k rotated."""
        b = x.size(0)
        t = x.size(1)
        # HF layout: per head, the fused output holds [q | k | v] of head_dim each.
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        d = self.head_dim
        q = apply_rotary(qkv[..., :d], cos, sin, self.rotary_ndims)
        k = apply_rotary(qkv[..., d:2 * d], cos, sin, self.rotary_ndims)
        v = qkv[..., 2 * d:]
        return q, k, v

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


class NeoXLayer(nn.Module):
    def __init__(self, cfg: KVCConfig, index: int, attention: str, factory: Dict):
        super().__init__()
        self.layer_index = index
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **factory)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **factory)
        self.attention = NeoXAttention(cfg, attention, factory)
        self.mlp = NeoXMLP(cfg, factory)

    def residual(self, x: Tensor, attn_out: Tensor) -> Tensor:
        # Summation order follows HF (mlp + attn + x) so low-precision results match closely.
        if self.use_parallel_residual:
            mlp_out = self.mlp(self.post_attention_layernorm(x))
            return mlp_out + attn_out + x
        h = attn_out + x
        return self.mlp(self.post_attention_layernorm(h)) + h

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
             slots: Tensor) -> Tensor:
        """Writes the new tokens' keys/values into the caller's buffers at `slots` ([T] int64,
        on the device) and attends to every slot up to each token's own. Static shapes, no
        host synchronisation: capturable in a CUDA graph."""
        q, k, v = self.attention.project(self.input_layernorm(x), cos, sin)
        key_buffer.index_copy_(2, slots, k)
        value_buffer.index_copy_(2, slots, v)
        cols = torch.arange(key_buffer.size(2), device=x.device).unsqueeze(0)
        allowed = cols <= slots.unsqueeze(1)
        o = self.attention.core.masked(q, key_buffer, value_buffer, allowed)
        return self.residual(x, self.attention.merge(o))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor,
                past_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        self.check_past(x, past_k, past_v)
        q, k, v = self.attention.project(self.input_layernorm(x), cos, sin)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        o = self.attention.core(q, k, v, past_k.size(2))
        return self.residual(x, self.attention.merge(o)), k, v


class KVCModel(nn.Module):
    """GPT-NeoX causal LM with an explicit, caller-managed KV cache (contract version 1)."""

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

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_keys: List[Tensor],
                past_values: List[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        if input_ids.dim() != 2 or position_ids.size() != input_ids.size():
            raise RuntimeError("kvc model: input_ids {} and position_ids {} must both be [B, T]"
                               .format(input_ids.size(), position_ids.size()))
        if len(past_keys) != self.num_layers or len(past_values) != self.num_layers:
            raise RuntimeError("kvc model: got {} past_keys and {} past_values, expected {} each"
                               .format(len(past_keys), len(past_values), self.num_layers))
        x = self.embed_in(input_ids)
        cos, sin = self.rotary_tables(position_ids)
        new_keys: List[Tensor] = []
        new_values: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past_keys[i], past_values[i])
            new_keys.append(k)
            new_values.append(v)
        logits = self.embed_out(self.final_layer_norm(x)).float()
        return logits, new_keys, new_values

    @torch.jit.export
    def step(self, input_ids: Tensor, position_ids: Tensor, key_buffers: List[Tensor],
             value_buffers: List[Tensor], lengths: Tensor) -> Tensor:
        """Contract `step` (fixed-capacity caches): layer i's cache lives in caller-owned
        buffers [B, H, C_i, D] whose first lengths[i] slots are valid (lengths: int64
        [num_layers] on the model's device). The T new tokens' keys/values are written to slots
        lengths[i] .. lengths[i] + T - 1; each token attends to the valid slots and the new ones
        up to itself. Returns float32 logits [B, T, vocab]; the caller advances its lengths."""
        if len(key_buffers) != self.num_layers or len(value_buffers) != self.num_layers:
            raise RuntimeError("kvc model: got {} key and {} value buffers, expected {} each"
                               .format(len(key_buffers), len(value_buffers), self.num_layers))
        x = self.embed_in(input_ids)
        cos, sin = self.rotary_tables(position_ids)
        offsets = torch.arange(input_ids.size(1), device=input_ids.device)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cos, sin, key_buffers[i], value_buffers[i], lengths[i] + offsets)
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
    cos, sin = model.rotary_tables(pos)
    x = model.embed_in(ids)
    for layer in model.layers:
        q, k, v = layer.attention.project(layer.input_layernorm(x), cos, sin)
        x = layer.residual(x, layer.attention.merge(_causal_attention(q, k, v)))
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
        "num_parameters": sum(p.numel() for p in model.parameters()),
    })
    if extra:
        cfg.update(extra)
    return cfg


def save_contract_model(model, path: str, config: Optional[Dict] = None,
                        tokenizer_bytes: Optional[bytes] = None):
    """Script (if needed) and save model to path with kvc/config.json and, when given,
    kvc/tokenizer.model. config holds extra keys for config.json (e.g. "source").
    Returns the scripted module."""
    scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model.eval())
    extra = dict(config or {})
    extra["tokenizer"] = TOKENIZER_FILE if tokenizer_bytes is not None else extra.get("tokenizer")
    cfg = contract_config(model, extra)
    files = {CONFIG_FILE: json.dumps(cfg, indent=2, sort_keys=True) + "\n"}
    if tokenizer_bytes is not None:
        files[TOKENIZER_FILE] = bytes(tokenizer_bytes)
    torch.jit.save(scripted, path, _extra_files=files)
    return scripted


def load_contract_model(path: str, device: str = "cpu"):
    """(module, config dict, tokenizer bytes or None) from a contract file."""
    files = {CONFIG_FILE: "", TOKENIZER_FILE: ""}
    module = torch.jit.load(path, map_location=device, _extra_files=files)
    raw = files[CONFIG_FILE]
    if not raw:
        raise ValueError("%s has no %s: not a kvcompress contract model" % (path, CONFIG_FILE))
    cfg = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    tok = files[TOKENIZER_FILE]
    if isinstance(tok, str):
        tok = tok.encode("latin-1")  # older torch hands back str; keep the raw bytes
    return module, cfg, (tok if tok else None)
