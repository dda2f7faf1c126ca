"""Preparing a big corpus: speed per worker, peak memory by corpus size, kill -9 and resume, warm load.

    python bench/prepare_bench.py                       # 0.25, 1 and 4 GB; about 10 minutes on 2 cores
    python bench/prepare_bench.py --sizes 0.05 0.2      # a quick look

The corpora are synthetic, made from the WebText sample in ../shared/data (gpt-2-output-dataset JSONL): its
documents repeated, each copy numbered so that no two documents are byte-identical. Each preparation runs
`get_dataset_and_tokenizer(block_size=1024)` cold (empty cache) in a new process; times exclude Python imports
(the tokenizer is loaded first). Baselines: the same call with one worker (scaling), an uninterrupted preparation
(resume), the same bytes (every token and block file compared by hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 2
TMPFS = Path("/dev/shm")
WEBTEXT = ROOT.parent / "shared" / "data" / "gpt2-output" / "webtext.train.head1408.jsonl"


def make_corpus(path: Path, gb: float) -> float:
    """A JSONL file of about `gb` GB from the WebText sample; returns its size in MB."""
    docs = [json.loads(line)["text"] for line in WEBTEXT.open(encoding="utf-8")]
    with path.open("w", encoding="utf-8") as f:
        copy = 0
        while f.tell() < gb * 1e9:
            f.write("".join(json.dumps({"text": f"Copy {copy}. {d}"}) + "\n" for d in docs))
            copy += 1
    return path.stat().st_size / 1e6


def worker(cli) -> None:
    """One preparation in this process: RESULT {seconds, peak RSS of this process and of its largest worker}."""
    sys.path.insert(0, str(ROOT))
    from dataset import get_dataset_and_tokenizer
    from gpt2_tokenizer import load_tokenizer

    load_tokenizer()  # imports transformers: not part of the preparation
    start = time.perf_counter()
    _, train, val = get_dataset_and_tokenizer(dataset_path=cli.path, block_size=1024, cache_dir=cli.cache_dir,
                                              num_proc=cli.num_proc)
    seconds = time.perf_counter() - start
    blocks = len(train) + len(val)
    print("RESULT " + json.dumps({"seconds": seconds, "blocks": blocks,
                                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}),
          flush=True)


def prepare(path: Path, cache: Path, num_proc: int, kill_at: float | None = None) -> dict:
    """Run a preparation in a new process; with kill_at, SIGKILL it once that share of its shards is finished."""
    cmd = [sys.executable, __file__, "--worker", "--path", str(path), "--cache_dir", str(cache), "--num_proc", str(num_proc)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    if kill_at is not None:
        shards = -(-path.stat().st_size // (32 << 20))
        while proc.poll() is None:
            done = len(list(cache.glob(".tokens-*.partial/train-*.json")))
            if done >= kill_at * shards:
                os.killpg(proc.pid, signal.SIGKILL)  # the preparation and its workers, as the OOM killer or a node loss would
                break
            time.sleep(0.05)
        proc.wait()
        return {"seconds": time.perf_counter() - start, "shards_done": done, "shards": shards}
    out, err = proc.communicate()
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"preparation failed:\n{err[-3000:]}")
    return {**json.loads(line[7:]), "wall": time.perf_counter() - start}


def cache_digest(cache: Path) -> str:
    """One hash of every token and block file of a cache (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(cache.glob("*/*")):
        if f.suffix in (".tokens", ".arrow", ".npy"):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
    return h.hexdigest()


def main(cli) -> None:
    if not WEBTEXT.is_file():
        sys.exit(f"This benchmark reads {WEBTEXT} (../shared/data); it is absent here.")
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="prepare_bench-", dir=cli.work_dir))
    rows, scaling, resume = [], [], None
    try:
        for i, gb in enumerate(cli.sizes):
            corpus = work / f"corpus-{gb}GB.jsonl"
            mb = make_corpus(corpus, gb)
            if i == 0:  # scaling, 1..cores workers, and kill -9 at 50%, on the smallest corpus
                for n in range(1, cores + 1):
                    runs = []
                    for r in range(REPEATS):  # the best of REPEATS: this machine is shared
                        shutil.rmtree(work / f"cache-scale-{n}", ignore_errors=True)
                        runs.append(prepare(corpus, work / f"cache-scale-{n}", n))
                    best = min(runs, key=lambda r: r["seconds"])
                    scaling.append({"workers": n, "mb_s": mb / best["seconds"], "wall": best["wall"],
                                    "digest": cache_digest(work / f"cache-scale-{n}")})
                    if TMPFS.is_dir() and shutil.disk_usage(TMPFS).free > 8 * mb * 1e6:  # the same with the cache in memory
                        cache = Path(tempfile.mkdtemp(dir=TMPFS))
                        try:
                            runs = [prepare(corpus, cache / str(r), n) for r in range(REPEATS)]
                        finally:
                            shutil.rmtree(cache)
                        scaling[-1]["tmpfs_mb_s"] = mb / min(r["seconds"] for r in runs)
                    shutil.rmtree(work / f"cache-scale-{n}") if n > 1 else None
                killed = prepare(corpus, work / "cache-killed", cores, kill_at=0.5)
                rerun = prepare(corpus, work / "cache-killed", cores)
                reference = next(s for s in scaling if s["workers"] == cores)
                resume = {"killed_s": killed["seconds"], "rerun_s": rerun["wall"], "shards_done": killed["shards_done"],
                          "shards": killed["shards"], "uninterrupted_s": reference["wall"],
                          "same": cache_digest(work / "cache-killed") == scaling[0]["digest"]}
                shutil.rmtree(work / "cache-killed")
                shutil.rmtree(work / "cache-scale-1")
            cache = work / f"cache-{gb}"
            cold = prepare(corpus, cache, cores)
            warm = prepare(corpus, cache, cores)
            rows.append({"gb": gb, "mb": mb, "mb_s": mb / cold["seconds"], "rss": cold["rss_mb"], "worker_rss": cold["worker_rss_mb"],
                         "warm_s": warm["seconds"], "warm_wall": warm["wall"], "warm_rss": warm["rss_mb"]})
            shutil.rmtree(cache)
            corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nCPU: {cores} cores. Block size 1024. Times exclude Python imports.\n")
    print(f"{rows[0]['mb']:,.0f} MB corpus, best of {REPEATS} runs each; the last two columns with the cache on {TMPFS} "
          "(memory), which takes this machine's disk out of the measure.\n")
    print("| workers | MB/s | MB/s per worker | vs 1 worker | same bytes as 1 worker | MB/s, cache in memory | vs 1 worker |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for s in scaling:
        mem = (f"{s['tmpfs_mb_s']:.1f} | {s['tmpfs_mb_s'] / scaling[0]['tmpfs_mb_s']:.2f}x" if "tmpfs_mb_s" in s else "- | -")
        print(f"| {s['workers']} | {s['mb_s']:.1f} | {s['mb_s'] / s['workers']:.1f} | {s['mb_s'] / scaling[0]['mb_s']:.2f}x | "
              f"{'yes' if s['digest'] == scaling[0]['digest'] else 'NO'} | {mem} |")
    print(f"\n| corpus | MB/s ({cores} workers) | peak RSS, preparing process | peak RSS, largest worker | "
          "warm load (new process) | warm load, whole process | warm peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mb']:,.0f} MB | {r['mb_s']:.1f} | {r['rss']:.0f} MB | {r['worker_rss']:.0f} MB | {r['warm_s']:.2f} s | "
              f"{r['warm_wall']:.2f} s | {r['warm_rss']:.0f} MB |")
    if resume:
        total = resume["killed_s"] + resume["rerun_s"]
        print(f"\nkill -9 after {resume['shards_done']} of {resume['shards']} shards ({resume['killed_s']:.1f} s), rerun "
              f"{resume['rerun_s']:.1f} s: {total:.1f} s in all, {total / resume['uninterrupted_s']:.2f}x of an uninterrupted "
              f"preparation ({resume['uninterrupted_s']:.1f} s; these three are whole processes, imports included); same bytes: {'yes' if resume['same'] else 'NO'}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 4], help="Corpus sizes in GB (the first "
                        "also measures scaling and kill -9 then resume).")
    parser.add_argument("--work_dir", default=None, help="Where the corpora and caches go (default: the system's "
                        "temporary folder; 4 GB of input needs about 15 GB).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--num_proc", type=int, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    worker(cli) if cli.worker else main(cli)
