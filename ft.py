"""Full fine-tuning (FT): a fresh random linear head on the pretrained backbone, every parameter trained.

Paper: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022, https://arxiv.org/abs/2202.10054 (the FT baseline of its code).
Recipe: cross-entropy, SGD with momentum 0.9, no weight decay, cosine schedule over epochs, batch 64; the epoch with
the best ID validation accuracy is reported (the authors' code selected on the ID test set, and so were the real
datasets' learning rates in RECIPES; our runs select on ID validation only).

    python ft.py                       # the embedded world
    python ft.py --dataset embedded --seed 1 --lr 3e-3
    python ft.py --head-init zeroshot --save   # a WiSE-FT endpoint (this file's SGD recipe); own row and folder
    python ft.py --dataset living17 --data-root /data --weights moco_v2_800ep_pretrain.pth.tar

Sources of the defaults, deviations from the paper, logged metrics, results: docs/ft.md
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
    head_init: str = "random"
    """'random' (nn.Linear's default init, LP-FT paper) or 'zeroshot' (CLIP's zero-shot head on normalised features,
    WiSE-FT paper's head, with this file's SGD recipe; needs a CLIP backbone; makes the run a WiSE-FT endpoint)"""


# Per-dataset defaults. Real datasets: the LP-FT code's recipe (epochs; batch 64, 128 on ImageNet; the learning rate its
# grid search chose); datasets it never ran (iWildCam, PCam, SST2, your own folder) take Living-17's, unswept
# (docs/recipes.md). Embedded world: lr chosen on ID validation accuracy, 5 epochs for run time (docs/embedded.md).
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


# ----- method: which parameters train and how the head starts (edit here) -----
HEAD_INITS = ("random", "zeroshot")


def build_model(backbone, dataset, head_init, device, precision):
    """The pretrained encoder followed by a linear head: a fresh nn.Linear with PyTorch's default (random)
    initialisation, or CLIP's zero-shot head built from the class names and templates."""
    if head_init == "random":
        head = nn.Linear(backbone.encoder.output_dim, len(dataset.classnames))
    else:  # 'zeroshot' (main checked the choice)
        clip = common.require_clip(backbone, "--head-init zeroshot").clip.to(device)
        head = common.zeroshot_head(clip, backbone.tokenizer, dataset.classnames, dataset.templates, device, precision)
    return nn.Sequential(backbone.encoder, head)


def set_train_mode(model):
    model.train()  # BatchNorm (where the backbone has it) updates its statistics, as in the LP-FT code's FT
# ----- end of method -----


def main(args):
    # ----- method: which head; the zero-shot one makes it another method (edit here) -----
    if args.head_init not in HEAD_INITS:  # first: a typo would otherwise run as ft-zeroshot-head
        raise SystemExit(f"error: --head-init {args.head_init!r}: choose {', '.join(HEAD_INITS)}")
    needs_clip = "--head-init zeroshot" if args.head_init == "zeroshot" else None  # its head comes from a text tower
    method = "ft" if args.head_init == "random" else "ft-zeroshot-head"  # its own table row and default run folder
    # ----- end of method -----
    device, results, log = common.setup(args, method, clip_for=needs_clip)
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    recipe = common.recipe(args, RECIPES[dataset.name])  # flags override the dataset's recipe
    common.describe(dataset, results, log, recipe)
    epochs, lr, batch_size = recipe["epochs"], recipe["lr"], recipe["batch_size"]
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    encoder = common.to_device(backbone.encoder, device)
    ref = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)  # distortion origin

    model = build_model(backbone, dataset, args.head_init, device, args.precision).to(device)
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
