"""Speed, measured side by side: our training path against a plain eager fp32 loop like the reference code's, in one
run on one device, so every number is a ratio against a baseline measured minutes apart on the same machine.

    python bench.py                       # CUDA: CLIP ViT-B/16 and ResNet-50 at 224 px (random weights: speed only)
    python bench.py --device cpu          # tiny models at small resolution, under 2 minutes on 2 cores

Sections: (a) training images/s and model FLOPs utilisation (MFU, against the device's bf16 peak), ours vs eager
fp32, on synthetic tensors and end to end from JPEG files; (b) FLYP image-text pairs/s; (c) feature extraction
images/s; (d) the LP sweep on identical features, lp.py's solver vs scikit-learn, time and accuracy; (e) the
share of step time spent waiting for data. Prints a table and writes JSON (--out).
"""
import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

# Dense bf16 tensor-core peak in FLOP/s (half the "with sparsity" figure of NVIDIA's datasheets), matched against the
# device name in this order: the PCIe and NVL cards run lower clocks than the SXM ones their names also match.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12))


def peak_flops(device):
    """The card's dense bf16 peak, or None (so no MFU rather than an invented one) for a card not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def models(device):
    """name -> (builder of an image classifier, resolution, batch). Random weights: speed does not depend on them."""
    import open_clip
    import torchvision

    def clip_visual(arch):
        def build():
            visual = open_clip.create_model(arch).visual
            return nn.Sequential(visual, nn.Linear(visual.output_dim, 1000))
        return build

    if device.type == "cuda":
        return {"clip-vit-b16": (clip_visual("ViT-B-16-quickgelu"), 224, 256),
                "resnet50": (lambda: torchvision.models.resnet50(), 224, 256)}
    embedded = common.EmbeddedCLIPConfig()
    return {"embedded-clip": (lambda: nn.Sequential(common.ConvTower(embedded.convs, embedded.embed_dim),
                                                    nn.Linear(embedded.embed_dim, 10)), 32, 64),
            "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64, 32)}


def forward_flops(model, x):
    """FLOPs of one image's forward pass. Attention runs as plain matmuls here: FlopCounterMode has no formula for
    the fused CPU attention kernel and would drop attention's FLOPs (4% of ViT-B/16's 35.1 GFLOPs at 224 px)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return counter.get_total_flops() / len(x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer(build, device, fast):
    """A model to train, what runs its forward (compiled on our path on CUDA) and its AdamW. fast = our path
    (channels-last, fused AdamW; bf16 autocast and compile on CUDA); otherwise eager fp32 with a plain AdamW."""
    torch.manual_seed(0)
    model = build().to(device)
    if fast:
        model = common.to_device(model, device)
    forward = common.maybe_compile(model, "auto" if fast else "off", device)
    return model, forward, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fast)


def train_rate(made, res, batch, device, fast, steps, batches=None, profile=None):
    """Images/s of a cross-entropy training step of `made` (trainer's model, forward and optimiser). `batches` = an
    iterator of real (x, y) batches; None = one synthetic batch reused. `profile`: a file for the profile of a few
    more steps, after the timed ones. Returns (images/s, share of time waiting for data): the time in next(batches),
    less what a batch decoded on the device spends waiting for the steps queued there first (step time, not data's)."""
    torch.backends.cudnn.benchmark = fast  # ours, as the method scripts on CUDA: shapes are static
    model, step_model, opt = made
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(x, y):
        with common.autocast(device, "auto" if fast else "fp32"):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    waited, start = 0.0, None
    with seconds_in(data, "wait_for_queued_work") as step_wait:
        for i in range(steps + 3):  # 3 warm-up steps (compilation, allocator, cuDNN autotuning)
            if i == 3:
                sync(device)
                start, waited = time.perf_counter(), 0.0
            if batches is not None:
                t, queued = time.perf_counter(), step_wait[0]
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                waited += time.perf_counter() - t - (step_wait[0] - queued)
            step(x, y)
        sync(device)
    elapsed = time.perf_counter() - start
    if profile:
        try:  # a profiler that fails (versions differ on a lent machine) must not cost the measurements
            write_profile(lambda: step(x, y), device, profile)
        except Exception as e:
            common.write_text_atomic(profile, f"profiling failed: {type(e).__name__}: {e}\n")
    return steps * batch / elapsed, waited / elapsed


@contextlib.contextmanager
def seconds_in(module, name):
    """module.name timed while in the block: yields a one-item list that adds up the seconds spent in it."""
    spent, inner = [0.0], getattr(module, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(module, name, timed)
    try:
        yield spent
    finally:
        setattr(module, name, inner)


def write_profile(step, device, path, steps=5):
    """torch.profiler's table of `steps` more steps of a warm (already compiled) model, the most self time on the
    device first: where a step's time goes, for a target that is missed."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            step()
        sync(device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    common.write_text_atomic(path, f"{steps} training steps of our path on {device}\n{table}\n")


def flyp_rate(device, fast, steps):
    """Image-text pairs/s of a FLYP step (both towers, CLIP loss)."""
    import open_clip

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = fast
    if device.type == "cuda":
        clip, res, batch = open_clip.create_model("ViT-B-16-quickgelu"), 224, 256
        tokens = open_clip.get_tokenizer("ViT-B-16-quickgelu")(["a photo of a dog."] * batch).to(device)
    else:
        clip, res, batch = common.EmbeddedCLIP(common.EmbeddedCLIPConfig()), 32, 128
        tokens = clip.tokenizer(["a picture of a circle."] * batch).to(device)
    clip = common.to_device(clip, device) if fast else clip.to(device)
    visual = common.maybe_compile(clip.visual, "auto" if fast else "off", device)
    encode_text = common.maybe_compile(clip.encode_text, "auto" if fast else "off", device)  # both towers, as flyp.py
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-5, fused=fast)
    x = torch.randn(batch, 3, res, res, device=device)
    labels = torch.arange(batch, device=device)
    for i in range(steps + 3):
        if i == 3:
            sync(device)
            start = time.perf_counter()
        with common.autocast(device, "auto" if fast else "fp32"):
            img = F.normalize(visual(x).float(), dim=-1)
            txt = F.normalize(encode_text(tokens).float(), dim=-1)
            logits = clip.logit_scale.exp() * img @ txt.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


@torch.inference_mode()
def extract_rate(build, res, batch, device, fast, steps):
    torch.backends.cudnn.benchmark = fast
    model = build().to(device).eval()
    if fast:
        model = common.to_device(model, device)
    run = common.maybe_compile(model, "auto" if fast else "off", device)
    x = torch.randn(batch * 4, 3, res, res, device=device)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        with common.autocast(device, "auto" if fast else "fp32"):
            run(x)
    sync(device)
    return steps * len(x) / (time.perf_counter() - start)


def lp_sweep(device, n, dim, classes, num_c):
    """lp.py's protocol with two solvers on identical standardised features: the warm-started sweep over the LP-FT
    code's C grid (logspace(-7, 2)), C selected on a validation split, test accuracy at the selected C. Ours = lp.py's
    fit (scipy's L-BFGS-B, torch's loss and gradient on `device`); theirs = scikit-learn's LogisticRegression (lbfgs,
    warm start, max_iter 200, as the LP-FT code). Class means close enough together that C matters (test accuracy ~60%,
    not a saturated 99%)."""
    import lp
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, dim, generator=g) * 0.15
    y = torch.randint(classes, (2 * n,), generator=g)
    x = means[y] + torch.randn(2 * n, dim, generator=g)
    mean, std = lp.standardize(x[:n])
    x = (x - mean) / std
    parts = {"train": slice(0, n), "val": slice(n, n + n // 2), "test": slice(n + n // 2, 2 * n)}
    cs = np.logspace(-7, 2, num_c)

    def accuracies(predict):  # {split: accuracy} for val and test
        return {k: 100 * (predict(x[s]) == y[s]).float().mean().item() for k, s in parts.items() if k != "train"}

    def selected(accs):  # lp.py's rule: best validation accuracy, the earlier C on ties
        i = max(range(len(cs)), key=lambda i: (accs[i]["val"], -i))
        return float(cs[i]), accs[i]["test"]

    xd, yd = x.to(device), y.to(device)
    lp.fit_logreg(xd[:100], yd[:100], classes, 1.0)  # warm-up, untimed: first-call costs (CUDA kernels, imports)
    LogisticRegression(max_iter=200).fit(x[:100].numpy(), y[:100].numpy())
    start, init, ours = time.perf_counter(), None, []
    for c in cs:
        w, b = init = lp.fit_logreg(xd[parts["train"]], yd[parts["train"]], classes, float(c), init)
        ours.append(accuracies(lambda f: (f.to(device) @ w.T + b).argmax(1).cpu()))
    sync(device)
    ours_s = time.perf_counter() - start

    start, theirs = time.perf_counter(), []
    clf = LogisticRegression(warm_start=True, max_iter=200)
    for c in cs:
        clf.set_params(C=float(c)).fit(x[parts["train"]].numpy(), y[parts["train"]].numpy())
        theirs.append(accuracies(lambda f: torch.from_numpy(clf.predict(f.numpy()))))
    sklearn_s = time.perf_counter() - start
    (c_ours, acc_ours), (c_theirs, acc_theirs) = selected(ours), selected(theirs)
    return {"features": [n, dim], "classes": classes, "c_values": num_c, "ours_s": ours_s, "sklearn_s": sklearn_s,
            "speedup": sklearn_s / ours_s, "selected_c_ours": c_ours, "selected_c_sklearn": c_theirs,
            "test_acc_ours": acc_ours, "test_acc_sklearn": acc_theirs, "acc_gap": abs(acc_ours - acc_theirs)}


@functools.cache
def jpeg_files(res, n_images):
    """`n_images` JPEG files of smooth random images a little larger than a `res` crop, like resized photos; written
    once per run (the models share them), deleted at exit."""
    from torchvision.io import encode_jpeg

    folder = Path(tempfile.mkdtemp(prefix="bench-jpeg-"))
    atexit.register(shutil.rmtree, folder, True)
    g = torch.Generator().manual_seed(0)
    for i in range(n_images):
        img = (torch.rand(3, res // 8, res // 8, generator=g) * 255).to(torch.uint8)
        img = F.interpolate(img[None].float(), size=(res + res // 8, res + res // 8), mode="bilinear")[0].to(torch.uint8)
        (folder / f"{i:05d}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    return sorted(str(p) for p in folder.glob("*.jpg"))


def jpeg_batches(res, batch, device, on_device=False):
    """An endless iterator of training batches from JPEG files through data.py's own pipeline (the FileSplit of every
    real dataset: DataLoader workers, pinned memory, persistent workers, RandomResizedCrop + flip, normalisation on the
    device). on_device: workers only read bytes and batches are decoded where they go (RFT_GPU_DECODE=1).
    Returns the split (its cpu_decoded_files) and the iterator."""
    files = jpeg_files(res, 8 * batch)  # several batches a pass: the workers' prefetch is not drained at every pass
    pre = data.Preprocess(res, res, data.IMAGENET_MEAN, data.IMAGENET_STD, "bilinear", (0.08, 1.0), True)
    split = data.file_split(files, [i % 10 for i in range(len(files))], pre, train=True)
    split = dataclasses.replace(split, decode_on_device=on_device)
    g = torch.Generator().manual_seed(0)

    def forever():
        while True:
            yield from split.batches(batch, device, shuffle=True, drop_last=True, generator=g)
    return split, forever()


def rate_of(cell):
    """images/s of a measured cell, or None where it failed."""
    return cell.get("images_per_s")


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def num(value, fmt):
    """A number for the table; a failed cell (None, or its error) says so."""
    return format(value, fmt) if isinstance(value, (int, float)) else "failed"


def train_rows(name, build, res, batch, device, steps, peak, cell, profile=None):
    """Section (a) and (e) for one model: eager fp32 vs ours on synthetic tensors (`profile`: a file for a profile of
    ours), ours from JPEG files (decoded by the workers, and on CUDA also by nvJPEG on the GPU); then section (c),
    feature extraction. Each measurement goes through `cell`, under train/<name>/ and extract/<name>/. Yields the
    table's two rows, each when it is measured (a time-out during extraction keeps the training row)."""
    gflops = cell("train", name, "train_gflops_per_image",  # training ~ 3x forward
                  measure=lambda: 3 * forward_flops(build(), torch.randn(2, 3, res, res)) / 1e9)
    flops = gflops * 1e9 if isinstance(gflops, float) else None
    rates = {}
    ours = functools.cache(lambda: trainer(build, device, True))  # one compile of ours (a minute of a GPU's time)
    for path, fast in (("eager_fp32", False), ("ours", True)):
        def synthetic_rate(fast=fast):
            made = ours() if fast else trainer(build, device, False)
            rate, _ = train_rate(made, res, batch, device, fast, steps, profile=profile if fast else None)
            return {"images_per_s": rate, "mfu": rate * flops / peak if peak and flops else None}
        rates[path] = cell("train", name, path, measure=synthetic_rate)
    synthetic, eager = rate_of(rates["ours"]), rate_of(rates["eager_fp32"])
    gpu_decode = device.type == "cuda"  # nvJPEG; on a CPU it would only move decoding out of the workers
    for key, on_device in (("ours_jpeg", False), ("ours_jpeg_decode_on_device", True))[:2 if gpu_decode else 1]:
        if "error" in rates["ours"]:  # ours did not build or compile: each JPEG cell would try again, for minutes
            rates[key] = cell("train", name, key, measure=lambda: {"error": "not measured: ours failed"})
            continue

        def jpeg_rate(on_device=on_device):
            split, batches = jpeg_batches(res, batch, device, on_device)
            rate, wait = train_rate(ours(), res, batch, device, True, steps, batches)  # the synthetic cell's model
            return {"images_per_s": rate, "data_wait_share": wait, "share_of_synthetic": ratio(rate, synthetic),
                    "files_decoded_on_cpu_instead": split.cpu_decoded_files}  # 0 unless on_device fell back
        rates[key] = cell("train", name, key, measure=jpeg_rate)
    speedup = cell("train", name, "speedup", measure=lambda: ratio(synthetic, eager))
    jpeg = rates["ours_jpeg"]
    notes = (f"MFU {num(rates['ours'].get('mfu'), '.1%') if peak else '–'}; JPEG {num(rate_of(jpeg), '.0f')} img/s "
             f"({num(jpeg.get('share_of_synthetic'), '.0%')} of synthetic, "
             f"{num(jpeg.get('data_wait_share'), '.0%')} waiting for data)")
    if gpu_decode:
        nvjpeg = rates["ours_jpeg_decode_on_device"]
        notes += (f"; decoded on the GPU {num(rate_of(nvjpeg), '.0f')} img/s "
                  f"({num(nvjpeg.get('data_wait_share'), '.0%')} waiting)")
    yield (f"| train {name} {res}px b{batch} (img/s) | {num(eager, '.0f')} | {num(synthetic, '.0f')} | "
           f"{num(speedup, '.2f')}× | {notes} |")
    # On CUDA a third of the steps (rounded up), of 4 batches each: more images than training, in less GPU time
    ext_steps = -(-steps // 3) if device.type == "cuda" else steps
    ext = {path: cell("extract", name, path, measure=lambda fast=fast: extract_rate(build, res, batch, device, fast,
                                                                                  ext_steps))
           for path, fast in (("eager_fp32", False), ("ours", True))}
    yield (f"| extract {name} (img/s) | {num(ext['eager_fp32'], '.0f')} | {num(ext['ours'], '.0f')} | "
           f"{num(ratio(ext['ours'], ext['eager_fp32']), '.2f')}× | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda' (default: auto)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 30 CUDA, 5 CPU)")
    parser.add_argument("--out", default="bench.json", help="JSON results file (default: bench.json)")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of our training step of the "
                                                        "first model measured (CUDA: ViT-B/16) to this file")
    parser.add_argument("--only", nargs="+", default=None, metavar="PART",
                        help="measure only these parts, in the usual order: the first model, flyp, lp, the other "
                             "model (models: clip-vit-b16 resnet50 on CUDA, embedded-clip resnet18 on a CPU)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps}: must be at least 1")
    for flag, path in (("--out", args.out), ("--profile", args.profile)):  # before minutes of measuring, not after
        if path and not Path(path).absolute().parent.is_dir():
            raise SystemExit(f"error: {flag} {path}: {Path(path).absolute().parent} is not a folder")
    common.check_environment()
    device = common.get_device(args.device)
    specs = models(device)
    (first, spec), *rest = specs.items()  # the first model, FLYP and LP before the other model
    parts = [first, "flyp", "lp", *(name for name, _ in rest)]
    wanted = args.only or parts
    if any(p not in parts for p in wanted):
        raise SystemExit(f"error: --only {next(p for p in wanted if p not in parts)!r}: choose from {', '.join(parts)}")
    profiled = next((name for name in specs if name in wanted), None)  # the first model measured
    if args.profile and profiled is None:
        raise SystemExit(f"error: --profile profiles a model's training step, and --only names none: add one of "
                         f"{', '.join(specs)}")
    steps = args.steps or (30 if device.type == "cuda" else 5)  # (not 0: refused above)
    peak = peak_flops(device)
    report = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
              "torch": str(torch.__version__), "threads": torch.get_num_threads(), "steps": steps,
              "measured": wanted, "train": {}, "extract": {}}
    print(f"device: {report['device']}, torch {report['torch']}, {steps} timed steps per cell\n")
    print("| measurement | eager fp32 (reference-style) | ours | ratio | notes |\n|---|---|---|---|---|", flush=True)
    failed = []

    def cell(*path, measure):
        """report[path[0]][path[1]]... = measure(), or the error it raised. The JSON is rewritten after every cell: on
        a lent GPU neither a failing cell nor a time-out costs the cells already measured."""
        *parents, key = path
        node = report
        for k in parents:
            node = node.setdefault(k, {})
        try:
            node[key] = measure()
        except Exception as e:  # reported, and the exit status says so, after the other cells have run
            traceback.print_exc()
            node[key] = {"error": f"{type(e).__name__}: {e}"}
            failed.append("/".join(path))
        common.write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
        return node[key]

    def model_rows(name, build, res, batch):
        report["train"][name] = {"resolution": res, "batch": batch}
        profile = args.profile if name == profiled else None
        for row in train_rows(name, build, res, batch, device, steps, peak, cell, profile):
            print(row, flush=True)

    if first in wanted:
        model_rows(first, *spec)
    if "flyp" in wanted:
        flyp = {path: cell("flyp", path, measure=lambda fast=fast: flyp_rate(device, fast, steps))
                for path, fast in (("eager_fp32", False), ("ours", True))}
        print(f"| FLYP pairs/s | {num(flyp['eager_fp32'], '.0f')} | {num(flyp['ours'], '.0f')} | "
              f"{num(ratio(flyp['ours'], flyp['eager_fp32']), '.2f')}× | |", flush=True)
    if "lp" in wanted:
        shape = (20_000, 512, 20, 20) if device.type == "cuda" else (4_000, 128, 10, 20)
        lp = cell("lp_sweep", measure=lambda: lp_sweep(device, *shape))
        if "error" in lp:
            print("| LP sweep (s) | failed | failed | failed× | |", flush=True)
        else:
            print(f"| LP sweep {lp['features'][0]}×{lp['features'][1]}, {lp['c_values']} C (s) | sklearn "
                  f"{lp['sklearn_s']:.1f} | ours {lp['ours_s']:.1f} | {lp['speedup']:.1f}× | test acc at the C chosen "
                  f"on val: {lp['test_acc_ours']:.2f} vs {lp['test_acc_sklearn']:.2f} (gap {lp['acc_gap']:.2f}) |",
                  flush=True)
    for name, spec in rest:
        if name in wanted:
            model_rows(name, *spec)
    print(f"\nwrote {args.out}")
    if failed:
        raise SystemExit(f"error: {len(failed)} measurement(s) failed ({', '.join(failed)}); tracebacks above, "
                         f"and in {args.out} as 'error'")


if __name__ == "__main__":
    main()
