#!/usr/bin/env python3
"""Tokenize the corpus books into the numpy files that train_small_model.py reads.

Each book is encoded as one string (newlines and all) with the SentencePiece model, and the
books are concatenated with the tokenizer's EOS id between them (and after the last), the
way GPT-NeoX pre-training separates documents. Writes, as uint16:
  <out-dir>/train_ids.npy   the split=train books, in MANIFEST.tsv order
  <out-dir>/eval_ids.npy    the split=eval books
  <out-dir>/ids_meta.json   tokenizer, separator id, per-book token counts

Example:
  nice -n 10 python3 examples/python/tokenize_corpus.py            # -> .gpu/
"""

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import DEFAULT_CORPUS, DEFAULT_SPM, GPU_DIR, books, fail, load_spm, read_text  # noqa: E402


def encode_split(sp, rows, sep):
    import numpy as np
    parts, counts = [], []
    for row in rows:
        ids = sp.EncodeAsIds(read_text(row["path"]))
        counts.append({"file": row["file"], "tokens": len(ids)})
        parts.append(np.asarray(ids, dtype=np.uint16))
        parts.append(np.asarray([sep], dtype=np.uint16))
    return np.concatenate(parts), counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="corpus folder with MANIFEST.tsv (default: %(default)s)")
    ap.add_argument("--spm", default=DEFAULT_SPM, help="SentencePiece model (default: %(default)s)")
    ap.add_argument("--out-dir", default=GPU_DIR, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        import numpy as np
    except ImportError:
        fail(__file__, "numpy is missing")

    sp = load_spm(args.spm, __file__)
    if sp.GetPieceSize() > 65536:
        fail(__file__, "vocab %d does not fit uint16" % sp.GetPieceSize())
    sep = sp.eos_id()
    if sep < 0:
        fail(__file__, "the tokenizer has no EOS id to separate books")
    os.makedirs(args.out_dir, exist_ok=True)

    with open(args.spm, "rb") as f:
        spm_sha = hashlib.sha256(f.read()).hexdigest()
    meta = {"tokenizer": os.path.basename(args.spm), "tokenizer_sha256": spm_sha,
            "vocab_size": sp.GetPieceSize(), "separator_id": sep, "dtype": "uint16"}
    for split in ("train", "eval"):
        t0 = time.time()
        ids, counts = encode_split(sp, books(args.corpus, split, __file__), sep)
        path = os.path.join(args.out_dir, "%s_ids.npy" % split)
        np.save(path, ids)
        meta[split] = {"file": os.path.basename(path), "tokens": int(ids.size), "books": counts}
        print("%s: %d books -> %d tokens (%s, %.0f s)" % (split, len(counts), ids.size, path, time.time() - t0))
    with open(os.path.join(args.out_dir, "ids_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
