#!/usr/bin/env python3
"""Build the driver's default held-out eval data from the split=eval corpus books.

For each eval book in MANIFEST.tsv, writes
  data/eval_text/<stem>.txt     the first ~N characters (default 40,000), cut at the last
                                paragraph boundary (blank line) before N
  data/eval_tokens/<stem>.ids   that text tokenized with tokenize_text.py's format and the
                                trained SentencePiece tokenizer

Example:
  python3 examples/python/make_eval_data.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import DEFAULT_CORPUS, DEFAULT_SPM, REPO_ROOT, books, fail, load_spm, read_text  # noqa: E402
import tokenize_text  # noqa: E402


def cut_at_paragraph(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text.rstrip("\n") + "\n"
    cut = text.rfind("\n\n", 0, limit + 1)
    if cut <= 0:
        raise ValueError("no paragraph boundary in the first %d characters" % limit)
    return text[:cut] + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="corpus folder (default: %(default)s)")
    ap.add_argument("--spm", default=DEFAULT_SPM, help="SentencePiece model (default: %(default)s)")
    ap.add_argument("--chars", type=int, default=40000, help="characters to keep per book (default: %(default)s)")
    ap.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "data"), help="output root (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.chars < 1000:
        fail(__file__, "--chars must be at least 1000")
    load_spm(args.spm, __file__)  # fail before writing anything
    text_dir = os.path.join(args.data_dir, "eval_text")
    ids_dir = os.path.join(args.data_dir, "eval_tokens")
    os.makedirs(text_dir, exist_ok=True)
    for row in books(args.corpus, "eval", __file__):
        stem = os.path.splitext(row["file"])[0]
        try:
            text = cut_at_paragraph(read_text(row["path"]), args.chars)
        except ValueError as e:
            fail(__file__, "%s: %s" % (row["file"], e))
        txt = os.path.join(text_dir, stem + ".txt")
        with open(txt, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        tokenize_text.main([txt, os.path.join(ids_dir, stem + ".ids"), "--spm", args.spm])


if __name__ == "__main__":
    main()
