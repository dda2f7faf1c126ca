"""The training loss of GPT-2's output layer, forward and backward: model.lm_head_loss against logits + cross_entropy
(what transformers and nanoGPT compute) and torch's F.linear_cross_entropy, side by side in one process.

    python bench/loss_bench.py                      # CPU: the small preset's width, 256 and 2048 tokens, fp32 and bf16 GEMMs
    python bench/loss_bench.py --device cuda        # GPU: GPT-2 124M's width, 12 x 1024 tokens, bf16, eager and compiled

Each row is the median of --repeats timed calls after a warm-up (CUDA: timed with synchronisation), and its peak
memory above the inputs (CUDA only). Rows that the installed torch cannot run (F.linear_cross_entropy before torch
2.13) say so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import lm_head_loss  # noqa: E402

VOCAB = 50304  # GPT-2's 50257, padded as train.py pads it


def reference(hidden, weight, labels, dtype):
    """transformers' ForCausalLM loss (nanoGPT's too): logits in the autocast dtype, cross_entropy in fp32."""
    logits = (hidden.to(dtype) @ weight.to(dtype).t()).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def library(hidden, weight, labels, dtype):
    """torch's F.linear_cross_entropy with its chunked path (LinearCrossEntropyOptions())."""
    options = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype),
                                  labels[:, 1:].reshape(-1), options=options)


def ours(hidden, weight, labels, dtype):
    return lm_head_loss(hidden, weight, labels, gemm_dtype=dtype)


def timed(fn, hidden, weight, labels, dtype, device, repeats):
    def once():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, dtype).backward()

    once()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return statistics.median(times), peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="Where to run (default cpu).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed calls per row; the table shows the median.")
    cli = parser.parse_args(argv)
    device = cli.device
    if device == "cuda":
        shapes, width, dtypes, compiles = [(12, 1024)], 768, [torch.bfloat16], [False, True]
    else:
        shapes, width, dtypes, compiles = [(1, 256), (8, 256)], 256, [torch.float32, torch.bfloat16], [False]
    has_library = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# Output-layer loss, forward + backward: {name}, torch {torch.__version__}, width {width}, vocabulary {VOCAB}\n")
    print("| tokens | GEMMs | compiled | implementation | ms | vs logits + cross_entropy | peak memory |")
    print("|---:|---|---|---|---:|---:|---:|")
    torch.manual_seed(0)
    for batch, block in shapes:
        hidden = torch.randn(batch, block, width, device=device, requires_grad=True)
        weight = (torch.randn(VOCAB, width, device=device) * 0.02).requires_grad_()
        labels = torch.randint(0, 50257, (batch, block), device=device)
        for dtype in dtypes:
            for compiled in compiles:
                rows = {"logits + cross_entropy": reference, "model.lm_head_loss": ours}
                rows["F.linear_cross_entropy"] = library if has_library else None
                base = None
                for label, fn in rows.items():
                    if fn is None:
                        print(f"| {batch * block} | {str(dtype)[6:]} | {compiled} | {label} | not in torch {torch.__version__} | | |")
                        continue
                    run = torch.compile(fn) if compiled else fn
                    seconds, peak = timed(run, hidden, weight, labels, dtype, device, cli.repeats)
                    base = base or seconds
                    memory = f"{peak / 2**20:,.0f} MiB" if peak is not None else "n/a"
                    print(f"| {batch * block} | {str(dtype)[6:]} | {compiled} | {label} | {1e3 * seconds:,.1f} | "
                          f"{base / seconds:.2f}x | {memory} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
