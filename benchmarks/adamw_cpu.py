"""AdamW on the CPU, fused against the default (foreach) implementation: milliseconds per optimiser step on the
embedded CLIP's parameters (6.9M, 6.3M of them the token embedding), gradients random, in one run. The optimiser
step alone, not a training step; the two implementations round differently, so their trajectories part in the last
digits.

    python benchmarks/adamw_cpu.py               # torch's default thread count
    OMP_NUM_THREADS=1 python benchmarks/adamw_cpu.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def ms_per_step(params, fused, steps=20, warmup=3):
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused)
    for _ in range(warmup):  # the state tensors are allocated on the first step
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    torch.manual_seed(0)
    model = common.EmbeddedCLIP(common.EmbeddedCLIPConfig())
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"embedded CLIP: {sum(p.numel() for p in params):,} parameters, {torch.get_num_threads()} thread(s)")
    for run in (1, 2):  # twice, interleaved, to show the run-to-run spread
        default, fused = ms_per_step(params, fused=False), ms_per_step(params, fused=True)
        print(f"run {run}: default {default:.1f} ms, fused {fused:.1f} ms per step ({default / fused:.1f}x)")


if __name__ == "__main__":
    main()
