"""Training steps on CPU in NCHW against channels-last (NHWC) memory order, side by side in one run.

    python benchmarks/channels_last.py [--models resnet10t,resnet18,tf_efficientnet_lite0,deit_tiny_distilled_patch16_224]
                                       [--size 112 --batch 32 --threads 1 --steps 8 --rounds 3]

For each model: images/s of a whole training step (forward, cross-entropy, backward, AdamW) on
random inputs, with one training worker's share of the CPU (``--threads``). The two memory orders
alternate for ``--rounds`` rounds so that drift in the machine's speed hits both; the last column is
the NHWC / NCHW ratio of the medians, and what ``train.channels_last=auto`` picks for the model on
CPU (``pipeline.models.prefers_channels_last``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.models import build_student, prefers_channels_last  # noqa: E402


def steps_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Images/s of ``steps`` training steps after two warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(x)
        logits = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet10t,resnet18,tf_efficientnet_lite0,deit_tiny_distilled_patch16_224")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"training step at {args.size} px, batch {args.batch}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'model':36} {'NCHW img/s':>10} {'NHWC img/s':>10} {'NHWC/NCHW':>9}  auto picks")
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        model, _ = build_student(name, "none", 5, args.size, 0.0)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)
        model.train()
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, 5, (args.batch,))
        rates: dict[str, list[float]] = {"nchw": [], "nhwc": []}
        for _ in range(args.rounds):
            for order in ("nchw", "nhwc"):
                fmt = torch.channels_last if order == "nhwc" else torch.contiguous_format
                model = model.to(memory_format=fmt)
                rates[order].append(steps_per_second(model, x.contiguous(memory_format=fmt), y, args.steps))
        nchw, nhwc = statistics.median(rates["nchw"]), statistics.median(rates["nhwc"])
        auto = "NHWC" if prefers_channels_last(model, cpu) else "NCHW"
        print(f"{name:36} {nchw:10.1f} {nhwc:10.1f} {nhwc / nchw:9.2f}  {auto}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
