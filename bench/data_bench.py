"""Data preparation: our dataset.py against the original recipe, side by side in one run.

    python bench/data_bench.py                      # WebText sample + Gutenberg 6 MB from ../shared/data

The original recipe, re-implemented faithfully: the .jsonl check looked at the folder name, so JSON
lines were loaded as raw text lines (`load_dataset("text")`), tokenized by the HF fast tokenizer with
truncation at 512 tokens, packed by run_clm's itertools `group_texts` (which drops each map batch's
remainder), with `num_proc=os.cpu_count()`, and no <|endoftext|> between documents.

Each measurement runs in a fresh subprocess (imports excluded from the timing, peak RSS from the
kernel) with a fresh cache folder for "cold"; "cached" repeats the call in a new process on the same
cache; "repeat" repeats it within the same process, as a notebook or train.py resume does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEBTEXT = SHARED / "gpt2-output" / "webtext.train.head1408.jsonl"
GUTENBERG = SHARED / "gutenberg-nltk" / "gutenberg13.txt"
BLOCK = 128
REPEATS = 3  # runs per measurement; the median is reported


def run_ours(path: str, cache_dir: str, repeat: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401  imported before the clock starts, as the original's imports are
    import transformers.models.auto.tokenization_auto  # noqa: F401

    from dataset import dataset_info, get_dataset_and_tokenizer

    start = time.perf_counter()
    _, train, val = get_dataset_and_tokenizer(dataset_path=path, block_size=BLOCK, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds}
    if repeat:
        start = time.perf_counter()
        get_dataset_and_tokenizer(dataset_path=path, block_size=BLOCK, cache_dir=cache_dir)
        result["repeat_seconds"] = time.perf_counter() - start
    info = dataset_info(train)
    real = sum(c["tokens"] - c["documents"] for c in info["tokenized"].values())  # minus one EOT per document
    dropped = info["train"]["dropped_tokens"] + info.get("val", {}).get("dropped_tokens", 0)
    result.update(real_tokens=real, kept_real_tokens=real - dropped, blocks=len(train) + len(val))
    return result


def run_original(path: str, cache_dir: str) -> dict:
    import itertools

    from datasets import load_dataset
    from transformers import GPT2TokenizerFast

    start = time.perf_counter()
    tokenizer = GPT2TokenizerFast.from_pretrained(str(ROOT / "gpt2_tokenizer"))
    raw = load_dataset("text", data_files={"train": path}, cache_dir=cache_dir)

    def tokenize(examples):
        return tokenizer(examples["text"], truncation=True, max_length=512)

    tokenized = raw.map(tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // BLOCK * BLOCK
        result = {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True, num_proc=os.cpu_count())
    lm["train"].train_test_split(test_size=0.05, seed=42)
    seconds = time.perf_counter() - start
    tokens_after_truncation = sum(len(ids) for ids in tokenized["train"]["input_ids"])
    return {"seconds": seconds, "blocks": len(lm["train"]), "truncated_tokens": tokens_after_truncation,
            "packed_tokens": len(lm["train"]) * BLOCK}


def original_real_text_kept(path: str, packed_fraction: float) -> tuple[int, int]:
    """(real-text tokens in the input, real-text tokens the original recipe trained on).

    The recipe kept the first 512 tokens of each raw JSON line; the document's text is the part of that
    prefix after `"text": "` (the last key in WebText lines), JSON-unescaped. Its grouping then kept
    `packed_fraction` of the truncated tokens.
    """
    sys.path.insert(0, str(ROOT))
    from gpt2_tokenizer import load_tokenizer

    tok = load_tokenizer()
    real = kept = 0
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not path.endswith(".jsonl"):  # plain text: the recipe only truncates lines longer than 512 tokens
        ids = tok(lines)["input_ids"]
        return sum(map(len, ids)), int(sum(min(len(i), 512) for i in ids) * packed_fraction)
    texts = [json.loads(line)["text"] for line in lines]
    prefixes = tok.batch_decode([ids[:512] for ids in tok(lines)["input_ids"]])
    for line, text, prefix in zip(lines, texts, prefixes):
        real += len(tok.encode(text))
        start = line.find('"text": "') + len('"text": "')
        escaped = prefix[start:] if len(prefix) > start else ""
        for cut in range(len(escaped), max(len(escaped) - 8, -1), -1):  # back off a split escape sequence
            try:
                kept_text = json.loads('"' + escaped[:cut].removesuffix('"}') + '"')
                break
            except json.JSONDecodeError:
                continue
        else:
            kept_text = ""
        kept += len(tok.encode(kept_text))
    return real, int(kept * packed_fraction)


def worker(args):
    result = run_ours(args.path, args.cache_dir, args.repeat) if args.worker == "ours" else run_original(args.path, args.cache_dir)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, children) / 1024
    print("RESULT " + json.dumps(result))


def measure(which: str, path: Path, cache_dir: str, repeat: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--path", str(path), "--cache_dir", cache_dir]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd + (["--repeat"] if repeat else []), capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main():
    if not WEBTEXT.is_file() or not GUTENBERG.is_file():
        sys.exit(f"This benchmark reads {WEBTEXT} and {GUTENBERG} (../shared/data); they are absent here.")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("WebText sample (1408 docs)", WEBTEXT), ("Gutenberg 13 books", GUTENBERG)):
            mb = path.stat().st_size / 1e6
            for which in ("original", "ours"):
                colds, warms = [], []
                for r in range(REPEATS):  # interleaving would share caches; fresh folders keep each cold run cold
                    cache = os.path.join(tmp, f"{which}-{path.stem}-{r}")
                    colds.append(measure(which, path, cache, repeat=(which == "ours")))
                    warms.append(measure(which, path, cache))
                cold = sorted(colds, key=lambda m: m["seconds"])[REPEATS // 2]  # the median run
                warm = sorted(warms, key=lambda m: m["seconds"])[REPEATS // 2]
                if which == "ours":
                    real, kept = cold["real_tokens"], cold["kept_real_tokens"]
                else:
                    real, kept = original_real_text_kept(str(path), cold["packed_tokens"] / cold["truncated_tokens"])
                rows.append({"data": name, "pipeline": which, "mb": mb, "cold_mb_s": mb / cold["seconds"],
                             "cached_mb_s": mb / warm["seconds"],
                             "repeat_mb_s": mb / cold["repeat_seconds"] if "repeat_seconds" in cold else None,
                             "real": real, "kept": kept, "rss": max(cold["peak_rss_mb"], warm["peak_rss_mb"]),
                             "cold_s": cold["seconds"], "cached_s": warm["seconds"], "repeat_s": cold.get("repeat_seconds")})
    print(f"\nCPU: {os.cpu_count()} cores. Block size {BLOCK}. Timings exclude Python imports; median of {REPEATS} runs.\n")
    print("| data | pipeline | cold MB/s | cached MB/s (new process) | repeat call MB/s (same process) | real-text tokens kept | lost | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        repeat = f"{r['repeat_mb_s']:.0f}" if r["repeat_mb_s"] else "-"
        lost = 100 * (1 - r["kept"] / r["real"])
        print(f"| {r['data']} | {r['pipeline']} | {r['cold_mb_s']:.2f} | {r['cached_mb_s']:.2f} | {repeat} | "
              f"{r['kept']:,} / {r['real']:,} | {lost:.2f}% | {r['rss']:.0f} |")
    print()
    for data in dict.fromkeys(r["data"] for r in rows):
        o, u = (next(r for r in rows if r["data"] == data and r["pipeline"] == p) for p in ("original", "ours"))
        print(f"{data}: ours cold is {u['cold_mb_s'] / o['cold_mb_s']:.1f}x the original's; "
              f"our cache hit is {u['cold_s'] / u['cached_s']:.1f}x faster than our cold in a new process, "
              f"{u['cold_s'] / u['repeat_s']:.0f}x as a repeated call in the same process.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    worker(cli) if cli.worker else main()
