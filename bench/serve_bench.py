"""Serving throughput and latency of web_demo.py's API with N concurrent clients, batching against serial.

    python bench/serve_bench.py --model_path logs/final_model               # 1 and 8 clients
    python bench/serve_bench.py --clients 1 8 16 --device cuda               # on a GPU

Two servers run the same model, as `python web_demo.py` processes: ours (the engine
batches waiting requests, `--max_batch 16`) and the baseline, the same server decoding one sequence at a
time (`--max_batch 1`: a serial queue), or with `--baseline_tree DIR` the server of another checkout. For each number of clients, every client sends `--requests`
/v1/completions requests one after another (closed loop: the next when the answer is in; `--max_tokens`
tokens, top-k 40, a seed per request so both servers sample the same text), for `--rounds` rounds in which
the two servers (both running) take turns. Printed per server and client count: completion tokens/s over
the wall time, requests/s, and latency percentiles of the requests.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROMPTS = ["The history of the city", "In a statement on Monday, the company", "Scientists have found that",
           "The best way to learn a language", "After the game, the coach said", "The recipe calls for",
           "According to the report,", "When the war ended,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python web_demo.py` in a child process, ready when /v1/models answers."""

    def __init__(self, model_path: str, max_batch: int | None, device: str | None, log: Path, tree: Path = ROOT):
        self.port = free_port()
        cmd = [sys.executable, str(tree / "web_demo.py"), "--model_path", str(Path(model_path).resolve()), "--port", str(self.port),
               "--queue_size", "256", "--max_tokens_cap", "1000", "--max_sequences", "16"]
        if max_batch is not None:
            cmd += ["--max_batch", str(max_batch)]
        if device:
            cmd += ["--device", device]
        self.log = open(log, "w")
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        deadline = time.time() + 180
        while True:
            try:
                with OPENER.open(f"http://127.0.0.1:{self.port}/v1/models", timeout=5):
                    return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    sys.exit(f"error: the server did not start; see {log}")
                time.sleep(0.5)

    def complete(self, prompt: str, max_tokens: int, seed: int) -> tuple[int, float]:
        """(completion tokens, seconds) of one request."""
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "top_k": 40, "seed": seed}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with OPENER.open(req, timeout=600) as r:
            answer = json.loads(r.read())
        return answer["usage"]["completion_tokens"], time.perf_counter() - start

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run_clients(server: Server, clients: int, requests: int, max_tokens: int) -> tuple[int, float, list[float]]:
    """(completion tokens, wall seconds, each request's latency) of `clients` closed-loop clients."""
    def client(c):
        return [server.complete(PROMPTS[(c + i) % len(PROMPTS)], max_tokens, seed=1000 * c + i) for i in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return sum(n for n, _ in results), time.perf_counter() - start, [t for _, t in results]


def summary(runs: list[tuple[int, float, list[float]]]) -> dict:
    """Tokens/s and requests/s over all rounds' wall time; latency percentiles over all their requests."""
    wall = sum(w for _, w, _ in runs)
    latencies = sorted(t for _, _, ts in runs for t in ts)

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return {"tokens_s": sum(n for n, _, _ in runs) / wall, "requests_s": len(latencies) / wall, "p50": statistics.median(latencies),
            "p90": pct(90), "p99": pct(99)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="logs/final_model", help="A model folder (train.py's logs/final_model).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="Numbers of concurrent clients to measure.")
    parser.add_argument("--requests", type=int, default=6, help="Requests per client and round.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds per server and client count, the servers taking turns.")
    parser.add_argument("--max_tokens", type=int, default=64, help="New tokens per request.")
    parser.add_argument("--device", default=None, help="The servers' --device (default: the best available).")
    parser.add_argument("--baseline_tree", default=None,
                        help="Run the baseline server from this checkout (e.g. a git worktree of an older commit) with its "
                             "own defaults, instead of this tree with --max_batch 1.")
    args = parser.parse_args()
    if not Path(args.model_path).exists():
        sys.exit(f"error: {args.model_path} does not exist: train a model first (python train.py) or pass --model_path")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    print(f"device: {name}; model {args.model_path}; {args.requests} requests per client, {args.max_tokens} tokens each\n")
    baseline = (f"baseline ({args.baseline_tree})", None, Path(args.baseline_tree).resolve()) if args.baseline_tree else \
        ("baseline (serial, --max_batch 1)", 1, ROOT)
    servers = {}
    try:
        for label, max_batch, tree in (("ours (batched)", 16, ROOT), baseline):
            servers[label] = Server(args.model_path, max_batch, args.device, Path(f"/tmp/serve_bench_{len(servers)}.log"), tree)
            servers[label].complete(PROMPTS[0], 4, 0)  # warm up
        runs = {}
        for clients in args.clients:
            for _ in range(args.rounds):  # the servers take turns, so that the machine's drift hits both alike
                for label, server in servers.items():
                    runs.setdefault((label, clients), []).append(run_clients(server, clients, args.requests, args.max_tokens))
            for label in servers:
                print(f"  measured {label}, {clients} clients: {summary(runs[label, clients])['tokens_s']:.0f} tokens/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    table = {key: summary(r) for key, r in sorted(runs.items(), key=lambda kv: list(servers).index(kv[0][0]))}
    print("\n| server | clients | tokens/s | x one client | requests/s | p50 s | p90 s | p99 s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (label, clients), r in table.items():
        one = table[label, args.clients[0]]["tokens_s"]
        print(f"| {label} | {clients} | {r['tokens_s']:.0f} | {r['tokens_s'] / one:.2f} | {r['requests_s']:.2f} | {r['p50']:.3f} | "
              f"{r['p90']:.3f} | {r['p99']:.3f} |")


if __name__ == "__main__":
    main()
