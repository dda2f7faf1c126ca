"""This tree against an earlier commit, side by side in one run: generation and training tokens/s.

    python bench/versus.py --base HEAD~5 --model_path logs/final_model
    python bench/versus.py --base HEAD~5 --train_batches 2,16          # training only

The earlier commit is unpacked (`git archive`) into a temporary folder; each measurement runs in a
fresh process with that tree or this one on sys.path, the two alternating (this shared machine's speed
drifts within minutes), and the table shows medians and the ratio. Generation: generate_once (1 x
--length new tokens) and generate_batch (3 sequences, max_length 100) on the same model folder.
Training: train_bench.py's own worker for our train.py (small preset, each of --train_batches, its timed steps).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom,"

GENERATE_WORKER = r"""
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
import generate as G
model_path, length, reps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok, model, dev = G.load_model(model_path, device="cpu")
n_prompt = len(tok.encode(sys.argv[5]))
def texts(out):
    return [o["generated_text"] if isinstance(o, dict) else o for o in out]
def speed(fn):
    fn()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        new = sum(max(len(tok.encode(x)) - n_prompt, 0) for x in texts(out))
        best = max(best, new / (time.perf_counter() - t))
    return best
once = speed(lambda: [G.generate_once(tok, model, dev, sys.argv[5], max_new_tokens=length)])
batch = speed(lambda: G.generate_batch(tok, model, dev, sys.argv[5], max_length=100, num_return_sequences=3))
print("RESULT " + json.dumps({"once": once, "batch": batch}))
"""


def run(cmd: list[str], cwd: str) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"error: {' '.join(cmd[:3])} in {cwd} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def generation(tree: str, model_path: str, length: int) -> dict:
    return run([sys.executable, "-c", GENERATE_WORKER, tree, model_path, str(length), "3", PROMPT], tree)


def training(tree: str, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = run([sys.executable, str(Path(tree) / "bench" / "train_bench.py"), "--worker", "ours", "--batch", str(batch),
                 "--steps", str(steps), "--out", out], tree)
    return {f"train{batch}": r["tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="The earlier commit (any git revision) to compare this tree with.")
    p.add_argument("--model_path", help="Model folder both trees generate from (e.g. logs/final_model); without it, training only.")
    p.add_argument("--length", type=int, default=100, help="New tokens per generate_once call.")
    p.add_argument("--train_steps", type=int, default=13, help="Training steps per run (train_bench.py times those after its warm-up).")
    p.add_argument("--train_batches", default="16", help="Comma-separated training batch sizes (default 16; \"\" for none).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per tree, interleaved; the table shows medians.")
    args = p.parse_args(argv)
    model_path = str(Path(args.model_path).resolve()) if args.model_path else None
    batches = [int(b) for b in args.train_batches.split(",") if b.strip()]  # "" measures generation only
    with tempfile.TemporaryDirectory(prefix="versus-") as base:
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=False)
        if archive.returncode:
            raise SystemExit(f"error: git archive {args.base}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        for f in (ROOT / "gpt2_tokenizer").glob("*.json"):  # the BPE files are built on first use, not committed
            (Path(base) / "gpt2_tokenizer" / f.name).write_bytes(f.read_bytes())
        results = {"base": [], "this": []}
        for _ in range(args.repeats):
            for name, tree in (("base", base), ("this", str(ROOT))):
                row = generation(tree, model_path, args.length) if model_path else {}
                for batch in batches:
                    row.update(training(tree, args.train_steps, batch))
                results[name].append(row)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\nmedians of {args.repeats} interleaved runs; tokens/s; base {args.base} ({rev}) vs this tree\n")
    print("| measurement | base | this tree | this / base |\n|---|---:|---:|---:|")
    labels = {"once": f"generate_once, 1 x {args.length} new tokens", "batch": "generate_batch, 3 x max_length 100"}
    labels = {k: v for k, v in labels.items() if model_path}
    labels.update({f"train{b}": f"train.py, small preset, batch {b}" for b in batches})
    for key, label in labels.items():
        b, t = (statistics.median(r[key] for r in results[n]) for n in ("base", "this"))
        print(f"| {label} | {b:,.0f} | {t:,.0f} | {t / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
