#!/usr/bin/env python3
"""Reference ids for the C++ byte-level BPE tokenizer, from Hugging Face `tokenizers`.

Usage (on a machine with the `tokenizers` package; the GPU machine has it):
  python3 tests/reference/make_tokenizer_cases.py TOKENIZER_JSON OUT_DIR

Writes into OUT_DIR (committed as tests/reference/gpt_neox_tokenizer/):
  cases.json    {"tokenizers_version", "tokenizer_sha256", "cases": [{"name", "text", "ids",
                "decoded"}], "books": [{"file", "tokens", "fnv1a64"}]}
                for the hand-written cases below and for the whole books in data/books
                (their ids are too many to commit: their count and a hash of them, FNV-1a 64
                over the ids written as decimal text joined by single spaces)
  *.ids         the bundled eval texts (data/eval_text/*.txt) as kvcompress-tokens v1 files

Every encoding is `Tokenizer.encode(text, add_special_tokens=False).ids`, which is what the
course project's `tokenizer.encode(text)` gave for Pythia, and "decoded" is
`Tokenizer.decode(ids, skip_special_tokens=False)`.
"""

import glob
import hashlib
import json
import os
import sys

import tokenizers
from tokenizers import Tokenizer

# Each a property of the GPT-NeoX tokenizer that a faithful reimplementation must get right.
CASES = [
    ("empty", ""),
    ("one_space", " "),
    ("plain", "Hello, I am a language model."),
    ("contractions", "I'm sure you'll see we've done it; they'd say it's John's, isn't it?"),
    ("contractions_upper", "I'M SURE YOU'LL SEE WE'VE DONE IT'S"),
    ("contractions_spaced", "rock 'n' roll ' s 's 'd 'll"),
    ("curly_apostrophe", "it\u2019s John\u2019s"),
    ("digits", "In 1865, 3.14159 and 1000000 and 007 v2.0.1 -42 +7e10"),
    ("digits_other", "\u0661\u0662\u0663 \u2167 \u00bd \u00b2 \u2460"),
    ("double_space", "a  b"),
    ("space_runs", "a   b    c" + " " * 25 + "d" + " " * 48 + "e"),
    ("leading_trailing_spaces", "   start and end   "),
    ("tabs", "col1\tcol2\t\tcol3\t"),
    ("newlines", "para one.\n\npara two.\n\n\n\nend\n"),
    ("space_newline", "a \n b  \n\n  c"),
    ("crlf", "line one\r\nline two\r\n\r\nline four\r\n"),
    ("unicode_spaces", "a\u00a0b\u2003c\u3000d\u2028e\u0085f"),
    ("combining_nfc", "Cafe\u0301 A\u030a \u212b \u1100\u1161 n\u0303"),
    ("combining_kept", "q\u0307\u0323 x\u0301\u0301"),
    ("accents", "na\u00efve r\u00e9sum\u00e9 Stra\u00dfe \u00d1and\u00fa \ufb01ne"),
    ("greek_cyrillic", "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u041f\u0440\u0438\u0432\u0435\u0442"),
    ("devanagari", "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e"),
    ("arabic_hebrew", "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd"),
    ("emoji", "I \U0001F600 you \U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F1EB\U0001F1F7!"),
    ("cjk", "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\uff0c\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4"),
    ("punctuation", "Wait... what?! \u201cQuoted\u201d \u00abguillemets\u00bb \u2014em dash\u2014 (x) [y] {z} #1 @me $5 %"),
    ("special_tokens", "end<|endoftext|>start <|padding|> <|endoftext <|endoftext|><|endoftext|>"),
    ("control_chars", "bell\x07 nul\x00 esc\x1b del\x7f"),
    ("long_word", "a" * 70 + " " + "ab" * 40),
    ("mixed_case_words", "McDonald's iPhone XMLHttpRequest snake_case kebab-case CamelCase"),
    ("urls_code", "https://example.com/a?b=c&d=e  def f(x):\n    return x**2  # comment"),
    ("private_use_unassigned", "\ue000 \U000F0000 \u0378"),
]


def fnv1a64(ids):
    h = 0xcbf29ce484222325
    for b in " ".join(map(str, ids)).encode("ascii"):
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    tok_path, out_dir = argv[1], argv[2]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = Tokenizer.from_file(tok_path)
    os.makedirs(out_dir, exist_ok=True)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    cases = []
    for name, text in CASES:
        ids = encode(text)
        cases.append({"name": name, "text": text, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    books = []
    for path in sorted(glob.glob(os.path.join(repo, "data", "books", "*.txt"))):
        ids = encode(open(path, encoding="utf-8").read())
        books.append({"file": "data/books/" + os.path.basename(path), "tokens": len(ids), "fnv1a64": fnv1a64(ids)})
    for path in sorted(glob.glob(os.path.join(repo, "data", "eval_text", "*.txt"))):
        ids = encode(open(path, encoding="utf-8").read())
        out = os.path.join(out_dir, os.path.basename(path)[:-4] + ".ids")
        with open(out, "w") as f:
            f.write("# kvcompress-tokens v1 vocab_size=%d tokenizer=gpt-neox-20b\n" % tok.get_vocab_size())
            for i in range(0, len(ids), 20):
                f.write(" ".join(map(str, ids[i:i + 20])) + "\n")
    sha = hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    with open(os.path.join(out_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizers_version": tokenizers.__version__, "tokenizer_sha256": sha,
                   "cases": cases, "books": books}, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print("tokenizers %s: %d cases, books %s" % (tokenizers.__version__, len(cases),
                                                 [b["tokens"] for b in books]))


if __name__ == "__main__":
    main(sys.argv)
