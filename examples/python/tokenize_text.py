#!/usr/bin/env python3
"""Turn a UTF-8 text file into a token-ids file for `kvbench --tokens`.

Tokenizer, one of:
  --spm FILE            a SentencePiece model
  --model FILE.pt       a contract model with an embedded kvc/tokenizer.model
  --hf-tokenizer FILE   a Hugging Face tokenizer.json (needs the `tokenizers` package),
                        e.g. ../shared/tokenizers/gpt-neox-20b/tokenizer.json for Pythia

Token-ids file format (kvcompress-tokens v1), one sample per file, UTF-8 text:
  line 1:   # kvcompress-tokens v1 vocab_size=N tokenizer=NAME
  then:     token ids as decimal integers separated by any whitespace (this script writes
            20 per line)
vocab_size is the tokenizer's size (ids are < N); NAME has no spaces. No BOS/EOS is added
unless --add-bos / --add-eos is given. The whole text is encoded as one string.

Example:
  python3 examples/python/tokenize_text.py data/eval_text/pg10321_dragons_blood.txt \\
      data/eval_tokens/pg10321_dragons_blood.ids --spm data/pg19-neox-tiny.spm.model
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvc_common import fail, load_spm, spm_from_bytes  # noqa: E402

HEADER = "# kvcompress-tokens v1 vocab_size={vocab} tokenizer={name}\n"
PER_LINE = 20


def clean_name(name: str) -> str:
    name = "".join(c if (c.isalnum() or c in "-_.+") else "-" for c in name)
    return name or "unknown"


def spm_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".model", ".spm"):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
    return clean_name(base)


class Tokenizer:
    """encode(text) -> ids, plus bos/eos ids (-1 if none), vocab size and a name."""

    def __init__(self, encode, vocab, name, bos=-1, eos=-1):
        self.encode, self.vocab, self.name, self.bos, self.eos = encode, vocab, name, bos, eos


def from_spm(sp, name):
    return Tokenizer(lambda t: sp.EncodeAsIds(t), sp.GetPieceSize(), name, sp.bos_id(), sp.eos_id())


def open_tokenizer(args, script):
    chosen = [x for x in (args.spm, args.model, args.hf_tokenizer) if x]
    if len(chosen) != 1:
        fail(script, "give exactly one of --spm, --model, --hf-tokenizer")
    if args.spm:
        return from_spm(load_spm(args.spm, script), spm_name(args.spm))
    if args.model:
        if not os.path.isfile(args.model):
            fail(script, "model file not found: %s" % args.model)
        try:
            from kvc_model import load_contract_model
            _, cfg, tok = load_contract_model(args.model)
        except Exception as e:  # noqa: BLE001 - any load failure becomes one line
            fail(script, "cannot read contract model %s: %s" % (args.model, str(e).splitlines()[0]))
        if tok is None:
            fail(script, "%s has no embedded kvc/tokenizer.model; use --spm or --hf-tokenizer" % args.model)
        return from_spm(spm_from_bytes(tok, script), clean_name(cfg.get("tokenizer_name") or cfg["model_name"]))
    path = args.hf_tokenizer
    if not os.path.isfile(path):
        fail(script, "tokenizer.json not found: %s" % path)
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        fail(script, "--hf-tokenizer needs the Hugging Face `tokenizers` package (pip install tokenizers)")
    tok = HFTokenizer.from_file(path)
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return Tokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids,
                     tok.get_vocab_size(with_added_tokens=True), clean_name(folder or "hf"))


def write_ids(path, ids, vocab, name):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER.format(vocab=vocab, name=name))
        for i in range(0, len(ids), PER_LINE):
            f.write(" ".join(str(x) for x in ids[i:i + PER_LINE]) + "\n")


def read_ids(path):
    """(ids, header fields) of a kvcompress-tokens v1 file; raises ValueError when malformed."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        rest = f.read()
    parts = first.split()
    if parts[:3] != ["#", "kvcompress-tokens", "v1"]:
        raise ValueError("%s: first line is not '# kvcompress-tokens v1 ...'" % path)
    fields = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
    return [int(x) for x in rest.split()], fields


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", help="input UTF-8 text file")
    ap.add_argument("out", help="output token-ids file (.ids)")
    ap.add_argument("--spm", help="SentencePiece model file")
    ap.add_argument("--model", help="contract model (.pt) with an embedded tokenizer")
    ap.add_argument("--hf-tokenizer", help="Hugging Face tokenizer.json")
    ap.add_argument("--name", help="tokenizer name for the header (default: from the tokenizer file)")
    ap.add_argument("--max-tokens", type=int, default=0, help="keep only the first N tokens (0 = all)")
    ap.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS id")
    ap.add_argument("--add-eos", action="store_true", help="append the tokenizer's EOS id")
    args = ap.parse_args(argv)
    if args.max_tokens < 0:
        fail(__file__, "--max-tokens must be >= 0")
    if not os.path.isfile(args.text):
        fail(__file__, "text file not found: %s" % args.text)
    try:
        with open(args.text, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(__file__, "%s is not UTF-8: %s" % (args.text, e))

    tok = open_tokenizer(args, __file__)
    ids = list(tok.encode(text))
    if args.add_bos:
        if tok.bos < 0:
            fail(__file__, "--add-bos: the tokenizer has no BOS id")
        ids.insert(0, tok.bos)
    if args.add_eos:
        if tok.eos < 0:
            fail(__file__, "--add-eos: the tokenizer has no EOS id")
        ids.append(tok.eos)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    if not ids:
        fail(__file__, "%s produced no tokens" % args.text)
    name = clean_name(args.name) if args.name else tok.name
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    write_ids(args.out, ids, tok.vocab, name)
    print("%s: %d chars -> %d tokens (vocab %d, tokenizer %s) -> %s"
          % (args.text, len(text), len(ids), tok.vocab, name, args.out))


if __name__ == "__main__":
    main()
