"""The memory estimate (estimate.py) against the real peak of training steps on CPU.

    python bench/memory_bench.py                              # the 4 default shapes, fp32, fused loss, dropout 0
    python bench/memory_bench.py --shape 2x64x2:128:16 --shape 12x768x12:1024:1 --dropout 0.1 --steps 2

Each shape (layers x width x heads : block : batch, vocabulary 50304 as train.py pads GPT-2's) trains for
--steps steps in its own child process (estimate.measure_peak): forward, backward, AdamW (fused, the
Trainer's default adamw_torch_fused), gradients set to None, as train.py on CPU (fp32, fused loss on).
Measured: peak RSS growth, VmHWM after the steps minus VmRSS once the model and optimizer exist (weights
already in), the high-water mark reset through /proc/self/clear_refs. Predicted: estimate_memory's peak
minus its weights. Ratio = predicted / measured; the target is within 25% (0.75 to 1.25). Linux only.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimate import estimate_memory, measure_peak  # noqa: E402

# From 2x64 to GPT-2 124M, block 128 to 1024, batch 16 to 1. GPT-2 124M at block 1024 runs batch 1:
# batch 16 would need ~50 GB and minutes per step on a 2-core CPU.
DEFAULT_SHAPES = ["2x64x2:128:16", "4x256x4:256:8", "6x512x8:512:4", "12x768x12:1024:1"]
VOCAB = 50304


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        model, block, batch = text.split(":")
        layers, width, heads = (int(x) for x in model.split("x"))
        return layers, width, heads, int(block), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAYERSxWIDTHxHEADS:BLOCK:BATCH, e.g. 4x256x4:256:8") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Shapes default to " + ", ".join(DEFAULT_SHAPES) + ".")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="LxWxH:BLOCK:BATCH",
                   help="a model shape, block size and batch (repeatable); default: the 4 shapes below")
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement (default 2: AdamW's state "
                   "exists from the first, so the second shows the steady peak)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="residual, embedding and attention dropout (default 0, train.py's from scratch; >0 makes CPU "
                        "attention keep T x T matrices)")
    p.add_argument("--fused_loss", choices=("on", "off"), default="on", help="the fused LM-head loss (default on, as "
                   "train.py on CPU in fp32)")
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed |ratio - 1| (default 0.25)")
    args = p.parse_args(argv)
    shapes = args.shape or [parse_shape(s) for s in DEFAULT_SHAPES]
    fused = args.fused_loss == "on"
    rows, ok = [], True
    for layers, width, heads, block, batch in shapes:
        config = dict(n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=max(block, 128),
                      attn_pdrop=args.dropout, resid_pdrop=args.dropout, embd_pdrop=args.dropout)
        est = estimate_memory(config, batch, block, fused_loss=fused, optimizer="adamw_torch_fused")
        start = time.perf_counter()
        got = measure_peak(config, batch, block, fused_loss=fused, steps=args.steps)
        predicted, measured = est.total - est.weights, got["growth"]
        ratio = predicted / measured
        ok &= abs(ratio - 1) <= args.tolerance
        rows.append(f"| {layers}x{width} ({heads} heads) | {est.parameters / 1e6:.1f}M | {block} | {batch} "
                    f"| {est.weights / 2**20:.0f} | {est.total / 2**20:.0f} | {predicted / 2**20:.0f} "
                    f"| {measured / 2**20:.0f} | {ratio:.2f} | {time.perf_counter() - start:.0f} s |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"CPU, fp32, fused loss {args.fused_loss}, dropout {args.dropout}, {args.steps} AdamW steps; MiB; "
          "ratio = predicted growth / measured growth\n")
    print("| model | params | block | batch | weights | predicted peak | predicted growth | measured growth | ratio | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nAll within {args.tolerance:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
