"""Linear probing (LP): train only a linear head on frozen pretrained features.

Paper: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022, https://arxiv.org/abs/2202.10054 (the LP recipe of its code).
Recipe: features extracted once with the backbone in eval mode; ONE scalar mean and std standardise all features;
multinomial L2-regularised logistic regression swept over C = logspace(-7, 2, 50), strongest regularisation first,
each fit warm-started from the previous one; C chosen on ID validation accuracy. The regression is scikit-learn's
`LogisticRegression(C)`: its objective, its solver (scipy's L-BFGS-B) and settings, with the loss and its gradient
computed by torch on the run's device (GPU or CPU).

    python lp.py                       # the embedded world
    python lp.py --dataset embedded --seed 1
    python lp.py --dataset living17 --data-root /data   # MoCo-v2 weights in ~/.cache/robust-finetuning/weights/

Sources of the defaults, deviations from the paper, logged metrics, results: docs/lp.md
"""
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import threadpoolctl
import torch
import torch.nn.functional as F

import common
import data


@dataclass
class Args:
    dataset: str = "embedded"
    """dataset name (see data.DATASETS)"""
    data_root: str = None
    """folder holding the real datasets (else $RFT_DATA; layouts: docs/datasets.md); unused by the embedded world"""
    backbone: str = None
    """pretrained backbone (see common.BACKBONES); default: the dataset's"""
    weights: str = None
    """local weights file (or open_clip pretrained tag) for real backbones; default: the backbone's official file in
    $RFT_CACHE/weights (~/.cache/robust-finetuning/weights)"""
    seed: int = 0
    """seed of the ID training draw and of every random choice"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'"""
    precision: str = "auto"
    """'auto' (bf16 autocast on a GPU with bf16 tensor cores, A100 or newer; else fp32), 'bf16' or 'fp32'"""
    compile: str = "auto"
    """torch.compile the backbone: 'auto' (on a GPU that Triton supports, V100 or newer), 'on' or 'off'"""
    out: str = None
    """output folder; default runs/<method>/<dataset>/seed<seed>"""
    c_min: float = 1e-7
    """smallest inverse regularisation strength C of the LP sweep (LP-FT code)"""
    c_max: float = 1e2
    """largest C of the LP sweep (LP-FT code)"""
    num_c: int = 50
    """number of C values, log-spaced (LP-FT code)"""
    max_iter: int = 200
    """L-BFGS iterations per C (LP-FT code: scikit-learn max_iter 200)"""


# ----- method: logistic regression on standardised features (edit here) -----
def standardize(train_feats):
    """One scalar mean and one scalar std over the whole train-feature matrix (LP-FT code), not per dimension."""
    return train_feats.mean().item(), train_feats.std().item()


def fit_logreg(x, y, num_classes, c, init=None, max_iter=200):
    """Multinomial logistic regression minimising sum_i CE_i + ||W||^2 / (2C) (scikit-learn's objective scaled by
    1/C; the bias is not penalised) with scikit-learn's own solver and settings: scipy's L-BFGS-B on the mean loss,
    tol 1e-4, up to 50 line-search steps. Loss and gradient come from torch on x's device; the solver's few vectors
    stay on the host, so a GPU waits once per evaluation. Returns (W [k, d], b [k]) on x's device."""
    k, d = num_classes, x.shape[1]

    def loss_and_grad(theta):  # theta = W flattened, then b
        theta = torch.tensor(theta, dtype=x.dtype, device=x.device, requires_grad=True)
        loss = logreg_objective(x, y, theta[:k * d].view(k, d), theta[k * d:], c) / len(y)
        loss.backward()
        out = torch.cat([loss.detach().view(1), theta.grad]).double().cpu().numpy()  # one copy to the host
        return out[0], out[1:]

    theta = np.zeros(k * d + k) if init is None else torch.cat([init[0].flatten(), init[1]]).double().cpu().numpy()
    with threadpoolctl.threadpool_limits(1, user_api="blas"):  # idle BLAS threads would spin against torch's
        theta = scipy.optimize.minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B", options={
            "maxiter": max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps}).x
    theta = torch.tensor(theta, dtype=x.dtype, device=x.device)
    return theta[:k * d].view(k, d), theta[k * d:]


def logreg_objective(x, y, w, b, c):
    """scikit-learn's LogisticRegression objective / C: sum of cross-entropies + ||W||^2 / (2C)."""
    return F.cross_entropy(x @ w.T + b, y, reduction="sum") + (w ** 2).sum() / (2 * c)
# ----- end of method -----


def main(args):
    device, results, log = common.setup(args, "lp")
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    common.describe(dataset, results, log)
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    encoder = common.maybe_compile(common.to_device(backbone.encoder, device), args.compile, device)

    # Features once: the backbone never trains, so the evaluation features are also the reference features.
    train_feats = common.extract_features(encoder, dataset.train, device, args.precision, cache=common.feature_cache(
        backbone, dataset, "id_train", device, args.precision, args.seed))  # one augmented view per image; cached
    feats = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)
    mean, std = standardize(train_feats)
    x = ((train_feats - mean) / std).to(device)
    y = dataset.train.labels.to(device)
    log(f"{len(y)} training features of dim {x.shape[1]}; sweeping {args.num_c} values of C")

    # ----- method: the C sweep, each C warm-started from the last solution (edit here) -----
    records, init = [], None
    grid = np.logspace(np.log10(args.c_min), np.log10(args.c_max), args.num_c)  # the LP-FT code's grid
    for i, c in enumerate(common.progress(grid, desc="C sweep")):
        w, b = init = fit_logreg(x, y, len(dataset.classnames), float(c), init, args.max_iter)
        metrics = common.evaluate(feats, lambda f: ((f - mean) / std) @ w.T + b, dataset, feats, device)
        records.append(results.log(i, metrics, c=float(c)))
    # ----- end of method -----

    best = common.select_best(records)
    log(f"best C {best['c']:.3g} (by ID val) | {common.format_metrics(best['metrics'])}")
    results.done({"step": best["step"], "c": best["c"], "metrics": best["metrics"]})
    return best


if __name__ == "__main__":
    main(common.parse_args(Args, description=__doc__))
