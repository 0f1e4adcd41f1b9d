#!/usr/bin/env python3
"""Train the SentencePiece BPE tokenizer of the small kvcompress test model.

Trains on the split=train books of the corpus MANIFEST.tsv (each line of a book is one
training sentence) and writes data/pg19-neox-tiny.spm.model. The settings make the
tokenizer lossless on raw book text: identity normalisation, whitespace kept as is, no
dummy prefix, and byte fallback for every character outside the vocabulary (newlines
included), so decode(encode(text)) == text. The script checks that on an eval book.

Example:
  nice -n 10 python3 examples/python/train_tokenizer.py
"""

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import DEFAULT_CORPUS, DEFAULT_SPM, books, fail, load_spm, read_text  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="corpus folder with MANIFEST.tsv (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_SPM, help="output .model file (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=6144)
    ap.add_argument("--input-sentence-size", type=int, default=2000000,
                    help="lines sampled (shuffled) for training (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234, help="sampling seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.vocab_size < 300:
        fail(__file__, "--vocab-size must be at least 300 (256 byte pieces + specials + merges)")
    if args.threads < 1:
        fail(__file__, "--threads must be >= 1")
    if not args.out.endswith(".model"):
        fail(__file__, "--out must end with .model")
    try:
        import sentencepiece as spm
    except ImportError:
        fail(__file__, "the sentencepiece Python module is missing (Debian: apt-get install python3-sentencepiece)")

    train = books(args.corpus, "train", __file__)
    evals = books(args.corpus, "eval", __file__)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)

    # Lines come through an iterator and the model through a writer, so the saved model holds
    # no local paths (TrainerSpec records input files and model_prefix) and reruns give the
    # same bytes.
    def lines():
        for row in train:
            for line in read_text(row["path"]).split("\n"):
                if line:
                    yield line

    model = io.BytesIO()
    spm.set_random_generator_seed(args.seed)  # reproducible sentence sampling
    t0 = time.time()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        model_type="bpe",
        vocab_size=args.vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        # Indentation runs (verse, letters) become one piece instead of many "▁".
        allow_whitespace_only_pieces=True,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=args.threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=1,
    )
    with open(args.out, "wb") as f:
        f.write(model.getvalue())
    elapsed = time.time() - t0

    sp = load_spm(args.out, __file__)
    print("trained %s on %d books in %.0f s: vocab %d, %d bytes"
          % (args.out, len(train), elapsed, sp.GetPieceSize(), os.path.getsize(args.out)))
    print("special ids: unk=%d bos=%d eos=%d" % (sp.unk_id(), sp.bos_id(), sp.eos_id()))

    # Lossless round trip on every held-out book (the eval text must survive unchanged).
    for row in evals:
        text = read_text(row["path"])
        ids = sp.EncodeAsIds(text)
        back = sp.DecodeIds(ids)
        if back != text:
            n = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
            fail(__file__, "decode(encode(text)) != text for %s (first difference at char %d: %r vs %r)"
                 % (row["file"], n, back[n:n + 20], text[n:n + 20]))
        print("round trip ok: %s: %d chars -> %d tokens (%.2f chars/token)"
              % (row["file"], len(text), len(ids), len(text) / max(1, len(ids))))


if __name__ == "__main__":
    main()
