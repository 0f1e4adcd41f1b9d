#!/usr/bin/env python3
"""Train the small GPT-NeoX test model of kvcompress on the tokenized corpus.

Meant for one CUDA GPU (bf16 autocast, PyTorch 2.x); also runs on CPU as a smoke test:
  python3 examples/python/train_small_model.py --device cpu --tiny --max-steps 3 --out-dir /tmp/small

Model (default): 6 layers, hidden 256, 8 heads (head_dim 32, rotary 8 dims), MLP 1024, vocab
from the tokenizer (6144), context 2048. Batches are random windows of --context + 1 tokens
from <data-dir>/train_ids.npy. AdamW (lr 1.5e-3, betas 0.9/0.95, weight decay 0.1 on matrices),
linear warmup, then cosine decay to 10 % over the wall-clock budget --minutes (or --max-steps,
whichever ends first). The clock counts training steps only: the first step (CUDA start-up,
compilation) and the evaluations are left out, so the schedule sees the time actually spent
learning. Every --eval-every steps and at the end: perplexity and next-token accuracy on a
fixed set of non-overlapping --context windows of <data-dir>/eval_ids.npy.

Writes to --out-dir (each file < 16 MiB so that it survives a GPU machine's file return):
  weights-K.npz      float32 arrays under KVCModel's state_dict names, split into shards
  config.json        KVCConfig fields + tokenizer facts + shard list
  train_log.json     steps, tokens seen, wall time, eval history, final PPL/accuracy, GPU name
The weights are re-saved at every evaluation, so a run killed late still leaves a model.
TorchScript export happens elsewhere (export_small_model.py, PyTorch 1.13), because a file
saved by PyTorch 2.x may not load in LibTorch 1.13.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import GPU_DIR, fail  # noqa: E402

SHARD_BYTES = 12 * 1024 * 1024  # keeps every returned file well under 16 MiB


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=GPU_DIR, help="folder with train_ids.npy, eval_ids.npy (default: %(default)s)")
    ap.add_argument("--out-dir", required=True, help="output folder (created)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = budget only)")
    ap.add_argument("--tiny", action="store_true", help="a very small model and batch, for CPU smoke tests")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--context", type=int, default=2048, help="training and eval window length")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default: %(default)s)")
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (default: %(default)s)")
    ap.add_argument("--eval-windows", type=int, default=0, help="eval windows to use (0 = all that fit)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (PyTorch 2.x)")
    ap.add_argument("--model-name", default="pg19-neox-tiny")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.intermediate = 2, 64, 4, 256
        args.context, args.batch = min(args.context, 64), min(args.batch, 4)
        args.eval_windows = args.eval_windows or 4
        args.warmup_steps = min(args.warmup_steps, 2)
        args.model_name += "-smoke"
    for name in ("minutes", "context", "batch", "lr", "layers", "hidden", "heads", "intermediate", "eval_every"):
        if getattr(args, name) <= 0:
            fail(__file__, "--%s must be positive" % name.replace("_", "-"))
    if args.max_steps < 0 or args.eval_windows < 0 or args.warmup_steps < 0:
        fail(__file__, "--max-steps, --eval-windows and --warmup-steps must be >= 0")
    if args.hidden % args.heads:
        fail(__file__, "--hidden must be a multiple of --heads")
    return args


def load_ids(path, np, script):
    if not os.path.isfile(path):
        fail(script, "missing %s (run examples/python/tokenize_corpus.py first)" % path)
    arr = np.load(path)
    if arr.ndim != 1 or arr.size == 0:
        fail(script, "%s must hold a non-empty 1-D array" % path)
    return arr


def init_weights(model, cfg, torch):
    """GPT-NeoX style: N(0, 0.02) everywhere, output projections scaled by 1/sqrt(2 L) so the
    residual stream does not grow with depth; LayerNorm 1/0; biases 0."""
    std = 0.02
    out_std = std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight") else 0.0)
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)


def lr_at(step, progress, args):
    warm = min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0
    progress = min(1.0, max(0.0, progress))
    floor = args.min_lr_ratio
    return args.lr * warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def save_weights(model, cfg, out_dir, meta, np):
    """float32 shards weights-K.npz (< SHARD_BYTES each) + config.json listing them."""
    shards, current, size = [], {}, 0
    for name, t in model.state_dict().items():
        a = t.detach().float().cpu().numpy()
        if current and size + a.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = a
        size += a.nbytes
    shards.append(current)
    names = []
    for old in os.listdir(out_dir):
        if old.startswith("weights-") and old.endswith(".npz"):
            os.remove(os.path.join(out_dir, old))
    for k, shard in enumerate(shards):
        fname = "weights-%d.npz" % k
        tmp = os.path.join(out_dir, fname + ".tmp.npz")
        np.savez(tmp, **shard)
        os.replace(tmp, os.path.join(out_dir, fname))
        names.append(fname)
    conf = dict(cfg.to_dict())
    conf.update(meta)
    conf["weight_files"] = names
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        fail(__file__, "missing Python package: %s" % e)
    import kvc_model as km

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(__file__, "--device cuda but PyTorch sees no GPU")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    train_np = load_ids(os.path.join(args.data_dir, "train_ids.npy"), np, __file__)
    eval_np = load_ids(os.path.join(args.data_dir, "eval_ids.npy"), np, __file__)
    meta_path = os.path.join(args.data_dir, "ids_meta.json")
    ids_meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    vocab = int(ids_meta.get("vocab_size", int(max(train_np.max(), eval_np.max())) + 1))
    sep = int(ids_meta.get("separator_id", 2))
    if train_np.size < args.context + 2:
        fail(__file__, "train_ids.npy has %d tokens, fewer than one window" % train_np.size)

    cfg = km.KVCConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                       intermediate_size=args.intermediate, vocab_size=vocab, rotary_pct=0.25,
                       rotary_base=10000.0, max_positions=max(2048, args.context), layer_norm_eps=1e-5,
                       use_parallel_residual=True, bos_token_id=1, eos_token_id=sep,
                       model_name=args.model_name)
    model = km.KVCModel(cfg, attention="portable").to(device)
    init_weights(model, cfg, torch)
    n_params = sum(p.numel() for p in model.parameters())

    # Token streams live on the device: a batch is one gather, no host round trip.
    train_ids = torch.from_numpy(train_np.astype(np.int64)).to(device)
    eval_all = torch.from_numpy(eval_np.astype(np.int64))
    n_win = (eval_all.numel() - 1) // args.context
    if args.eval_windows:
        n_win = min(n_win, args.eval_windows)
    if n_win < 1:
        fail(__file__, "eval_ids.npy is shorter than one --context window")
    # Fixed eval set: consecutive non-overlapping windows from the start (inputs + 1 target).
    eval_windows = torch.stack([eval_all[i * args.context:(i + 1) * args.context + 1] for i in range(n_win)]).to(device)
    offsets = torch.arange(args.context + 1, device=device)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    try:
        opt = torch.optim.AdamW(groups, fused=(device.type == "cuda"), **opt_kwargs)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(groups, **opt_kwargs)

    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        if use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def loss_fn(x, y):
        with autocast():
            logits = km.lm_logits(model, x)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    step_loss = loss_fn
    if args.compile:
        if not hasattr(torch, "compile"):
            fail(__file__, "--compile needs PyTorch >= 2.0")
        step_loss = torch.compile(loss_fn)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def evaluate():
        model.eval()
        nll, hits, count = 0.0, 0, 0
        for i in range(0, n_win, args.batch):
            w = eval_windows[i:i + args.batch]
            with autocast():
                logits = km.lm_logits(model, w[:, :-1]).float()
            y = w[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            hits += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
        model.train()
        mean = nll / count
        return {"eval_loss": mean, "eval_ppl": math.exp(mean), "eval_accuracy": hits / count,
                "eval_tokens": count}

    os.makedirs(args.out_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print("device %s%s, torch %s; params %d; train %d tokens, eval %d windows x %d"
          % (device, " (%s)" % gpu if gpu else "", torch.__version__, n_params, train_np.size, n_win, args.context),
          flush=True)

    budget = args.minutes * 60.0
    tokens_per_step = args.batch * args.context
    log = {"args": vars(args), "num_parameters": n_params, "gpu": gpu, "torch": torch.__version__,
           "python": platform.python_version(), "train_tokens_available": int(train_np.size),
           "tokens_per_step": tokens_per_step, "evals": []}
    t_wall0 = time.time()
    train_time = 0.0  # seconds of training steps after the first one
    step = 0
    loss_sum, loss_n = None, 0
    model.train()
    while True:
        t0 = time.time()
        progress = train_time / budget
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        lr = lr_at(step + 1, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.context - 1, (args.batch,), device=device)
        win = train_ids[starts.unsqueeze(1) + offsets]
        loss = step_loss(win[:, :-1], win[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        loss_n += 1
        if step == 1:
            sync()  # leave start-up/compilation out of the schedule's clock
        else:
            train_time += time.time() - t0
        done = (args.max_steps and step >= args.max_steps) or train_time >= budget
        if step % 50 == 0 or done or step == 1:
            sync()
            print("step %d  loss %.4f  lr %.2e  %.1f s  %.0f tok/s"
                  % (step, (loss_sum / loss_n).item(), lr, train_time,
                     tokens_per_step * (step - 1) / max(train_time, 1e-9)), flush=True)
            loss_sum, loss_n = None, 0
        if step % args.eval_every == 0 or done:
            sync()
            ev = evaluate()
            ev.update({"step": step, "tokens_seen": step * tokens_per_step, "train_seconds": train_time})
            log["evals"].append(ev)
            print("eval step %d: ppl %.3f  accuracy %.4f" % (step, ev["eval_ppl"], ev["eval_accuracy"]), flush=True)
            save_weights(model, cfg, args.out_dir, {"tokenizer_vocab_size": vocab, "separator_id": sep,
                                                   "trained_steps": step, "context": args.context}, np)
        if done:
            break

    final = log["evals"][-1]
    log.update({"steps": step, "tokens_seen": step * tokens_per_step, "train_seconds": train_time,
                "wall_seconds": time.time() - t_wall0, "epochs": step * tokens_per_step / train_np.size,
                "final_eval_ppl": final["eval_ppl"], "final_eval_accuracy": final["eval_accuracy"],
                "final_eval_loss": final["eval_loss"]})
    with open(os.path.join(args.out_dir, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")
    print("done: %d steps, %.1fM tokens (%.2f epochs), %.0f s training, %.0f s wall; eval ppl %.3f, accuracy %.4f -> %s"
          % (step, step * tokens_per_step / 1e6, log["epochs"], train_time, log["wall_seconds"],
             final["eval_ppl"], final["eval_accuracy"], args.out_dir), flush=True)


if __name__ == "__main__":
    main()
