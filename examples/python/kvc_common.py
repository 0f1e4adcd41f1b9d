"""Small helpers shared by the kvcompress Python scripts (paths, corpus manifest, errors)."""

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
DEFAULT_CORPUS = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "corpus"))
DEFAULT_SPM = os.path.join(REPO_ROOT, "data", "pg19-neox-tiny.spm.model")
GPU_DIR = os.path.join(REPO_ROOT, ".gpu")


def fail(script: str, message: str):
    """One-line error in the argparse style, exit status 1."""
    sys.exit("%s: error: %s" % (os.path.basename(script), message))


def read_manifest(corpus_dir: str, script: str):
    """Rows of MANIFEST.tsv as dicts (with 'path' added), in file order."""
    manifest = os.path.join(corpus_dir, "MANIFEST.tsv")
    if not os.path.isfile(manifest):
        fail(script, "no MANIFEST.tsv in corpus folder %s (use --corpus DIR)" % corpus_dir)
    with open(manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for need in ("file", "split"):
        if rows and need not in rows[0]:
            fail(script, "%s has no '%s' column" % (manifest, need))
    for row in rows:
        row["path"] = os.path.join(corpus_dir, row["file"])
        if not os.path.isfile(row["path"]):
            fail(script, "book listed in MANIFEST.tsv is missing: %s" % row["path"])
    return rows


def books(corpus_dir: str, split: str, script: str):
    rows = [r for r in read_manifest(corpus_dir, script) if r["split"] == split]
    if not rows:
        fail(script, "MANIFEST.tsv in %s lists no split=%s books" % (corpus_dir, split))
    return rows


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def load_spm(path: str, script: str):
    """A SentencePieceProcessor from a model file, with one-line errors."""
    if not os.path.isfile(path):
        fail(script, "SentencePiece model not found: %s" % path)
    try:
        import sentencepiece as spm
    except ImportError:
        fail(script, "the sentencepiece Python module is missing (Debian: apt-get install python3-sentencepiece)")
    sp = spm.SentencePieceProcessor()
    if not sp.Load(path):
        fail(script, "cannot load SentencePiece model %s" % path)
    return sp


def spm_from_bytes(data: bytes, script: str):
    try:
        import sentencepiece as spm
    except ImportError:
        fail(script, "the sentencepiece Python module is missing (Debian: apt-get install python3-sentencepiece)")
    sp = spm.SentencePieceProcessor()
    if not sp.LoadFromSerializedProto(data):
        fail(script, "the embedded tokenizer is not a valid SentencePiece model")
    return sp
