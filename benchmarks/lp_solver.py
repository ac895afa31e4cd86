"""LP's solver, before and after, on identical features in one run: torch.optim.LBFGS (lp.py's fit_logreg until
2026-12-03, kept below as the baseline) against lp.py's scipy L-BFGS-B with torch's loss and gradient, and
scikit-learn's LogisticRegression (the LP-FT code's) on the CPU as the reference. For each: the time of bench.py's
warm-started sweep (20 C over logspace(-7, 2)) and how far its objective is from scikit-learn's at each C; for the
two torch ones, in a second, untimed pass under torch.profiler, the tensor-to-number conversions
(aten::_local_scalar_dense: on a GPU each one waits for the device), the copies (aten::_to_copy: on a GPU the
device-to-host ones wait too) and all aten ops.

    python benchmarks/lp_solver.py                   # CUDA if available; bench.py's CUDA shape: 20,000 x 512, 20 classes
    python benchmarks/lp_solver.py --device cpu --n 4000 --dim 128 --classes 10   # bench.py's CPU shape
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import lp  # noqa: E402


def fit_torch_lbfgs(x, y, num_classes, c, init=None, max_iter=200):
    """The baseline: lp.py's fit_logreg until 2026-12-03 (torch.optim.LBFGS, strong Wolfe, history 20)."""
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = lp.logreg_objective(x, y, w, b, c) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def sweep(fit, x, y, classes, cs):
    """Warm-started fits over cs; the (W, b) reached at each C."""
    init, fits = None, []
    for c in cs:
        fits.append(init := fit(x, y, classes, float(c), init))
    return fits


def fit_sklearn(x, y, num_classes, c, init=None, max_iter=200):
    """The reference, as the LP-FT code calls it (warm start: the previous C's fit seeds this one)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, warm_start=init is not None)
    if init is not None:
        clf.coef_, clf.intercept_ = init[0].cpu().double().numpy(), init[1].cpu().double().numpy()
    clf.fit(x.cpu().numpy(), y.cpu().numpy())
    return torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--num-c", type=int, default=20)
    args = parser.parse_args()
    device = common.get_device(args.device)
    g = torch.Generator().manual_seed(0)  # drawn as bench.py draws its own (not the same draws): C matters
    y = torch.randint(args.classes, (args.n,), generator=g)
    x = (torch.randn(args.classes, args.dim, generator=g) * 0.15)[y] + torch.randn(args.n, args.dim, generator=g)
    x, y = ((x - x.mean()) / x.std()).to(device), y.to(device)
    cs = np.logspace(-7, 2, args.num_c)
    print(f"{device}, {args.n:,} x {args.dim} features, {args.classes} classes, {args.num_c} C, torch {torch.__version__}")
    print("| solver | sweep (s) | objective vs scikit-learn's, largest relative gap | to-number conversions | copies | "
          "aten ops |\n|---|---|---|---|---|---|")
    x64 = x.cpu().double()

    def objectives(fits):  # per C, in float64 on the CPU for all three
        return [lp.logreg_objective(x64, y.cpu(), w.cpu().double(), b.cpu().double(), float(c)).item() for (w, b), c
                in zip(fits, cs)]

    times, reference = {}, None
    for name, fit in (("scikit-learn (CPU, reference)", fit_sklearn), ("torch.optim.LBFGS (before)", fit_torch_lbfgs),
                      ("scipy L-BFGS-B (lp.py)", lp.fit_logreg)):
        fit(x[:100], y[:100], args.classes, 1.0)  # warm-up: first-call costs
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fits = sweep(fit, x, y, args.classes, cs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - start
        reference = reference or objectives(fits)
        gap = max(abs(p - q) / q for p, q in zip(objectives(fits), reference))
        counts = "| - | - | - |"
        if fit is not fit_sklearn:
            with profile() as prof:
                sweep(fit, x, y, args.classes, cs)
            ops = {e.key: e.count for e in prof.key_averages()}
            counts = (f"| {ops.get('aten::_local_scalar_dense', 0):,} | {ops.get('aten::_to_copy', 0):,} | "
                      f"{sum(v for k, v in ops.items() if k.startswith('aten::')):,} |")
        print(f"| {name} | {times[name]:.2f} | {gap:.1e} {counts}", flush=True)
    (_, sk), (_, before), (_, now) = times.items()
    print(f"\nlp.py's solver: {before / now:.1f}x faster than before, {sk / now:.1f}x faster than scikit-learn")


if __name__ == "__main__":
    main()
