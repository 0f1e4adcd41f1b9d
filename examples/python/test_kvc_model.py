#!/usr/bin/env python3
"""Checks of the kvcompress model contract on tiny random GPT-NeoX models (CPU, seconds).

Run with `python3 examples/python/test_kvc_model.py` (prints 'N passed, N failed') or with
pytest. Covers: scripting, prefill == token-by-token == chunked decode, caches of different
length per layer against an independent naive implementation, dtype moves, save/reload with
extra files, Hugging Face name mapping, and the rotary re-rotation identity that the
driver's `cache` position mode relies on.
"""

import copy
import math
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvc_model as km  # noqa: E402


def tiny_config(**over):
    cfg = dict(num_layers=3, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=97,
               rotary_pct=0.25, bos_token_id=1, eos_token_id=2, model_name="tiny-test")
    cfg.update(over)
    return km.KVCConfig(**cfg)


def tiny_model(seed=0, attention="portable", **over):
    torch.manual_seed(seed)
    m = km.KVCModel(tiny_config(**over), attention=attention).eval()
    # Larger than default init so attention is far from uniform and errors would show.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return m


def run(model, ids, pos, pk, pv):
    with torch.no_grad():
        return model(ids, pos, pk, pv)


# ---------------------------------------------------------------------------------------
# An independent, deliberately naive reference: per token, per head, plain loops, rotary by
# rotating coordinate pairs (i, i + r/2) through angle pos * base^(-2i/r). It shares only the
# weights with the module under test.

def naive_rotate(x, pos, r, base):
    out = x.clone()
    half = r // 2
    for i in range(half):
        theta = pos * base ** (-2.0 * i / r)
        c, s = math.cos(theta), math.sin(theta)
        a, b = x[i].item(), x[i + half].item()
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def naive_decode(model, tokens, positions, visible):
    """Logits (float64) of the last token. visible[layer] = indices of earlier tokens the last
    token may attend to in that layer (all earlier tokens attend causally to everything)."""
    m = model.double()
    H, D, r = m.num_heads, m.head_dim, m.rotary_ndims
    n = len(tokens)
    keys = [[None] * n for _ in m.layers]
    vals = [[None] * n for _ in m.layers]
    x_last = None
    with torch.no_grad():
        for t in range(n):
            x = m.embed_in.weight[tokens[t]].clone()
            for li, layer in enumerate(m.layers):
                h = torch.nn.functional.layer_norm(x, (x.numel(),), layer.input_layernorm.weight,
                                                   layer.input_layernorm.bias, layer.input_layernorm.eps)
                qkv = layer.attention.query_key_value(h).view(H, 3 * D)
                heads = []
                keys[li][t] = [None] * H
                vals[li][t] = [None] * H
                for hd in range(H):
                    q = naive_rotate(qkv[hd, :D], positions[t], r, m.rotary_base)
                    keys[li][t][hd] = naive_rotate(qkv[hd, D:2 * D], positions[t], r, m.rotary_base)
                    vals[li][t][hd] = qkv[hd, 2 * D:]
                    seen = list(range(t)) if t < n - 1 else list(visible[li])
                    seen = seen + [t]
                    scores = torch.stack([q.dot(keys[li][j][hd]) / math.sqrt(D) for j in seen])
                    w = torch.softmax(scores, 0)
                    heads.append(sum(w[i] * vals[li][j][hd] for i, j in enumerate(seen)))
                attn = layer.attention.dense(torch.cat(heads))
                ln2 = layer.post_attention_layernorm
                mlp = layer.mlp(torch.nn.functional.layer_norm(x, (x.numel(),), ln2.weight, ln2.bias, ln2.eps))
                x = mlp + attn + x
            x_last = x
        ln = m.final_layer_norm
        out = m.embed_out(torch.nn.functional.layer_norm(x_last, (x_last.numel(),), ln.weight, ln.bias, ln.eps))
    m.float()
    return out


# ---------------------------------------------------------------------------------------

def test_scripts_and_exposes_contract_attributes():
    m = tiny_model()
    s = torch.jit.script(m)
    expect = dict(kvc_contract_version=5, model_name="tiny-test", num_layers=3, num_heads=4, head_dim=16,
                  hidden_size=64, vocab_size=97, rotary_ndims=4, rotary_base=10000.0, max_positions=2048,
                  bos_token_id=1, eos_token_id=2)
    for k, v in expect.items():
        got = getattr(s, k)
        assert got == v and type(got) is type(v), (k, got, v)


def test_prefill_equals_token_by_token_and_chunks():
    m = tiny_model(1)
    s = torch.jit.script(m)
    B, T = 2, 24
    ids = torch.randint(0, 97, (B, T))
    pos = torch.arange(T).expand(B, T)
    full, fk, fv = run(s, ids, pos, *km.empty_cache(s, B))
    assert full.dtype == torch.float32 and full.shape == (B, T, 97)
    assert all(k.shape == (B, 4, T, 16) for k in fk + fv)

    pk, pv = km.empty_cache(s, B)
    steps = []
    for t in range(T):
        logits, pk, pv = run(s, ids[:, t:t + 1], pos[:, t:t + 1], pk, pv)
        steps.append(logits)
    diff = (torch.cat(steps, 1) - full).abs().max().item()
    assert diff < 1e-4, diff
    assert max((a - b).abs().max().item() for a, b in zip(pk, fk)) < 1e-5  # same cached keys

    h = T // 2
    a, pk, pv = run(s, ids[:, :h], pos[:, :h], *km.empty_cache(s, B))
    b, pk, pv = run(s, ids[:, h:], pos[:, h:], pk, pv)
    diff = (torch.cat([a, b], 1) - full).abs().max().item()
    assert diff < 1e-4, diff


def test_step_writes_caller_buffers_and_matches_forward():
    """`step` (fixed-capacity buffers) gives forward's logits and writes forward's keys/values
    into the slots after each layer's length, also when layers hold different lengths."""
    m = tiny_model(5)
    s = torch.jit.script(m)
    B, T, C = 2, 12, 20
    ids = torch.randint(0, 97, (B, T))
    pos = torch.arange(T).expand(B, T)
    full, fk, fv = run(s, ids, pos, *km.empty_cache(s, B))
    kb = [torch.full((B, 4, C, 16), 7.0) for _ in range(3)]  # stale data must be ignored
    vb = [torch.full((B, 4, C, 16), 7.0) for _ in range(3)]
    lengths = torch.zeros(3, dtype=torch.long)
    out = [s.step(ids[:, :5], pos[:, :5], kb, vb, lengths)]
    assert lengths.tolist() == [0, 0, 0]  # the caller advances lengths, not the model
    lengths += 5
    for t in range(5, T):
        out.append(s.step(ids[:, t:t + 1], pos[:, t:t + 1], kb, vb, lengths))
        lengths += 1
    assert (torch.cat(out, 1) - full).abs().max().item() < 1e-4
    for i in range(3):
        assert (kb[i][:, :, :T] - fk[i]).abs().max().item() < 1e-5
        assert (vb[i][:, :, :T] - fv[i]).abs().max().item() < 1e-5
        assert (kb[i][:, :, T:] == 7.0).all()  # nothing written past the new tokens
    # Per-layer lengths: layer 1 keeps only the last 4 slots of its cache, compacted to the front.
    kb[1][:, :, :4] = kb[1][:, :, T - 4:T].clone()
    vb[1][:, :, :4] = vb[1][:, :, T - 4:T].clone()
    lengths = torch.tensor([T, 4, T])
    nxt = torch.randint(0, 97, (B, 1))
    got = s.step(nxt, torch.full((B, 1), T), kb, vb, lengths)
    pk = [fk[0], fk[1][:, :, T - 4:], fk[2]]
    pv = [fv[0], fv[1][:, :, T - 4:], fv[2]]
    want, _, _ = run(s, nxt, torch.full((B, 1), T), pk, pv)
    assert (got - want).abs().max().item() < 1e-4


def test_scored_methods_report_attention_and_queries():
    """Contract version 3. forward_scored: logits and cache equal forward's; the attention mass
    of a prefill equals the sum of the masses of the same tokens fed one by one (each query's
    row sums to 1, masked slots get 0); the queries are the last ones. step_scored with empty
    lists is step bitwise; with buffers it accumulates decay * mass + new mass per slot, leaves
    slots past the valid ones at 0, and writes the ring of recent queries."""
    m = tiny_model(7)
    s = torch.jit.script(m)
    B, T, W, C = 2, 9, 3, 12
    ids = torch.randint(0, 97, (B, T))
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        full = s(ids, pos, *km.empty_cache(s, B))
        lg, fk, fv, mass, queries = s.forward_scored(ids, pos, *km.empty_cache(s, B), True, W, [])
        assert torch.equal(lg, full[0]) and all(torch.equal(a, b) for a, b in zip(fk, full[1]))
        assert len(mass) == 3 and all(x.shape == (B, 4, T) and x.dtype == torch.float32 for x in mass)
        assert all((x.sum(-1) - T).abs().max().item() < 1e-4 for x in mass)
        assert all(q.shape == (B, 4, W, 16) for q in queries)
        _, _, _, none_mass, none_q = s.forward_scored(ids, pos, *km.empty_cache(s, B), False, 0, [])
        assert none_mass == [] and none_q == []

        pk, pv = km.empty_cache(s, B)
        summed = [torch.zeros(B, 4, T) for _ in range(3)]
        steps = []
        for t in range(T):
            _, pk, pv, mt, qt = s.forward_scored(ids[:, t:t + 1], pos[:, t:t + 1], pk, pv, True, W, [])
            steps.append((mt, qt))
            for i in range(3):
                summed[i][:, :, :t + 1] += mt[i]
        for i in range(3):
            assert (summed[i] - mass[i]).abs().max().item() < 1e-5
            assert (torch.cat([steps[t][1][i] for t in range(T - W, T)], 2) - queries[i]).abs().max().item() < 1e-5

        kb = [torch.zeros(B, 4, C, 16) for _ in range(3)]
        vb = [torch.zeros(B, 4, C, 16) for _ in range(3)]
        kb2 = [x.clone() for x in kb]
        vb2 = [x.clone() for x in vb]
        ab = [torch.zeros(B, 4, C) for _ in range(3)]
        qb = [torch.zeros(B, 4, W, 16) for _ in range(3)]
        decay = 0.75
        for t in range(T):
            lengths = torch.full((3,), t, dtype=torch.long)
            plain = s.step(ids[:, t:t + 1], pos[:, t:t + 1], kb, vb, lengths)
            scored = s.step_scored(ids[:, t:t + 1], pos[:, t:t + 1], kb2, vb2, lengths, [], 1.0, [],
                                   lengths[:0], [])
            assert torch.equal(plain, scored)
        for t in range(T):
            lengths = torch.full((3,), t, dtype=torch.long)
            s.step_scored(ids[:, t:t + 1], pos[:, t:t + 1], kb2, vb2, lengths, ab, decay, qb,
                          torch.tensor([t % W]), [])
        for i in range(3):
            want = torch.zeros(B, 4, T)
            for t in range(T):
                want = want * decay
                want[:, :, :t + 1] += steps[t][0][i]
            assert (ab[i][:, :, :T] - want).abs().max().item() < 1e-5
            assert (ab[i][:, :, T:] == 0).all()
            ring = torch.cat([steps[t][1][i] for t in range(T - W, T)], 2)
            order = [t % W for t in range(T - W, T)]
            assert (qb[i][:, :, order] - ring).abs().max().item() < 1e-5


def test_slot_bias_hides_slots_per_head():
    """Contract version 4. A slot hidden from every head (slot_bias -inf) is as if it were not
    in the cache, in forward_scored and step_scored alike; hidden from one head, only that head's
    attention misses it."""
    m = tiny_model(8)
    s = torch.jit.script(m)
    B, P, C = 2, 7, 10
    ids = torch.randint(0, 97, (B, P + 1))
    pos = torch.arange(P + 1).expand(B, P + 1)
    hide = 3
    with torch.no_grad():
        _, pk, pv = s(ids[:, :P], pos[:, :P], *km.empty_cache(s, B))
        keep = [i for i in range(P) if i != hide]
        want, _, _ = s(ids[:, P:], pos[:, P:], [k[:, :, keep] for k in pk], [v[:, :, keep] for v in pv])
        bias = [torch.zeros(B, 4, P) for _ in range(3)]
        for b in bias:
            b[:, :, hide] = float("-inf")
        got, _, _, mass, _ = s.forward_scored(ids[:, P:], pos[:, P:], pk, pv, True, 0, bias)
        assert (got - want).abs().max().item() < 1e-5
        assert all((x[:, :, hide] == 0).all() for x in mass)
        kb = [torch.zeros(B, 4, C, 16) for _ in range(3)]
        vb = [torch.zeros(B, 4, C, 16) for _ in range(3)]
        for i in range(3):
            kb[i][:, :, :P] = pk[i]
            vb[i][:, :, :P] = pv[i]
        step_bias = [torch.zeros(B, 4, C) for _ in range(3)]
        for b in step_bias:
            b[:, :, hide] = float("-inf")
        lengths = torch.full((3,), P, dtype=torch.long)
        got = s.step_scored(ids[:, P:], pos[:, P:], kb, vb, lengths, [], 1.0, [], lengths[:0], step_bias)
        assert (got - want).abs().max().item() < 1e-5
        one = [torch.zeros(B, 4, P) for _ in range(3)]
        for b in one:
            b[:, 0, hide] = float("-inf")
        _, _, _, mass, _ = s.forward_scored(ids[:, P:], pos[:, P:], pk, pv, True, 0, one)
        assert all((x[:, 0, hide] == 0).all() and (x[:, 1:, hide] > 0).all() for x in mass)
        try:
            s.forward_scored(ids[:, P:], pos[:, P:], pk, pv, True, 0, [torch.zeros(B, 4, P + 1)] * 3)
            raise AssertionError("a misshapen slot_bias was accepted")
        except torch.jit.Error as e:  # the scripted model's RuntimeError
            assert "slot_bias" in str(e)


def test_per_row_lengths_run_each_row_as_its_own_cache():
    """Contract version 5. lengths [num_layers, B]: each row writes at its own slots and attends
    to its own valid slots only, as if it ran alone (rows with different caches in one batch),
    in step and step_scored (attention mass, queries, slot_bias per row)."""
    m = tiny_model(9)
    s = torch.jit.script(m)
    B, C, L = 3, 16, 3
    torch.manual_seed(1)
    kb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    vb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    row_lengths = [[5, 9, 0], [3, 9, 12], [5, 1, 7]]  # per layer, per row
    lengths = torch.tensor(row_lengths)
    ids = torch.randint(0, 97, (B, 2))
    pos = torch.tensor([[5, 6], [9, 10], [12, 13]])
    bias = [torch.zeros(B, 4, C) for _ in range(L)]
    bias[1][1, 2, 0] = float("-inf")
    att = [torch.rand(B, 4, C) for _ in range(L)]
    qb = [torch.zeros(B, 4, 3, 16) for _ in range(L)]
    with torch.no_grad():
        k2, v2 = [k.clone() for k in kb], [v.clone() for v in vb]
        got = s.step(ids, pos, k2, v2, lengths)
        k3, v3, att3 = [k.clone() for k in kb], [v.clone() for v in vb], [a.clone() for a in att]
        got_scored = s.step_scored(ids, pos, k3, v3, lengths, att3, 0.5, qb, torch.tensor([0, 1]), bias)
        for r in range(B):
            alone = torch.tensor([row_lengths[i][r] for i in range(L)])
            kr, vr = [k[r:r + 1].clone() for k in kb], [v[r:r + 1].clone() for v in vb]
            want = s.step(ids[r:r + 1], pos[r:r + 1], kr, vr, alone)
            assert (got[r] - want[0]).abs().max().item() < 1e-4
            ar = [a[r:r + 1].clone() for a in att]
            qr = [torch.zeros(1, 4, 3, 16) for _ in range(L)]
            want_scored = s.step_scored(ids[r:r + 1], pos[r:r + 1], [k[r:r + 1].clone() for k in kb],
                                        [v[r:r + 1].clone() for v in vb], alone, ar, 0.5, qr,
                                        torch.tensor([0, 1]), [b[r:r + 1] for b in bias])
            assert (got_scored[r] - want_scored[0]).abs().max().item() < 1e-4
            for i in range(L):
                n = row_lengths[i][r]
                assert (k2[i][r, :, :n + 2] - kr[i][0, :, :n + 2]).abs().max().item() < 1e-5
                assert torch.equal(k2[i][r, :, :n], kb[i][r, :, :n])  # the row's valid slots untouched
                assert torch.equal(k2[i][r, :, n + 2:], kb[i][r, :, n + 2:])  # nothing past its new ones
                assert torch.equal(v2[i][r, :, n + 2:], vb[i][r, :, n + 2:])
                assert (att3[i][r] - ar[i][0]).abs().max().item() < 1e-5
                assert (qb[i][r] - qr[i][0]).abs().max().item() < 1e-5
        assert att3[1][1, 2, 0].item() == 0.5 * att[1][1, 2, 0].item()  # hidden: no new mass
        for bad in (torch.zeros(L, B + 1, dtype=torch.long), torch.zeros(L + 1, B, dtype=torch.long)):
            try:
                s.step(ids, pos, kb, vb, bad)
                raise AssertionError("misshapen lengths were accepted")
            except torch.jit.Error as e:
                assert "lengths" in str(e)


def test_shared_prefix_layers_run_once_for_every_row():
    """Contract version 5. Rows that feed the same tokens and keep layer 0 whole may share its
    buffers ([1, H, C, D]): it runs once, on row 0, and every row gets what it would have got
    with its own copy of that layer; a shared layer after an unshared one is refused."""
    m = tiny_model(10)
    s = torch.jit.script(m)
    B, C, L = 3, 12, 3
    torch.manual_seed(2)
    k0, v0 = torch.randn(1, 4, C, 16), torch.randn(1, 4, C, 16)
    kb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    vb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    kb[0], vb[0] = k0.expand(B, 4, C, 16).clone(), v0.expand(B, 4, C, 16).clone()
    lengths = torch.tensor([[6, 6, 6], [6, 2, 4], [5, 3, 6]])
    ids = torch.full((B, 1), 11)
    pos = torch.tensor([[[6], [6], [6]], [[6], [2], [4]], [[5], [3], [6]]])
    with torch.no_grad():
        own_k, own_v = [k.clone() for k in kb], [v.clone() for v in vb]
        want = s.step(ids, pos, own_k, own_v, lengths)
        sk = [k0.clone()] + [k.clone() for k in kb[1:]]
        sv = [v0.clone()] + [v.clone() for v in vb[1:]]
        got = s.step(ids, pos, sk, sv, lengths)
        assert (got - want).abs().max().item() < 1e-4
        assert (sk[0][0, :, :7] - own_k[0][1, :, :7]).abs().max().item() < 1e-5
        assert torch.equal(sk[1], own_k[1]) or (sk[1] - own_k[1]).abs().max().item() < 1e-5
        bad_k = [k.clone() for k in kb]
        bad_k[1] = bad_k[1][:1].clone()
        bad_v = [v.clone() for v in vb]
        bad_v[1] = bad_v[1][:1].clone()
        try:
            s.step(ids, pos, bad_k, bad_v, lengths)
            raise AssertionError("a shared layer after an unshared one was accepted")
        except torch.jit.Error as e:
            assert "prefix" in str(e)


def test_one_row_of_tokens_computes_their_projections_once():
    """Contract version 5. input_ids [1, T] with B rows of positions and lengths: every row
    feeds those tokens. The first layer's keys and values of each row are bitwise those of the
    row run alone (its projections are computed once, at one row, and rotated per row), and the
    logits those of B identical rows of tokens."""
    m = tiny_model(11)
    s = torch.jit.script(m)
    B, C, L = 3, 12, 3
    torch.manual_seed(3)
    kb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    vb = [torch.randn(B, 4, C, 16) for _ in range(L)]
    lengths = torch.tensor([[4, 7, 2], [4, 1, 6], [3, 3, 3]])
    pos = lengths.unsqueeze(2).clone()  # the cache rule: each row and layer at its own length
    with torch.no_grad():
        k1, v1 = [k.clone() for k in kb], [v.clone() for v in vb]
        got = s.step(torch.tensor([[9]]), pos, k1, v1, lengths)
        kB, vB = [k.clone() for k in kb], [v.clone() for v in vb]
        want = s.step(torch.full((B, 1), 9), pos, kB, vB, lengths)
        assert (got - want).abs().max().item() < 1e-4
        for r in range(B):
            kr, vr = [k[r:r + 1].clone() for k in kb], [v[r:r + 1].clone() for v in vb]
            s.step(torch.tensor([[9]]), pos[:, r:r + 1], kr, vr, lengths[:, r])
            n = lengths[0, r].item()
            assert torch.equal(k1[0][r, :, n], kr[0][0, :, n]) and torch.equal(v1[0][r, :, n], vr[0][0, :, n])
        try:
            s.step(torch.tensor([[9, 9]]), pos, kb, vb, lengths)
            raise AssertionError("tokens of another length than the positions were accepted")
        except torch.jit.Error as e:
            assert "position_ids" in str(e)


def test_lm_logits_matches_forward():
    m = tiny_model(2)
    ids = torch.randint(0, 97, (2, 17))
    full, _, _ = run(m, ids, torch.arange(17).expand(2, 17), *km.empty_cache(m, 2))
    with torch.no_grad():
        diff = (km.lm_logits(m, ids).float() - full).abs().max().item()
    assert diff < 1e-4, diff


def test_per_layer_cache_lengths_match_naive_reference():
    m = tiny_model(3)
    s = torch.jit.script(m)
    n = 12
    tokens = torch.randint(0, 97, (n,)).tolist()
    ids = torch.tensor([tokens])
    pos = torch.arange(n).unsqueeze(0)
    _, pk, pv = run(s, ids[:, :n - 1], pos[:, :n - 1], *km.empty_cache(s, 1))
    # Different kept sets per layer, including an empty one, like a compressor would leave.
    visible = [[0, 1, 7, 9, 10], list(range(n - 1)), []]
    pk = [k[:, :, idx, :] for k, idx in zip(pk, visible)]
    pv = [v[:, :, idx, :] for v, idx in zip(pv, visible)]
    logits, nk, nv = run(s, ids[:, n - 1:], pos[:, n - 1:], pk, pv)
    assert [k.shape[2] for k in nk] == [6, n, 1], [k.shape for k in nk]
    ref = naive_decode(m, tokens, list(range(n)), visible)
    diff = (logits[0, 0].double() - ref).abs().max().item()
    assert diff < 1e-4, diff


def test_naive_reference_agrees_on_full_cache_with_custom_positions():
    # 'cache' position mode: positions need not be token indices.
    m = tiny_model(4)
    s = torch.jit.script(m)
    n = 9
    tokens = torch.randint(0, 97, (n,)).tolist()
    positions = [0, 1, 2, 5, 6, 7, 8, 20, 21]
    logits, _, _ = run(s, torch.tensor([tokens]), torch.tensor([positions]), *km.empty_cache(s, 1))
    ref = naive_decode(m, tokens, positions, [list(range(n - 1))] * 3)
    diff = (logits[0, -1].double() - ref).abs().max().item()
    assert diff < 1e-4, diff


def test_key_rerotation_composes():
    # A cached key rotated at position p, rotated again by delta, equals the key rotated at
    # p + delta: this is what lets a driver move kept keys to new positions.
    m = tiny_model(5)
    r = m.rotary_ndims
    k = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    p = torch.tensor([[0, 3, 4, 10, 11, 40]])
    delta = torch.tensor([[0, -1, -1, -5, -5, -30]])
    def rotate(x, positions):
        return km.apply_rotary(x, *km.full_width_rotary(*m.rotary_tables(positions), 16), r)
    once = rotate(k, p)
    twice = rotate(once, delta)
    direct = rotate(k, p + delta)
    assert (twice - direct).abs().max().item() < 1e-5


def test_rotary_is_hf_formula_bitwise():
    # apply_rotary's full-width factors give, float for float, Hugging Face's
    # x * cos + rotate_half(x) * sin on the rotary dims and x itself on the others.
    m = tiny_model(3, hidden_size=128, num_heads=4)  # head_dim 32, rotary_ndims 8
    r = m.rotary_ndims
    pos = torch.randint(0, 5000, (2, 7))
    cos, sin = m.rotary_tables(pos)
    cos_full, sin_full = km.full_width_rotary(cos, sin, 32)
    assert (cos_full[..., r:] == 1).all() and (sin_full[..., r:] == 0).all()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 4, 7, 32).to(dt)
        c, s = cos.to(dt), sin.to(dt)
        xr = x[..., :r]
        rotate_half = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), -1)
        want = torch.cat((xr * c + rotate_half * s, x[..., r:]), -1)
        got = km.apply_rotary(x, cos_full.to(dt), sin_full.to(dt), r)
        assert torch.equal(got, want), dt


def test_fused_layers_compute_the_same_function():
    # fuse_layers folds the LayerNorms into the weights and merges the matrix products; in
    # float64 the result must agree with the unfused model to rounding, through forward and step.
    m = tiny_model(12).double()
    f = km.fuse_layers(copy.deepcopy(m))
    assert all(isinstance(layer, km.FusedNeoXLayer) for layer in f.layers)
    sm, sf = torch.jit.script(m), torch.jit.script(f)
    assert sf.fused_layers and not sm.fused_layers
    assert km.contract_config(sf)["fused_layers"] is True
    B, T = 2, 10
    ids = torch.randint(0, 97, (B, T))
    pos = torch.arange(T).expand(B, T)
    a, ak, av = run(sm, ids, pos, *km.empty_cache(sm, B))
    b, bk, bv = run(sf, ids, pos, *km.empty_cache(sf, B))
    assert (a - b).abs().max().item() < 1e-9
    assert max((x - y).abs().max().item() for x, y in zip(ak + av, bk + bv)) < 1e-9
    outs = []
    for s in (sm, sf):
        kb = [torch.zeros(B, 4, 16, 16, dtype=torch.float64) for _ in range(3)]
        vb = [torch.zeros_like(k) for k in kb]
        lengths = torch.zeros(3, dtype=torch.long)
        o = [s.step(ids[:, :6], pos[:, :6], kb, vb, lengths)]
        lengths += 6
        for t in range(6, T):
            o.append(s.step(ids[:, t:t + 1], pos[:, t:t + 1], kb, vb, lengths))
            lengths += 1
        outs.append(torch.cat(o, 1))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-9
    assert (outs[1] - b).abs().max().item() < 1e-5  # attention scores are float32 in both paths
    with torch.no_grad():
        assert (km.lm_logits(f, ids).float() - b.float()).abs().max().item() < 1e-4
    try:
        km.fuse_layers(tiny_model(1, use_parallel_residual=False))
    except ValueError as e:
        assert "parallel" in str(e), str(e)
    else:
        raise AssertionError("a sequential-residual layer was fused")


def test_dtype_moves_and_no_hardcoded_dtype():
    m = tiny_model(6)
    s = torch.jit.script(m)
    ids = torch.randint(0, 97, (1, 10))
    pos = torch.arange(10).unsqueeze(0)
    ref, _, _ = run(s, ids, pos, *km.empty_cache(s, 1))
    s.to(torch.float64)
    out, k, _ = run(s, ids, pos, *km.empty_cache(s, 1))
    assert out.dtype == torch.float32 and k[0].dtype == torch.float64
    assert (out - ref).abs().max().item() < 1e-4
    # A half-precision copy (what data/ ships) moved back to float32 still runs on CPU.
    s.to(torch.float16)
    s.to(torch.float32)
    out2, _, _ = run(s, ids, pos, *km.empty_cache(s, 1))
    assert (out2 - ref).abs().max().item() < 0.05
    # bfloat16 runs on CPU too.
    s.to(torch.bfloat16)
    out3, k3, _ = run(s, ids, pos, *km.empty_cache(s, 1))
    assert out3.dtype == torch.float32 and k3[0].dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    s = torch.jit.script(tiny_model(7))
    ids = torch.zeros(1, 3, dtype=torch.long)
    pos = torch.arange(3).unsqueeze(0)
    pk, pv = km.empty_cache(s, 1)
    for args, needle in [((ids, pos, pk[:2], pv[:2]), "expected 3"),
                         ((ids, pos[:, :2], pk, pv), "position_ids"),
                         ((ids, pos, [torch.zeros(1, 4, 0, 8)] * 3, pv), "cache has keys"),
                         ((ids, pos, [x.double() for x in pk], [x.double() for x in pv]), "dtype")]:
        try:
            run(s, *args)
        except Exception as e:  # TorchScript raises torch.jit.Error (a RuntimeError)
            assert needle in str(e), (needle, str(e)[:300])
        else:
            raise AssertionError("no error for " + needle)


def test_per_layer_positions():
    # Contract version 2: position_ids [num_layers, B, T], layer i rotated at position_ids[i].
    s = torch.jit.script(tiny_model(12))
    ids = torch.randint(0, 97, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    shift = torch.tensor([0, 3, 7]).view(3, 1, 1)
    per_layer = pos.unsqueeze(0) + shift
    shared, k_shared, _ = run(s, ids, pos, *km.empty_cache(s, 2))
    same, _, _ = run(s, ids, pos.unsqueeze(0).expand(3, 2, 9), *km.empty_cache(s, 2))
    assert torch.equal(shared, same)  # every layer at the same positions: the shared path's floats
    moved, k_moved, _ = run(s, ids, per_layer, *km.empty_cache(s, 2))
    # Attention sees only relative positions: shifting a layer's positions changes its keys'
    # rotation (layer i rotated by shift[i]) but not the logits.
    assert (moved - shared).abs().max().item() < 1e-4
    for i in range(3):
        expected = k_shared[i].clone()
        r = s.rotary_ndims
        for j in range(9):
            for b in range(2):
                for h in range(expected.size(1)):
                    expected[b, h, j, :r] = naive_rotate(k_shared[i][b, h, j], int(shift[i]), r, s.rotary_base)[:r]
        assert (k_moved[i] - expected).abs().max().item() < 1e-4, i
    # step takes the same shapes.
    kb = [torch.zeros(2, 4, 12, 16) for _ in range(3)]
    vb = [torch.zeros(2, 4, 12, 16) for _ in range(3)]
    with torch.no_grad():
        out = s.step(ids, per_layer, kb, vb, torch.zeros(3, dtype=torch.long))
    assert (out - moved).abs().max().item() < 1e-4
    for bad in (pos.unsqueeze(0).expand(2, 2, 9), pos[:, :4]):
        try:
            run(s, ids, bad, *km.empty_cache(s, 2))
        except Exception as e:
            assert "position_ids" in str(e), str(e)[:300]
        else:
            raise AssertionError("no error for position_ids %s" % (tuple(bad.shape),))


def test_save_reload_with_extra_files():
    m = tiny_model(8)
    tok = bytes(range(256)) * 3  # arbitrary binary content, NUL bytes included
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.pt")
        km.save_contract_model(m, path, {"source": "random"}, tokenizer_bytes=tok)
        loaded, cfg, tok2 = km.load_contract_model(path)
        assert tok2 == tok
        assert cfg["source"] == "random" and cfg["dtype"] == "float32" and cfg["attention"] == "portable"
        for name in km.CONTRACT_ATTRS:
            assert cfg[name] == getattr(loaded, name), name
        ids = torch.randint(0, 97, (1, 8))
        pos = torch.arange(8).unsqueeze(0)
        a, _, _ = run(m, ids, pos, *km.empty_cache(m, 1))
        b, _, _ = run(loaded, ids, pos, *km.empty_cache(loaded, 1))
        assert (a - b).abs().max().item() == 0.0
        # Without a tokenizer the entry is absent.
        km.save_contract_model(m, path)
        _, cfg, tok3 = km.load_contract_model(path)
        assert tok3 is None and cfg["tokenizer"] is None
        # A tokenizer.json goes to kvc/tokenizer.json; one tokenizer per file.
        js = b'{"model": {"type": "BPE"}}'
        km.save_contract_model(m, path, tokenizer_json=js)
        _, cfg, tok4 = km.load_contract_model(path)
        assert tok4 == js and cfg["tokenizer"] == "kvc/tokenizer.json"
        try:
            km.save_contract_model(m, path, tokenizer_bytes=tok, tokenizer_json=js)
            raise AssertionError("no error for two tokenizers")
        except ValueError as e:
            assert "one tokenizer" in str(e)


def test_hf_state_dict_mapping():
    src = tiny_model(9)
    sd = {}
    for k, v in src.state_dict().items():
        sd[k if k == "embed_out.weight" else "gpt_neox." + k] = v.clone()
    sd["gpt_neox.layers.0.attention.bias"] = torch.ones(1)           # old HF buffers: ignored
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    dst = km.KVCModel(tiny_config())
    km.load_hf_state_dict(dst, sd)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    del sd["gpt_neox.final_layer_norm.bias"]
    sd["gpt_neox.layers.0.extra.weight"] = torch.ones(1)
    try:
        km.load_hf_state_dict(dst, sd)
    except ValueError as e:
        assert "final_layer_norm.bias" in str(e) and "layers.0.extra.weight" in str(e), str(e)
    else:
        raise AssertionError("missing key not reported")


def test_sequential_residual_variant():
    m = tiny_model(10, use_parallel_residual=False)
    s = torch.jit.script(m)
    ids = torch.randint(0, 97, (1, 8))
    pos = torch.arange(8).unsqueeze(0)
    full, _, _ = run(s, ids, pos, *km.empty_cache(s, 1))
    with torch.no_grad():
        assert (km.lm_logits(m, ids).float() - full).abs().max().item() < 1e-4


def test_sdpa_matches_portable():
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "skipped (PyTorch %s has no scaled_dot_product_attention)" % torch.__version__
    a = torch.jit.script(tiny_model(11))
    b = km.KVCModel(tiny_config(), attention="sdpa").eval()
    b.load_state_dict(tiny_model(11).state_dict())
    b = torch.jit.script(b)
    ids = torch.randint(0, 97, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    outs = []
    for model in (a, b):
        pk, pv = km.empty_cache(model, 2)
        x1, pk, pv = run(model, ids[:, :8], pos[:, :8], pk, pv)      # prefill (is_causal)
        x2, pk, pv = run(model, ids[:, 8:12], pos[:, 8:12], pk, pv)  # chunk (boolean mask)
        x3, pk, pv = run(model, ids[:, 12:13], pos[:, 12:13], pk, pv)  # one token (no mask)
        outs.append(torch.cat([x1, x2, x3], 1))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4
    # The scored methods: sdpa's output stays the fused kernel's, its mass equals portable's.
    scored = []
    for model in (a, b):
        kb = [torch.zeros(2, 4, 16, 16) for _ in range(3)]
        vb = [torch.zeros(2, 4, 16, 16) for _ in range(3)]
        ab = [torch.zeros(2, 4, 16) for _ in range(3)]
        lengths = torch.zeros(3, dtype=torch.long)
        with torch.no_grad():
            x = model.step_scored(ids[:, :8], pos[:, :8], kb, vb, lengths, ab, 0.9, [], lengths[:0], [])
            y = model.step_scored(ids[:, 8:9], pos[:, 8:9], kb, vb, lengths + 8, ab, 0.9, [], lengths[:0], [])
            plain = model.step(ids[:, 8:9], pos[:, 8:9], [k.clone() for k in kb], [v.clone() for v in vb], lengths + 8)
        assert torch.equal(y, plain)  # the scored step's logits are the plain step's
        scored.append((torch.cat([x, y], 1), ab))
    assert (scored[0][0] - scored[1][0]).abs().max().item() < 1e-4
    assert max((p - q).abs().max().item() for p, q in zip(scored[0][1], scored[1][1])) < 1e-5
    # forward_scored in half precision on CUDA: SDPA takes a mask only in the query's dtype.
    if torch.cuda.is_available():
        h = b.to(device="cuda", dtype=torch.float16)
        pk, pv = km.empty_cache(h, 2)
        with torch.no_grad():
            lg, pk, pv, mass, q = h.forward_scored(ids[:, :8].cuda(), pos[:, :8].cuda(), pk, pv, True, 2, [])
            lg2, _, _, mass2, _ = h.forward_scored(ids[:, 8:12].cuda(), pos[:, 8:12].cuda(), pk, pv, True, 2, [])
        assert mass[0].dtype == torch.float32 and (mass2[0].sum(-1) - 4).abs().max().item() < 1e-2


def main():
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    passed = failed = skipped = 0
    for name, fn in tests:
        try:
            note = fn()
        except Exception:
            failed += 1
            print("FAIL %s" % name)
            traceback.print_exc()
            continue
        if isinstance(note, str) and note.startswith("skipped"):
            skipped += 1
            print("skip %s: %s" % (name, note))
        else:
            passed += 1
            print("ok   %s" % name)
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
