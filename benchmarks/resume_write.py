"""How long a run's loop waits for resume.pt at the end of each epoch: the background write (common.Results:
save_for_resume copies the state, a thread writes and flushes it) against writing it in the loop (common.save_atomic,
what it did before), in one run, on CLIP ViT-B/16 (random weights: no download) under FLYP's fused AdamW, the
largest state our recipes save, at four epochs' ends (the first allocates the copy's memory, the others reuse it).
Also what the background write takes from a training loop meanwhile: the rate of a matrix-multiplication loop (a CPU
step's stand-in) while the write is under way, against the same loop alone.

    python benchmarks/resume_write.py                 # ViT-B-16; about 1 minute and 7 GB of memory here
    python benchmarks/resume_write.py RN50            # another open_clip architecture
    python benchmarks/resume_write.py ViT-B-16 cuda   # the state on a GPU: the copy is a device-to-host transfer
"""
import copy
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import flyp  # noqa: E402


def training_state(arch, device):
    """The model, the best epoch's weights and a fused AdamW that has stepped once: what FLYP's resume.pt holds."""
    model = open_clip.create_model(arch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates the moments
    return model, optimizer, (50.0, 1, copy.deepcopy(model.state_dict()))


def matmul_rate(seconds, stop=None):
    """512x512 matrix products per second, for `seconds` or until `stop()` says so."""
    a = torch.randn(512, 512)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and not (stop and stop()):
        a @ a
        n += 1
    return n / (time.perf_counter() - start)


def main(arch="ViT-B-16", device="cpu", repeats=4):
    torch.manual_seed(0)
    model, optimizer, best = training_state(arch, device)
    training = {"model": model, "optimizer": optimizer}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as folder:  # where runs/ goes
        results = common.Results(folder, "flyp", flyp.Args(dataset="embedded-tiny"), torch.device(device))
        results.log(1, {"acc/id_val": 50.0})
        live = {"best": best, "training": {k: v.state_dict() for k, v in training.items()}}
        in_loop, returned, written, alone, during = [], [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            common.save_atomic(live, Path(folder) / "resume.pt")
            in_loop.append(time.perf_counter() - start)

            start = time.perf_counter()
            results.save_for_resume(1, best, training)
            returned.append(time.perf_counter() - start)
            during.append(matmul_rate(60, stop=lambda: not results.writing.is_alive()))
            common.wait_for_writes()
            written.append(time.perf_counter() - start)
            alone.append(matmul_rate(3))
        size = (Path(folder) / "resume.pt").stat().st_size

    def mean(xs):
        return sum(xs) / len(xs)

    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    print(f"{arch} + fused AdamW on the {where}: resume.pt {size / 1e9:.2f} GB, {torch.get_num_threads()} threads, "
          f"{repeats} epochs")
    print(f"| written in the loop (before) | the loop waits {mean(in_loop):.2f} s an epoch |")
    later = mean(returned[1:])
    print(f"| written in the background | the loop waits {returned[0]:.2f} s the first epoch (the copy, in new "
          f"memory), {later:.2f} s the others (copied into the first's memory) | {mean(in_loop) / later:.0f}x less "
          f"waiting | on the disk after {mean(written):.2f} s |")
    print(f"| a matmul loop meanwhile | {mean(during):.0f}/s against {mean(alone):.0f}/s alone "
          f"({mean(during) / mean(alone):.0%}) |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
