"""L2-SP: fine-tuning with an L2 penalty towards the pretrained weights instead of towards zero.

Paper: Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018,
https://arxiv.org/abs/1802.01483 (Eq. 4). The classic "stay close to the pretrained model" baseline of the LP-FT paper.
Loss = cross-entropy + alpha/2 ||w - w0||^2 over the pretrained weights + beta/2 ||w_head||^2 over the new head, with
the authors' defaults (alpha 0.1, beta 0.01, weight tensors only: BatchNorm scale/shift and biases are free).
`--all-params` switches to the LP-FT code's variant: alpha ||w - w0||^2 over every backbone parameter, no 1/2, no
head term (it used alpha 0.01). Everything else is ft.py: SGD momentum 0.9, cosine over epochs, batch 64, a fresh
random head, the epoch with the best ID validation accuracy reported.

    python l2sp.py                     # the embedded world
    python l2sp.py --dataset embedded --seed 1 --alpha 0.01
    python l2sp.py --dataset living17 --data-root /data --weights moco_v2_800ep_pretrain.pth.tar

Sources of the defaults, deviations from the paper, logged metrics, results: docs/l2sp.md
"""
import copy
import time
from dataclasses import dataclass

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
    alpha: float = 0.1
    """weight of alpha/2 ||w - w0||^2 on the pretrained weights (L2-SP authors' code: 0.1)"""
    beta: float = 0.01
    """weight of beta/2 ||w_head||^2 on the new head's weight (L2-SP authors' code: 0.01)"""
    all_params: bool = False
    """the LP-FT code's variant: alpha ||w - w0||^2 over every backbone parameter (BatchNorm and biases too), no 1/2,
    no head term (that code used --alpha 0.01; alpha keeps its default unless given)"""


# Per-dataset defaults: ft.py's recipes (L2-SP only adds the penalty; the LP-FT code ran it with its FT recipe).
RECIPES = {
    "embedded": {"epochs": 5, "lr": 3e-2, "batch_size": 64},
    "embedded-tiny": {"epochs": 2, "lr": 3e-2, "batch_size": 64},
    "living17": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "entity30": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "cifar10": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "domainnet": {"epochs": 50, "lr": 1e-3, "batch_size": 64},
    "fmow": {"epochs": 50, "lr": 1e-2, "batch_size": 64},
    "imagenet": {"epochs": 10, "lr": 1e-4, "batch_size": 128},
    "iwildcam": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "pcam": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "sst2": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
    "folder": {"epochs": 20, "lr": 1e-3, "batch_size": 64},
}


# ----- method: a fresh head, and the penalty towards the pretrained weights (edit here) -----
def build_model(encoder, num_classes):
    """The pretrained encoder followed by a fresh nn.Linear head with PyTorch's default (random) initialisation."""
    return nn.Sequential(encoder, nn.Linear(encoder.output_dim, num_classes))


def l2sp_penalty(model, w0, alpha, beta, all_params=False):
    """alpha/2 ||w - w0||^2 over the encoder's weight tensors (ndim >= 2: conv and linear weights, not BatchNorm or
    biases) + beta/2 ||W_head||^2; `w0` maps encoder parameter names to their pretrained values.
    With all_params: alpha ||w - w0||^2 over every encoder parameter and no head term (LP-FT code)."""
    encoder, head = model[0], model[1]
    if all_params:
        return alpha * sum(((p - w0[n]) ** 2).sum() for n, p in encoder.named_parameters())
    shared = sum(((p - w0[n]) ** 2).sum() for n, p in encoder.named_parameters() if p.ndim >= 2)
    return alpha / 2 * shared + beta / 2 * (head.weight ** 2).sum()


def set_train_mode(model):
    model.train()  # BatchNorm (where the backbone has it) updates its statistics, as in the LP-FT code's FT
# ----- end of method -----


def main(args):
    if args.all_params and args.beta != Args.beta:  # it would be recorded as if it had acted
        raise SystemExit(f"error: --beta {args.beta} does nothing with --all-params (the LP-FT code's penalty has no "
                         "head term); leave --beta out")
    device, results, log = common.setup(args, "l2sp")
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    recipe = common.recipe(args, RECIPES[dataset.name])  # flags override the dataset's recipe
    common.describe(dataset, results, log, recipe)
    epochs, lr, batch_size = recipe["epochs"], recipe["lr"], recipe["batch_size"]
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    encoder = common.to_device(backbone.encoder, device)
    ref = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)  # distortion origin

    model = build_model(encoder, len(dataset.classnames)).to(device)
    # ----- method: the weights the penalty pulls towards (edit here) -----
    w0 = {n: p.detach().clone() for n, p in model[0].named_parameters()}  # the pretrained weights, kept apart
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
            loss = loss + l2sp_penalty(model, w0, args.alpha, args.beta, args.all_params)  # on the fp32 weights
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
