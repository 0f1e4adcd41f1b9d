#!/usr/bin/python3
"""Generate parity cases: random float32 caches, a policy spec, and the reference's output.

Usage: /usr/bin/python3 tests/reference/make_parity_cases.py OUT.bin [--seed N] [--quiet]

The expected outputs come from seed_policies.py (written from ../shared/SEED_ALGORITHMS.md), and
tests/test_parity.cpp checks the C++ registry (kvcompress::make_compressor(spec)) against them.

Binary format (little-endian throughout):
  magic        8 bytes  "KVCPAR01"
  case count   u32
  per case:
    spec       u32 byte length, then that many UTF-8 bytes, e.g. "h2o_l2(start_size=4, ...)"
    layers     u32
    per layer:
      shape    4 x i64  (batch, heads, seq, head_dim) of the input
      keys     float32[batch*heads*seq*head_dim], row-major (contiguous)
      values   float32, same shape
      flag     u8: 1 = the reference returns the layer unchanged (expected == input),
                   0 = an expected output follows
      if flag == 0:
        kept   i64 k
        keys   float32[batch*heads*k*head_dim] expected keys
        values float32, same shape: expected values

Inputs: keys are standard-normal; values are standard-normal except values[..., t, 0] = t (the
token's position), so a kept value row names its source position. An input is redrawn when any
ranking the reference makes has its cut-off (the k-th vs the (k+1)-th score) closer than a
relative 1e-5, so the expected kept set does not depend on rounding or tie order.
"""

import math
import random
import struct
import sys
import time
from fractions import Fraction

import numpy as np
import torch

sys.dont_write_bytecode = True  # run at test time: leave no __pycache__ in the source tree
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import seed_policies as ref  # noqa: E402

MAGIC = b"KVCPAR01"
MAX_SEQ = 300

# Document defaults (used to decide when a parameter may be left out of the spec, which also
# checks that the C++ registry has the same defaults).
DEFAULTS = {
    "l2": [("keep_ratio", 1.0), ("prune_after", 1000), ("skip_layers", [0, 1])],
    "fix_size_l2": [("fix_kv_size", 1024), ("keep_ratio", 0.0), ("strategy", "keep_low"),
                    ("skip_layers", [0, 1])],
    "streaming_llm": [("start_size", 4), ("recent_size", 508), ("skip_layers", [])],
    "h2o_l2": [("start_size", 4), ("heavy_hitter_size", 64), ("recent_size", 444),
               ("skip_layers", [])],
    "snapkv_lite": [("observation_window", 32), ("keep_size", 512), ("pooling_kernel", 5),
                    ("skip_layers", [])],
    "pyramid_kv": [("base_size", 512), ("layer_decay", 0.9), ("min_size", 64),
                   ("profile", "exponential"), ("skip_layers", [])],
    "adaptive_l2": [("target_size", 512), ("soft_limit", 256), ("hard_limit", 1024),
                    ("keep_ratio_min", 0.3), ("keep_ratio_max", 0.9), ("skip_layers", [])],
    "recent_only": [("window_size", 512), ("skip_layers", [0, 1])],
}


class Ambiguous(Exception):
    pass


def margin_observer(scores, k, descending):
    n = scores.size(-1)
    if k <= 0 or k >= n:
        return
    s = scores.double().sort(dim=-1, descending=descending).values
    gap = (s[..., k - 1] - s[..., k]).abs()
    scale = s.abs().amax(dim=-1).clamp(min=1.0)
    if bool((gap <= 1e-5 * scale).any()):
        raise Ambiguous()


def fmt_value(v):
    if isinstance(v, bool):
        raise TypeError("no booleans in specs")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    raise TypeError(type(v))


def make_spec(name, params, rng):
    """Spec string; a parameter equal to its default is sometimes left out."""
    parts = []
    for key, default in DEFAULTS[name]:
        value = params.get(key, default)
        if value == default and type(value) == type(default) and rng.random() < 0.3:
            continue
        parts.append("%s=%s" % (key, fmt_value(value)))
    return "%s(%s)" % (name, ", ".join(parts))


class Builder:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.cases = []
        self.redraws = 0
        self.stats = {}

    def dims(self, small=False):
        r = self.rng
        b = r.choice([1, 1, 1, 2, 2, 3])
        h = r.choice([1, 1, 2, 2, 3, 4])
        d = r.choice([2, 2, 3, 3, 4, 4, 5, 6, 8, 16] if not small else [2, 3, 4])
        return b, h, d

    def random_layer(self, b, h, s, d):
        k = torch.randn(b, h, s, d, generator=self.gen, dtype=torch.float32)
        v = torch.randn(b, h, s, d, generator=self.gen, dtype=torch.float32)
        v[..., 0] = torch.arange(s, dtype=torch.float32).view(1, 1, s)
        return k.contiguous(), v.contiguous()

    def add(self, name, params, seqs, dims=None):
        """One case: layer i has seqs[i] tokens; params are the policy's keyword arguments."""
        seqs = [max(1, min(MAX_SEQ, int(s))) for s in seqs]
        b, h, d = dims if dims is not None else self.dims()
        spec = make_spec(name, params, self.rng)
        fn = ref.POLICIES[name]
        for _ in range(200):
            cache = [self.random_layer(b, h, s, d) for s in seqs]
            try:
                ref.SELECTION_OBSERVER = margin_observer
                out = fn(cache, **params)
            except Ambiguous:
                self.redraws += 1
                continue
            finally:
                ref.SELECTION_OBSERVER = None
            break
        else:
            raise RuntimeError("could not draw an unambiguous cache for " + spec)
        layers = []
        for (k, v), (ok, ov) in zip(cache, out):
            unchanged = ok is k and ov is v
            layers.append((k, v, None if unchanged else (ok.contiguous(), ov.contiguous())))
        self.cases.append((spec, layers))
        st = self.stats.setdefault(name, [0, 0, 0])
        st[0] += 1
        st[1] += len(layers)
        st[2] += sum(1 for l in layers if l[2] is not None)

    def write(self, path):
        with open(path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<I", len(self.cases)))
            for spec, layers in self.cases:
                sb = spec.encode("utf-8")
                f.write(struct.pack("<I", len(sb)))
                f.write(sb)
                f.write(struct.pack("<I", len(layers)))
                for k, v, expected in layers:
                    f.write(struct.pack("<4q", *k.shape))
                    f.write(k.numpy().astype("<f4", copy=False).tobytes())
                    f.write(v.numpy().astype("<f4", copy=False).tobytes())
                    if expected is None:
                        f.write(struct.pack("<B", 1))
                    else:
                        ek, ev = expected
                        f.write(struct.pack("<B", 0))
                        f.write(struct.pack("<q", ek.shape[2]))
                        f.write(ek.numpy().astype("<f4", copy=False).tobytes())
                        f.write(ev.numpy().astype("<f4", copy=False).tobytes())


def around(r, budget, extra=()):
    """Sequence lengths around a budget: at, just above, and a random larger one."""
    c = [budget, budget + 1, r.randint(budget + 2, max(budget + 2, MAX_SEQ))]
    c.extend(extra)
    return [s for s in c if 1 <= s <= MAX_SEQ]


def pick_seqs(r, candidates, n_layers):
    return [r.choice(candidates) for _ in range(n_layers)]


def skip_choice(r, n_layers):
    return r.choice([[], [], [0, 1], [0], [1], [n_layers - 1], [0, 2], [3, 7]])


# ----------------------------------------------------------------------------------------------
# Per-policy case families
# ----------------------------------------------------------------------------------------------

def ceil_sensitive_pairs():
    """(keep_ratio, seq) where ceil of the double product differs from the exact decimal product
    or from a float32 computation (e.g. 0.14 * 50 = 7.000000000000001 -> 8)."""
    out = []
    for hundredths in range(1, 100):
        r = hundredths / 100.0
        for s in range(2, MAX_SEQ + 1):
            d = math.ceil(r * s)
            exact = math.ceil(Fraction(hundredths, 100) * s)
            f32 = math.ceil(float(np.float32(r) * np.float32(s)))
            if d != exact or d != f32:
                out.append((r, s))
    return out


def trunc_sensitive_fix(limit=MAX_SEQ):
    """(fix_kv_size, keep_ratio) where int() of the double product is one below the exact one
    (e.g. 100 * 0.29 = 28.999999999999996 -> 28) or differs from rounding / float32."""
    out = []
    for hundredths in range(1, 100):
        r = hundredths / 100.0
        for fix in range(1, limit):
            d = int(fix * r)
            exact = int(Fraction(hundredths, 100) * fix)
            f32 = int(float(np.float32(fix) * np.float32(r)))
            if d != exact or d != f32:
                out.append((fix, r))
    return out


def gen_l2(B, r):
    sens = ceil_sensitive_pairs()
    up = [(rr, s) for rr, s in sens if math.ceil(rr * s) > math.ceil(Fraction(round(rr * 100), 100) * s)]
    # ceil of a double product just above an integer (0.14*50, 0.7*10 style)
    B.add("l2", dict(keep_ratio=0.14, prune_after=10, skip_layers=[]), [50, 50])
    B.add("l2", dict(keep_ratio=0.7, prune_after=5, skip_layers=[]), [10, 20, 30])
    for _ in range(8):
        rr, s = r.choice(up if r.random() < 0.7 else sens)
        n_layers = r.randint(1, 4)
        seqs = [s] * n_layers
        seqs[r.randrange(n_layers)] = r.randint(1, MAX_SEQ)
        B.add("l2", dict(keep_ratio=rr, prune_after=r.randint(0, s - 1), skip_layers=skip_choice(r, n_layers)), seqs)
    # keep_ratio >= 1.0: everything unchanged
    B.add("l2", dict(keep_ratio=1.0, prune_after=0, skip_layers=[]), [5, 100])
    # (keep_ratio > 1.0, which the document also returns unchanged, and keep_ratio == 0.0, which
    # would keep 0 tokens, are rejected by the C++ parameter validation: not parity cases.)
    # n >= seq (ceil reaches seq) -> unchanged; tiny ratio -> n = 1
    B.add("l2", dict(keep_ratio=0.999, prune_after=0, skip_layers=[]), [300, 250, 2])
    B.add("l2", dict(keep_ratio=0.001, prune_after=0, skip_layers=[]), [300, 1, 2])
    B.add("l2", dict(keep_ratio=0.5, prune_after=0, skip_layers=[]), [1, 2, 3])
    # prune_after boundary: seq == prune_after unchanged, seq == prune_after + 1 compressed
    for pa in [1, 17, 64, 299]:
        B.add("l2", dict(keep_ratio=r.choice([0.1, 0.33, 0.5, 0.9]), prune_after=pa,
                         skip_layers=[]), [pa, pa + 1, min(MAX_SEQ, pa + 2), pa])
    # default skip_layers [0, 1]
    for _ in range(14):
        n_layers = r.randint(1, 4)
        pa = r.randint(0, 200)
        kr = max(0.01, round(r.uniform(0.01, 0.99), r.choice([1, 2, 3])))
        B.add("l2", dict(keep_ratio=kr, prune_after=pa, skip_layers=r.choice([[0, 1], [], [2], [1, 3]])),
              pick_seqs(r, around(r, pa, [r.randint(1, MAX_SEQ)]), n_layers))


def gen_fix_size(B, r):
    sens = trunc_sensitive_fix()
    # int() truncation of a double product just below an integer
    B.add("fix_size_l2", dict(fix_kv_size=100, keep_ratio=0.29, strategy="keep_low", skip_layers=[]), [101, 150, 300])
    B.add("fix_size_l2", dict(fix_kv_size=100, keep_ratio=0.57, strategy="keep_high", skip_layers=[]), [101, 200])
    B.add("fix_size_l2", dict(fix_kv_size=10, keep_ratio=0.7, strategy="keep_low", skip_layers=[]), [11, 12, 40])
    for _ in range(8):
        fix, kr = r.choice(sens)
        fix = min(fix, MAX_SEQ - 2)
        n_layers = r.randint(1, 4)
        B.add("fix_size_l2", dict(fix_kv_size=fix, keep_ratio=kr, strategy=r.choice(["keep_low", "keep_high"]),
                                  skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, fix), n_layers))
    # keep_ratio 0 (no protected tail), 1 (from_zone == 0 -> last fix tokens), fractional
    for kr in [0.0, 0.0, 1.0, 1.0, 0.5, 0.25, 0.9, 0.999, 0.01]:
        fix = r.choice([1, 2, 3, 5, 16, 64, 128, 250])
        n_layers = r.randint(1, 4)
        B.add("fix_size_l2", dict(fix_kv_size=fix, keep_ratio=kr, strategy=r.choice(["keep_low", "keep_high"]),
                                  skip_layers=r.choice([[], [0, 1]])),
              pick_seqs(r, around(r, fix), n_layers))
    # tiny budgets
    B.add("fix_size_l2", dict(fix_kv_size=1, keep_ratio=0.0, strategy="keep_high", skip_layers=[]), [1, 2, 3, 300])
    B.add("fix_size_l2", dict(fix_kv_size=2, keep_ratio=0.5, strategy="keep_low", skip_layers=[]), [2, 3, 4, 100])
    for _ in range(14):
        fix = r.randint(1, 280)
        n_layers = r.randint(1, 4)
        B.add("fix_size_l2", dict(fix_kv_size=fix, keep_ratio=round(r.random(), r.choice([1, 2, 3])),
                                  strategy=r.choice(["keep_low", "keep_high"]),
                                  skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, fix, [r.randint(1, MAX_SEQ)]), n_layers))


def gen_streaming(B, r):
    for start, recent in [(0, 1), (0, 5), (1, 1), (4, 1), (4, 508), (2, 3), (7, 13), (1, 298), (0, 299)]:
        budget = start + recent
        n_layers = r.randint(1, 4)
        B.add("streaming_llm", dict(start_size=start, recent_size=recent, skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, budget), n_layers) if budget < MAX_SEQ else [MAX_SEQ] * n_layers)
    for _ in range(26):
        start = r.choice([0, 1, 2, 4, 4, 8, r.randint(0, 60)])
        recent = r.randint(1, 200)
        budget = start + recent
        n_layers = r.randint(1, 4)
        B.add("streaming_llm", dict(start_size=start, recent_size=recent, skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, budget, [r.randint(1, MAX_SEQ)]), n_layers), dims=B.dims(small=True))


def gen_h2o(B, r):
    fixed = [(0, 0, 1), (0, 1, 1), (4, 0, 3), (1, 1, 1), (4, 64, 200), (2, 10, 5), (0, 20, 1), (3, 50, 2),
             (4, 3, 444)]
    for start, heavy, recent in fixed:
        budget = start + heavy + recent
        n_layers = r.randint(1, 4)
        B.add("h2o_l2", dict(start_size=start, heavy_hitter_size=heavy, recent_size=recent,
                             skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, budget), n_layers) if budget < MAX_SEQ else [MAX_SEQ] * n_layers)
    for _ in range(28):
        start = r.choice([0, 1, 4, 4, r.randint(0, 20)])
        heavy = r.choice([1, 2, 8, r.randint(0, 100)])
        recent = r.randint(1, 120)
        budget = start + heavy + recent
        n_layers = r.randint(1, 4)
        B.add("h2o_l2", dict(start_size=start, heavy_hitter_size=heavy, recent_size=recent,
                             skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, budget, [r.randint(1, MAX_SEQ)]), n_layers))


def gen_snapkv(B, r):
    # keep_size <= observation_window: seq in (keep, obs] unchanged (prefix <= 0), above -> last obs
    B.add("snapkv_lite", dict(observation_window=32, keep_size=20, pooling_kernel=5, skip_layers=[]), [20, 21, 32, 33])
    B.add("snapkv_lite", dict(observation_window=10, keep_size=10, pooling_kernel=3, skip_layers=[]), [10, 11, 100])
    B.add("snapkv_lite", dict(observation_window=1, keep_size=1, pooling_kernel=5, skip_layers=[]), [1, 2, 3, 300])
    B.add("snapkv_lite", dict(observation_window=5, keep_size=2, pooling_kernel=2, skip_layers=[]), [3, 5, 6, 50])
    # prefix < kernel (no pooling) vs prefix == kernel (pooling), even kernels
    for kernel in [2, 3, 4, 5, 6, 7, 8, 9]:
        obs = r.choice([1, 2, 4, 8, 32])
        keep = obs + r.choice([1, 2, 3])
        seqs = [obs + kernel - 1, obs + kernel, obs + kernel + 1, r.randint(obs + kernel, MAX_SEQ)]
        seqs = [max(s, keep + 1) for s in seqs]
        # small (row, head) counts: with prefix == kernel the pooled scores of neighbouring windows
        # can differ by little more than the 1e-6 epsilon, and such draws are redrawn
        B.add("snapkv_lite", dict(observation_window=obs, keep_size=keep, pooling_kernel=kernel, skip_layers=[]),
              seqs, dims=(1, r.choice([1, 2]), r.choice([2, 4, 8])))
    # kernel 1 (no pooling) and 0 (no pooling: "if pooling_kernel > 1")
    B.add("snapkv_lite", dict(observation_window=4, keep_size=30, pooling_kernel=1, skip_layers=[]), [30, 31, 200])
    B.add("snapkv_lite", dict(observation_window=4, keep_size=30, pooling_kernel=0, skip_layers=[]), [30, 31, 200])
    # keep_size 0: m = -observation_window <= 0 -> the last observation_window tokens
    B.add("snapkv_lite", dict(observation_window=3, keep_size=0, pooling_kernel=5, skip_layers=[]), [1, 3, 4, 200])
    # prefix of 1 token (max - norm == 1e-6 score)
    B.add("snapkv_lite", dict(observation_window=8, keep_size=8, pooling_kernel=5, skip_layers=[]), [9, 9])
    for _ in range(24):
        obs = r.choice([1, 2, 4, 8, 16, 32, r.randint(1, 100)])
        keep = r.choice([obs + 1, obs + r.randint(1, 150), r.randint(1, 250)])
        kernel = r.choice([1, 2, 3, 4, 5, 5, 7, r.randint(2, 16)])
        n_layers = r.randint(1, 4)
        extra = [obs + kernel - 1, obs + kernel, r.randint(1, MAX_SEQ)]
        B.add("snapkv_lite", dict(observation_window=obs, keep_size=keep, pooling_kernel=kernel,
                                  skip_layers=skip_choice(r, n_layers)),
              pick_seqs(r, around(r, keep, extra), n_layers))


def gen_pyramid(B, r):
    def add(base, decay, mn, profile, n_layers, skip=None, seqs=None):
        params = dict(base_size=base, layer_decay=decay, min_size=mn, profile=profile,
                      skip_layers=skip if skip is not None else [])
        if seqs is None:
            seqs = []
            for i in range(n_layers):
                size = ref.pyramid_layer_size(i, n_layers, base, decay, mn, profile)
                seqs.append(r.choice(around(r, size, [size - 1, r.randint(1, MAX_SEQ)]) or [MAX_SEQ]))
        B.add("pyramid_kv", params, seqs)

    # int() truncation: 100 * 0.7**2 = 48.99999999999999 -> 48 (an iterated product gives 49)
    add(100, 0.7, 2, "exponential", 4, seqs=[101, 71, 49, 50])
    add(100, 0.7, 2, "exponential", 3, seqs=[300, 300, 49])
    # linear true division: 17 - 1*13/3 = 12.67 -> 12 (integer division would give 13)
    add(17, 0.9, 4, "linear", 4, seqs=[18, 13, 14, 9])
    add(17, 0.9, 4, "linear", 4, seqs=[300, 300, 300, 300])
    # linear with min_size above base (sizes grow), one layer (max(L - 1, 1))
    add(10, 0.9, 40, "linear", 4)
    add(50, 0.9, 10, "linear", 1, seqs=[51])
    add(50, 0.9, 10, "linear", 2)
    # constant; small sizes (start = min(4, size // 8) == 0 below 8; size 2 and 3)
    add(2, 0.5, 2, "constant", 3, seqs=[2, 3, 300])
    add(3, 0.5, 2, "constant", 2, seqs=[4, 50])
    add(8, 0.5, 2, "constant", 3, seqs=[9, 10, 200])
    add(7, 0.5, 2, "constant", 2, seqs=[8, 100])
    add(64, 1.0, 64, "exponential", 4)
    add(512, 0.9, 64, "exponential", 4, seqs=[300, 300, 300, 300])
    # layer_decay above 1 (sizes grow with depth)
    add(20, 1.5, 2, "exponential", 4)
    add(30, 1.1, 8, "exponential", 3, seqs=[31, 33, 37])
    # min_size clamps the exponential decay
    add(256, 0.3, 5, "exponential", 4)
    add(256, 0.5, 2, "exponential", 4)
    for _ in range(22):
        profile = r.choice(["exponential", "exponential", "linear", "linear", "constant"])
        base = r.randint(2, 280)
        mn = r.randint(2, 120)
        decay = r.choice([0.9, 0.8, 0.7, 0.5, 0.95, 1.0, round(r.uniform(0.3, 1.0), 2)])
        n_layers = r.randint(1, 4)
        add(base, decay, mn, profile, n_layers, skip=skip_choice(r, n_layers))


def adaptive_sensitive(r, tries=4000):
    """Parameters + seqs in the soft band where int(seq * ratio) is right at an integer, so the
    exact double evaluation order matters."""
    found = []
    for _ in range(tries):
        soft = r.randint(5, 200)
        hard = r.randint(soft + 1, MAX_SEQ)
        kmin = r.choice([0.3, 0.1, 0.2, 0.5, 0.25, 0.4])
        kmax = r.choice([0.9, 0.8, 0.75, 0.6, 1.0])
        for seq in range(soft + 1, hard + 1):
            progress = (seq - soft) / (hard - soft)
            ratio = kmax - progress * (kmax - kmin)
            d = int(seq * ratio)
            exact = Fraction(seq) * (Fraction(kmax) - Fraction(seq - soft, hard - soft) *
                                     (Fraction(kmax) - Fraction(kmin)))
            alt = int(seq * (kmin + (1 - progress) * (kmax - kmin)))
            if d != int(exact) or d != alt:
                if max(d, soft) < seq:
                    found.append((soft, hard, kmin, kmax, seq))
    return found


def gen_adaptive(B, r):
    def add(target, soft, hard, kmin, kmax, seqs, skip=None):
        B.add("adaptive_l2", dict(target_size=target, soft_limit=soft, hard_limit=hard, keep_ratio_min=kmin,
                                  keep_ratio_max=kmax, skip_layers=skip if skip is not None else []), seqs)

    # soft band, the document's defaults scaled down
    add(64, 32, 128, 0.3, 0.9, [32, 33, 80, 128])
    add(64, 32, 128, 0.3, 0.9, [129, 200, 300, 65])
    # hard limit branch: seq <= target unchanged; target <= 8 -> last target tokens; target 9
    add(200, 20, 50, 0.3, 0.9, [51, 200, 201, 300])
    add(8, 20, 50, 0.3, 0.9, [51, 100])
    add(1, 5, 10, 0.3, 0.9, [11, 300])
    add(5, 5, 10, 0.3, 0.9, [11, 12])
    add(9, 5, 10, 0.3, 0.9, [11, 12, 300])
    add(10, 6, 6, 0.3, 0.9, [6, 7, 50])  # hard == soft: no soft band at all
    add(30, 40, 20, 0.3, 0.9, [40, 41, 300])  # hard < soft
    # soft band with n >= seq (keep_ratio_max 1.0 near the soft limit) and n clamped to soft_limit
    add(100, 50, 300, 0.3, 1.0, [51, 52, 53, 60])
    add(100, 50, 300, 0.0, 0.2, [51, 120, 299, 300])
    add(100, 5, 300, 0.3, 0.9, [6, 7, 8, 9])
    # keep_ratio_min > keep_ratio_max (the ratio grows across the band), zero ratios, skip beyond L
    add(100, 20, 200, 0.8, 0.2, [21, 60, 150, 200])
    add(100, 20, 200, 0.0, 0.0, [21, 60, 150, 200], skip=[9])
    add(100, 20, 200, 1.0, 1.0, [21, 60, 150, 200])
    # truncation-sensitive soft-band sizes
    sens = adaptive_sensitive(r)
    for _ in range(10):
        soft, hard, kmin, kmax, seq = r.choice(sens)
        add(r.randint(1, 300), soft, hard, kmin, kmax, [seq, seq, r.randint(1, MAX_SEQ)], skip=[])
    for _ in range(16):
        soft = r.randint(5, 250)
        hard = r.choice([soft + r.randint(1, 100), soft + r.randint(0, 5), r.randint(5, MAX_SEQ)])
        target = r.choice([r.randint(1, 300), r.randint(1, 20), soft, hard])
        kmin = round(r.uniform(0.0, 0.6), 2)
        kmax = round(r.uniform(kmin, 1.0), 2)
        n_layers = r.randint(1, 4)
        seqs = [r.choice([soft, soft + 1, hard, hard + 1, r.randint(soft + 1, MAX_SEQ), r.randint(1, MAX_SEQ)])
                for _ in range(n_layers)]
        add(target, soft, hard, kmin, kmax, seqs, skip=skip_choice(r, n_layers))


def gen_recent(B, r):
    for w in [1, 2, 3, 5, 64, 299]:
        n_layers = r.randint(1, 4)
        B.add("recent_only", dict(window_size=w, skip_layers=r.choice([[], [0, 1]])),
              pick_seqs(r, around(r, w), n_layers), dims=B.dims(small=True))
    for _ in range(24):
        w = r.randint(1, 280)
        n_layers = r.randint(1, 4)
        B.add("recent_only", dict(window_size=w, skip_layers=skip_choice(r, n_layers) if r.random() < 0.7 else [0, 1]),
              pick_seqs(r, around(r, w, [r.randint(1, MAX_SEQ)]), n_layers), dims=B.dims(small=True))


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_path = argv[1]
    seed = 20240611
    quiet = "--quiet" in argv
    if "--seed" in argv:
        seed = int(argv[argv.index("--seed") + 1])
    t0 = time.time()
    torch.set_num_threads(1)
    B = Builder(seed)
    r = random.Random(seed + 1)
    for fam in [gen_l2, gen_fix_size, gen_streaming, gen_h2o, gen_snapkv, gen_pyramid, gen_adaptive, gen_recent]:
        fam(B, r)
    B.write(out_path)
    if not quiet:
        import os
        for name, (c, l, changed) in sorted(B.stats.items()):
            print("%-14s %4d cases %4d layers (%d compressed)" % (name, c, l, changed))
        total_layers = sum(len(layers) for _, layers in B.cases)
        print("total: %d cases, %d layers, %d redraws for near-tied cut-offs, %.1f MB, %.1f s -> %s" % (
            len(B.cases), total_layers, B.redraws, os.path.getsize(out_path) / 1e6, time.time() - t0, out_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
