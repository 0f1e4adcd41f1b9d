"""Reference implementation of the eight KV-cache policies of the Python course project.

Written from ../shared/SEED_ALGORITHMS.md only (not from the C++ sources), in the style of the
course project: every function takes ``past_key_values``, a list of ``(keys, values)`` tuples of
shape ``[batch, heads, seq, head_dim]``, and returns a new list of the same form.  A layer that is
"returned unchanged" is the very same tuple object that came in.

Common rules implemented here:
- scores are the L2 norms of the *key* vectors over head_dim (``torch.norm(k, p=2, dim=-1)``);
- selection is per (batch row, head), the same count for every (row, head) of a layer;
- "smallest k" = sort ascending, take the first k, re-sort the positions ascending (kept tokens
  come out in temporal order); "largest k" likewise with a descending sort;
- ``int()`` truncation and ``math.ceil`` of double-precision products, computed as written;
- "the last n tokens" is ``x[:, :, -n:, :]``; callers never reach it with n == 0 (the quirk that
  would return everything), except where the document says "none" explicitly, which is guarded.

``SELECTION_OBSERVER`` (None by default) is a hook for test generators: when set, it is called as
``SELECTION_OBSERVER(scores, k, descending)`` for every ranking this module makes, so a generator
can reject inputs whose cut-off is too close to a tie to be well defined.
"""

import math

import torch
import torch.nn.functional as F

SELECTION_OBSERVER = None


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _key_norms(k):
    """L2 norm of every key vector over head_dim: [B, H, S, D] -> [B, H, S]."""
    return torch.norm(k, p=2, dim=-1)


def _select(scores, n, descending=False):
    """Positions of the n smallest (or largest) scores of every (row, head), in temporal order.

    scores: [B, H, S].  Returns a LongTensor [B, H, n].
    """
    if SELECTION_OBSERVER is not None:
        SELECTION_OBSERVER(scores, n, descending)
    order = torch.sort(scores, dim=-1, descending=descending).indices
    chosen = order[..., :n]
    chosen, _ = torch.sort(chosen, dim=-1)
    return chosen


def _gather(x, idx, offset=0):
    """Tokens of x [B, H, S, D] at positions idx [B, H, n] (+ offset) -> [B, H, n, D]."""
    idx = idx + offset
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.size(-1)))


def _last(x, n):
    """The last n tokens (Python slicing; n must be > 0 here)."""
    assert n > 0, "the reference never asks for the last 0 tokens (slicing quirk)"
    return x[:, :, -n:, :]


def _first(x, n):
    return x[:, :, :n, :]


def _start_middle_recent(k, v, start, middle_keep, recent):
    """First `start`, the smallest-norm min(middle_keep, len) of [start, seq - recent), last `recent`.

    Shared by h2o_l2, pyramid_kv and the hard-limit branch of adaptive_l2.
    """
    seq = k.size(2)
    mid_end = seq - recent
    if mid_end <= start:
        # empty middle: first `start` + last `recent`
        return (torch.cat([_first(k, start), _last(k, recent)], dim=2),
                torch.cat([_first(v, start), _last(v, recent)], dim=2))
    middle_k = k[:, :, start:mid_end, :]
    norms = _key_norms(middle_k)
    n = min(middle_keep, mid_end - start)
    idx = _select(norms, n)
    k_parts = [_first(k, start), _gather(k, idx, start), _last(k, recent)]
    v_parts = [_first(v, start), _gather(v, idx, start), _last(v, recent)]
    return torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2)


# ----------------------------------------------------------------------------------------------
# l2 (KnormPress)
# ----------------------------------------------------------------------------------------------

def l2_compress(past_key_values, keep_ratio=1.0, prune_after=1000, skip_layers=[0, 1]):
    if keep_ratio >= 1.0:
        return list(past_key_values)
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= prune_after:
            out.append((k, v))
            continue
        n = math.ceil(keep_ratio * seq)
        if n >= seq:
            out.append((k, v))
            continue
        norms = _key_norms(k)
        idx = _select(norms, n)
        out.append((_gather(k, idx), _gather(v, idx)))
    return out


# ----------------------------------------------------------------------------------------------
# fix_size_l2
# ----------------------------------------------------------------------------------------------

def fix_size_l2_compress(past_key_values, fix_kv_size=1024, keep_ratio=0.0, strategy="keep_low",
                         skip_layers=[0, 1], generator=None):
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= fix_kv_size:
            out.append((k, v))
            continue
        protected = min(int(fix_kv_size * keep_ratio), seq)
        zone_end = seq - protected
        from_zone = fix_kv_size - protected
        if from_zone <= 0:
            out.append((_last(k, protected), _last(v, protected)))
            continue
        if zone_end <= from_zone:
            out.append((k, v))
            continue
        zone_k = k[:, :, :zone_end, :]
        if strategy == "keep_low":
            idx = _select(_key_norms(zone_k), from_zone, descending=False)
        elif strategy == "keep_high":
            idx = _select(_key_norms(zone_k), from_zone, descending=True)
        elif strategy == "random":
            b, h = k.size(0), k.size(1)
            noise = torch.rand(b, h, zone_end, generator=generator)
            idx = torch.sort(torch.argsort(noise, dim=-1)[..., :from_zone], dim=-1).values
        else:
            raise ValueError("unknown strategy %r" % (strategy,))
        k_parts = [_gather(k, idx)]
        v_parts = [_gather(v, idx)]
        if protected > 0:
            k_parts.append(_last(k, protected))
            v_parts.append(_last(v, protected))
        out.append((torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2)))
    return out


# ----------------------------------------------------------------------------------------------
# streaming_llm
# ----------------------------------------------------------------------------------------------

def streaming_llm_compress(past_key_values, start_size=4, recent_size=508, skip_layers=[]):
    budget = start_size + recent_size
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= budget:
            out.append((k, v))
            continue
        out.append((torch.cat([_first(k, start_size), _last(k, recent_size)], dim=2),
                    torch.cat([_first(v, start_size), _last(v, recent_size)], dim=2)))
    return out


# ----------------------------------------------------------------------------------------------
# h2o_l2
# ----------------------------------------------------------------------------------------------

def h2o_l2_compress(past_key_values, start_size=4, heavy_hitter_size=64, recent_size=444,
                    skip_layers=[]):
    budget = start_size + heavy_hitter_size + recent_size
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= budget:
            out.append((k, v))
            continue
        out.append(_start_middle_recent(k, v, start_size, heavy_hitter_size, recent_size))
    return out


# ----------------------------------------------------------------------------------------------
# snapkv_lite
# ----------------------------------------------------------------------------------------------

def snapkv_lite_compress(past_key_values, observation_window=32, keep_size=512, pooling_kernel=5,
                         skip_layers=[]):
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= keep_size:
            out.append((k, v))
            continue
        prefix = seq - observation_window
        if prefix <= 0:
            out.append((k, v))
            continue
        b, h = k.size(0), k.size(1)
        norms = _key_norms(k[:, :, :prefix, :])  # [B, H, prefix], tensor dtype
        scores = (norms.max(dim=-1, keepdim=True).values + 1e-6) - norms
        if pooling_kernel > 1 and prefix >= pooling_kernel:
            pooled = F.avg_pool1d(scores.reshape(b * h, 1, prefix), kernel_size=pooling_kernel,
                                  stride=1, padding=pooling_kernel // 2, count_include_pad=True)
            scores = pooled[..., :prefix].reshape(b, h, prefix)
        m = min(keep_size - observation_window, prefix)
        if m <= 0:
            out.append((_last(k, observation_window), _last(v, observation_window)))
            continue
        idx = _select(scores, m, descending=True)
        out.append((torch.cat([_gather(k, idx), _last(k, observation_window)], dim=2),
                    torch.cat([_gather(v, idx), _last(v, observation_window)], dim=2)))
    return out


# ----------------------------------------------------------------------------------------------
# pyramid_kv
# ----------------------------------------------------------------------------------------------

def pyramid_layer_size(i, num_layers, base_size, layer_decay, min_size, profile):
    if profile == "exponential":
        size = int(base_size * layer_decay ** i)
    elif profile == "linear":
        size = int(base_size - i * (base_size - min_size) / max(num_layers - 1, 1))
    elif profile == "constant":
        size = base_size
    else:
        raise ValueError("unknown profile %r" % (profile,))
    return max(size, min_size)


def pyramid_kv_compress(past_key_values, base_size=512, layer_decay=0.9, min_size=64,
                        profile="exponential", skip_layers=[]):
    num_layers = len(past_key_values)
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        size = pyramid_layer_size(layer, num_layers, base_size, layer_decay, min_size, profile)
        if layer in skip_layers or seq <= size:
            out.append((k, v))
            continue
        start = min(4, size // 8)
        recent = size // 2
        middle_keep = size - start - recent
        if middle_keep <= 0:
            out.append((_last(k, size), _last(v, size)))
            continue
        if seq - recent <= start:
            out.append((torch.cat([_first(k, start), _last(k, size - start)], dim=2),
                        torch.cat([_first(v, start), _last(v, size - start)], dim=2)))
            continue
        out.append(_start_middle_recent(k, v, start, middle_keep, recent))
    return out


# ----------------------------------------------------------------------------------------------
# adaptive_l2
# ----------------------------------------------------------------------------------------------

def adaptive_l2_compress(past_key_values, target_size=512, soft_limit=256, hard_limit=1024,
                         keep_ratio_min=0.3, keep_ratio_max=0.9, skip_layers=[]):
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= soft_limit:
            out.append((k, v))
            continue
        if seq > hard_limit:
            if seq <= target_size:
                out.append((k, v))
                continue
            start = 4
            recent = target_size // 2
            middle_keep = target_size - 4 - recent
            if middle_keep <= 0:
                out.append((_last(k, target_size), _last(v, target_size)))
                continue
            if seq - recent <= start:
                out.append((torch.cat([_first(k, 4), _last(k, target_size - 4)], dim=2),
                            torch.cat([_first(v, 4), _last(v, target_size - 4)], dim=2)))
                continue
            out.append(_start_middle_recent(k, v, start, middle_keep, recent))
            continue
        # soft band: soft_limit < seq <= hard_limit
        progress = (seq - soft_limit) / (hard_limit - soft_limit)
        ratio = keep_ratio_max - progress * (keep_ratio_max - keep_ratio_min)
        n = max(int(seq * ratio), soft_limit)
        if n >= seq:
            out.append((k, v))
            continue
        protected = int(n * 0.2)
        history = n - protected
        if history <= 0:
            out.append((_last(k, n), _last(v, n)))
            continue
        end = seq - protected
        if end <= history:
            out.append((k, v))
            continue
        idx = _select(_key_norms(k[:, :, :end, :]), history)
        k_parts = [_gather(k, idx)]
        v_parts = [_gather(v, idx)]
        if protected > 0:
            k_parts.append(_last(k, protected))
            v_parts.append(_last(v, protected))
        out.append((torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2)))
    return out


# ----------------------------------------------------------------------------------------------
# recent_only
# ----------------------------------------------------------------------------------------------

def recent_only_compress(past_key_values, window_size=512, skip_layers=[0, 1]):
    out = []
    for layer, (k, v) in enumerate(past_key_values):
        seq = k.size(2)
        if layer in skip_layers or seq <= window_size:
            out.append((k, v))
            continue
        out.append((_last(k, window_size), _last(v, window_size)))
    return out


POLICIES = {
    "l2": l2_compress,
    "fix_size_l2": fix_size_l2_compress,
    "streaming_llm": streaming_llm_compress,
    "h2o_l2": h2o_l2_compress,
    "snapkv_lite": snapkv_lite_compress,
    "pyramid_kv": pyramid_kv_compress,
    "adaptive_l2": adaptive_l2_compress,
    "recent_only": recent_only_compress,
}
