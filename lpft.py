"""LP-FT: linear probing first, then full fine-tuning starting from the LP head.

Paper: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022, https://arxiv.org/abs/2202.10054 (Sec. 4; the recipe of its code).
Stage 1 = the LP recipe (scalar-standardised features, warm-started C sweep, C chosen on ID validation), its head
mapped back to raw features. Stage 2 = the FT recipe (SGD momentum 0.9, cosine over epochs, batch 64) from that head
with a smaller learning rate and the whole network in eval mode (BatchNorm statistics frozen, dropout off), which the
authors confirmed their numbers need. The stage-2 epoch with the best ID validation accuracy is reported.

    python lpft.py                     # the embedded world
    python lpft.py --dataset embedded --seed 1
    python lpft.py --dataset living17 --data-root /data --weights moco_v2_800ep_pretrain.pth.tar

Sources of the defaults, deviations from the paper, logged metrics, results: docs/lpft.md
"""
import copy
import time
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import threadpoolctl
import torch
import torch.nn as nn
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
    save: bool = False
    """save the selected model to <out>/model.pt (state dict + args; what wiseft.py reads)"""
    resume: bool = False
    """go on after the last epoch an interrupted run in <out> finished (its resume.pt); none there: start afresh"""
    epochs: int = None
    """training epochs; default: the dataset's recipe (RECIPES below)"""
    batch_size: int = None
    """training batch size; default: the dataset's recipe (LP-FT paper: 64; 128 on ImageNet)"""
    lr: float = None
    """learning rate; default: the dataset's recipe (RECIPES below)"""
    momentum: float = 0.9
    """SGD momentum (LP-FT code)"""
    weight_decay: float = 0.0
    """SGD weight decay (LP-FT code: 0)"""
    c_min: float = 1e-7
    """smallest inverse regularisation strength C of the LP sweep (LP-FT code)"""
    c_max: float = 1e2
    """largest C of the LP sweep (LP-FT code)"""
    num_c: int = 50
    """number of C values, log-spaced (LP-FT code)"""
    max_iter: int = 200
    """L-BFGS iterations per C (LP-FT code: scikit-learn max_iter 200)"""


# Per-dataset defaults. Real datasets: the LP-FT code's recipe (FT's epochs and batch size, the stage-2 learning rate
# its grid search chose; ImageNet: the lowest of its grid); datasets it never ran (iWildCam, PCam, SST2, your own
# folder) take Living-17's, unswept (docs/recipes.md). Embedded world: lr 1e-4, the top of the paper's LP-FT grid
# (ID val preferred 1e-3, which diverged on seed 1), 5 epochs for run time (docs/embedded.md).
RECIPES = {
    "embedded": {"epochs": 5, "lr": 1e-4, "batch_size": 64},
    "embedded-tiny": {"epochs": 2, "lr": 1e-4, "batch_size": 64},
    "living17": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
    "entity30": {"epochs": 20, "lr": 3e-5, "batch_size": 64},
    "cifar10": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
    "domainnet": {"epochs": 50, "lr": 3e-7, "batch_size": 64},
    "fmow": {"epochs": 50, "lr": 1e-4, "batch_size": 64},
    "imagenet": {"epochs": 10, "lr": 1e-5, "batch_size": 128},
    "iwildcam": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
    "pcam": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
    "sst2": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
    "folder": {"epochs": 20, "lr": 1e-4, "batch_size": 64},
}


# ----- method: logistic regression on standardised features (stage 1, edit here) -----
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


def linear_probe(args, dataset, train_feats, ref, device):
    """Stage 1: the LP sweep on frozen features; returns the ID-validation-best head in raw-feature space."""
    mean, std = standardize(train_feats)
    x, y = ((train_feats - mean) / std).to(device), dataset.train.labels.to(device)
    val = ((ref["id_val"] - mean) / std).to(device)
    best, init = None, None
    for c in common.progress(np.logspace(np.log10(args.c_min), np.log10(args.c_max), args.num_c), desc="LP: C sweep"):
        w, b = init = fit_logreg(x, y, len(dataset.classnames), float(c), init, args.max_iter)
        acc = ((val @ w.T + b).argmax(1).cpu() == dataset.val.labels).float().mean().item()
        if best is None or acc > best[0]:
            best = (acc, float(c), w, b)
    _, c, w, b = best
    return w / std, b - (w * mean / std).sum(1), c  # W_raw = W / std, b_raw = b - W (mean / std) 1
# ----- end of method -----


# ----- method: which parameters train and how the head starts (stage 2, edit here) -----
def build_model(encoder, w, b):
    """The pretrained encoder followed by a linear head initialised from the LP solution."""
    head = nn.Linear(encoder.output_dim, len(b))
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return nn.Sequential(encoder, head)


def set_train_mode(model):
    model.eval()  # the whole network stays in eval mode in stage 2 (LP-FT code; BatchNorm statistics frozen)
# ----- end of method -----


def main(args):
    device, results, log = common.setup(args, "lpft")
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    recipe = common.recipe(args, RECIPES[dataset.name])  # flags override the dataset's recipe
    common.describe(dataset, results, log, recipe)
    epochs, lr, batch_size = recipe["epochs"], recipe["lr"], recipe["batch_size"]
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    encoder = common.to_device(backbone.encoder, device)
    ref = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)  # distortion origin

    # ----- method: stage 1, the linear probe, and the model that starts from its head (edit here) -----
    train_feats = common.extract_features(encoder, dataset.train, device, args.precision, cache=common.feature_cache(
        backbone, dataset, "id_train", device, args.precision, args.seed))  # one augmented view per image; cached
    w, b, c = linear_probe(args, dataset, train_feats, ref, device)
    model = build_model(encoder, w, b).to(device)
    metrics = common.evaluate(ref, model[1], dataset, ref, device)  # stage-2 start = the LP head
    results.log(0, metrics, stage="lp", c=c)
    log(f"LP head (C {c:.3g}) | {common.format_metrics(metrics)}")
    # ----- end of method -----
    encode = common.maybe_compile(model[0], args.compile, device)  # the saved model stays unwrapped
    net = common.distribute(nn.Sequential(encode, model[1]), device)  # what trains: DDP-wrapped under torchrun
    # ----- method: the optimiser and its schedule (edit here) -----
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)  # stepped per epoch
    # ----- end of method -----
    g = torch.Generator().manual_seed(args.seed)
    training = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data_order": g}  # --resume's state

    best, first = results.resume(training)  # best: (ID val accuracy, epoch, weights) of the best epoch so far
    for epoch in range(first, epochs + 1):
        set_train_mode(model)
        start, total, n = time.time(), 0.0, 0
        for x, y in common.progress(dataset.train.batches(batch_size, device, shuffle=True, drop_last=True,
                                                          generator=g), desc=f"epoch {epoch}/{epochs}"):
            # ----- method: the loss (edit here) -----
            with common.autocast(device, args.precision):
                loss = F.cross_entropy(net(x), y)
            # ----- end of method -----
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.detach() * len(y), n + len(y)  # on the device: no wait for the GPU every step
        total, n = common.all_reduce_sum(float(total), n)  # over every rank's share of the batches
        common.check_training_loss(total / n, epoch, lr)  # a diverged run stops here
        scheduler.step()

        # Model selection sees ID validation only; test and OOD splits are scored once, for the selected epoch.
        feats = common.split_features(encode, dataset, device, args.precision, only=["id_val"])
        metrics = common.evaluate(feats, model[1], dataset, ref, device)
        results.log(epoch, metrics, train_loss=total / n, epoch_seconds=time.time() - start)
        log(f"epoch {epoch:2d} loss {total / n:.3f} | {common.format_metrics(metrics)}")
        if best is None or metrics["acc/id_val"] > best[0]:
            best = (metrics["acc/id_val"], epoch, copy.deepcopy(model.state_dict()))
        results.save_for_resume(epoch, best, training)  # <out>/resume.pt: where --resume goes on from

    _, epoch, state = best
    model.load_state_dict(state)
    metrics = common.evaluate(common.split_features(encode, dataset, device, args.precision), model[1], dataset, ref,
                              device)
    record = results.log(epoch, metrics, stage="selected")
    log(f"best epoch {epoch} (by ID val) | {common.format_metrics(metrics)}")
    if args.save:
        results.save_model(model, step=epoch)
    results.done({"step": epoch, "metrics": metrics})
    return record


if __name__ == "__main__":
    main(common.parse_args(Args, description=__doc__, recipes=RECIPES))
