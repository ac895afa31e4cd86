"""FLYP: fine-tune like you pretrain. Fine-tune both CLIP towers with CLIP's contrastive loss between each image and
a caption made from its class name; classify with the zero-shot head of the current text tower.

Paper: Goyal, Kumar, Garg, Kolter, Raghunathan, "Finetune like you pretrain: Improved finetuning of zero-shot vision
models", CVPR 2023, https://arxiv.org/abs/2212.00638 (Sec. 3; the recipe of its code).
Recipe: each training image is paired with ONE caption, a prompt template drawn uniformly at random and filled with its
class name; the plain symmetric CLIP loss over the batch (same-class pairs count as negatives, as in the authors' runs);
every parameter of both towers and the learned temperature train (no clamp), AdamW, cosine schedule per step with
linear warmup. After each epoch the zero-shot head is rebuilt from the current text tower (templates averaged) and
the epoch with the best ID validation accuracy is reported. The few-shot protocol is flyp_fewshot.py.

    python flyp.py                     # the embedded world
    python flyp.py --dataset embedded --seed 1 --save
    python flyp.py --dataset imagenet --data-root /data --weights ViT-B-16.pt --save

Sources of the defaults, deviations from the paper, logged metrics, results: docs/flyp.md
"""
import copy
import math
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
    """training epochs; default: the dataset's recipe (RECIPES below; FLYP paper: 10 on ImageNet, 20 on WILDS)"""
    batch_size: int = None
    """contrastive batch size; default: the dataset's recipe (FLYP paper: 512 on ImageNet, 256 on WILDS)"""
    lr: float = None
    """peak learning rate; default: the dataset's recipe (FLYP paper: 1e-5)"""
    weight_decay: float = None
    """AdamW weight decay; default: the dataset's recipe (FLYP paper: 0.1 on ImageNet, 0.2 on WILDS)"""
    warmup: int = None
    """linear warmup steps before the cosine decay; default: the dataset's recipe (FLYP paper: 500)"""


# Per-dataset defaults. ImageNet and the WILDS datasets: the FLYP paper's (AdamW, warmup 500, cosine per step); PCam
# and SST2 take their few-shot lr and weight decay, the other real datasets ImageNet's, unswept (docs/recipes.md).
# Embedded world: lr chosen on ID validation accuracy, capped at the pretraining rate; 5 epochs for run time
# (docs/embedded.md).
RECIPES = {
    "embedded": {"epochs": 5, "lr": 3e-3, "batch_size": 128, "weight_decay": 0.1, "warmup": 10},
    "embedded-tiny": {"epochs": 2, "lr": 1e-3, "batch_size": 32, "weight_decay": 0.1, "warmup": 2},
    "living17": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
    "entity30": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
    "cifar10": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
    "domainnet": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
    "fmow": {"epochs": 20, "lr": 1e-5, "batch_size": 256, "weight_decay": 0.2, "warmup": 500},
    "imagenet": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
    "iwildcam": {"epochs": 20, "lr": 1e-5, "batch_size": 256, "weight_decay": 0.2, "warmup": 500},
    "pcam": {"epochs": 10, "lr": 1e-6, "batch_size": 512, "weight_decay": 0.0, "warmup": 500},
    "sst2": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.2, "warmup": 500},
    "folder": {"epochs": 10, "lr": 1e-5, "batch_size": 512, "weight_decay": 0.1, "warmup": 500},
}


# ----- method: captions, the contrastive loss and its schedule (edit here) -----
def caption_tokens(tokenizer, classnames, templates):
    """Token ids of every (class, template) caption: [classes, templates, context length]."""
    texts = tuple(t.format(c) for c in classnames for t in templates)  # the zero-shot head's, tokenized once
    return common.tokenize(tokenizer, texts).view(len(classnames), len(templates), -1)


def clip_loss(image_features, text_features, logit_scale):
    """The symmetric CLIP loss on L2-normalised features: image i's positive is caption i, every other caption in the
    batch is a negative (also same-class ones: the FLYP code never masked them)."""
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class Towers(nn.Module):
    """Both towers in one forward: what trains, and what DDP wraps under torchrun so it averages every gradient.
    `clip` holds the parameters; encode_image and encode_text are its towers, compiled or not."""

    def __init__(self, clip, encode_image, encode_text):
        super().__init__()
        self.clip, self.encode_image, self.encode_text = clip, encode_image, encode_text

    def forward(self, images, texts):
        return F.normalize(self.encode_image(images), dim=-1), self.encode_text(texts, normalize=True)


def check_contrastive_batch(batch_size):
    """Each image's negatives are the other captions of its batch: a batch of one has none, its loss is always 0."""
    if batch_size is not None and batch_size < 2:  # None: the recipe's (every one is far above)
        raise SystemExit(f"error: --batch-size {batch_size}: FLYP's contrastive loss needs at least 2 image-caption "
                         "pairs per batch (with 1, the loss is 0 and nothing trains); pass --batch-size 2 or more")


def cosine_lr(warmup, total_steps):
    """Learning-rate factor per step: linear warmup, then cosine decay to 0 (the FLYP / WiSE-FT code)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return factor


def set_train_mode(model):
    model.train()  # as the FLYP code (BatchNorm, where the image tower has it, updates its statistics)
# ----- end of method -----


def main(args):
    device, results, log = common.setup(args, "flyp", clip_for="FLYP")
    check_contrastive_batch(args.batch_size)  # before the dataset is read (ImageNet lists 1.3 M files)
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    recipe = common.recipe(args, RECIPES[dataset.name])  # flags override the dataset's recipe
    common.describe(dataset, results, log, recipe)
    epochs, lr, batch_size = recipe["epochs"], recipe["lr"], recipe["batch_size"]
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    model = common.to_device(backbone.clip, device)  # the whole CLIP trains
    ref = common.split_features(model.visual, dataset, device, args.precision, pretrained=backbone)  # distortion origin

    # ----- method: captions, both towers, AdamW, a cosine per step, the zero-shot head (edit here) -----
    captions = caption_tokens(backbone.tokenizer, dataset.classnames, dataset.templates).to(device)
    encode = common.maybe_compile(model.visual, args.compile, device)  # the saved model stays unwrapped
    encode_text = common.maybe_compile(model.encode_text, args.compile, device)  # captions: one shape, one graph
    net = common.distribute(Towers(model, encode, encode_text), device)  # what trains: DDP-wrapped under torchrun
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe["weight_decay"],
                                  fused=True)  # one kernel over all parameters: ~9x faster steps, on CPU too
    steps = epochs * (len(dataset.train) // batch_size)  # the last partial batch is dropped
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lr(recipe["warmup"], steps))
    if recipe["warmup"] >= steps:  # ImageNet's 500 steps on a small dataset, say
        log(f"note: the warmup ({recipe['warmup']} steps) covers the whole run ({steps} steps): the learning rate "
            f"peaks at {steps / recipe['warmup']:.1%} of {lr:g} and never decays; pass a shorter --warmup, such as "
            f"{max(1, steps // 20)} (about 5% of the steps)")

    def head():  # the zero-shot head of the current text tower
        return common.zeroshot_head(model, backbone.tokenizer, dataset.classnames, dataset.templates, device,
                                    args.precision)
    # ----- end of method -----
    g = torch.Generator().manual_seed(args.seed)
    training = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data_order": g}  # --resume's state

    best, first = results.resume(training)  # best: (ID val accuracy, epoch, weights) of the best epoch so far
    for epoch in range(first, epochs + 1):
        set_train_mode(model)
        start, total, n = time.time(), 0.0, 0
        for x, y in common.progress(dataset.train.batches(batch_size, device, shuffle=True, drop_last=True,
                                                          generator=g), desc=f"epoch {epoch}/{epochs}"):
            # ----- method: the CLIP loss between each image and a caption of its class (edit here) -----
            # one random caption per image, drawn for the global batch (this rank's share under torchrun)
            template = common.shard(torch.randint(captions.shape[1], (batch_size,), generator=g))
            template = template.to(device, non_blocking=True)  # a blocking copy would wait for the GPU's last step
            with common.autocast(device, args.precision):
                image_features, text_features = net(x, captions[y, template])
                # the contrastive batch is the global batch: every rank's features are gathered (open_clip does
                # too); its size is known to every rank: no exchange of sizes, no wait
                loss = clip_loss(common.all_gather(image_features, batch_size),
                                 common.all_gather(text_features, batch_size), model.logit_scale)
            # ----- end of method -----
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()  # per step
            total, n = total + loss.detach() * len(y), n + len(y)  # on the device: no wait for the GPU every step
        total, n = common.all_reduce_sum(float(total), n)  # over every rank's share of the batches
        common.check_training_loss(total / n, epoch, lr)  # a diverged run stops here

        # Model selection sees ID validation only; test and OOD splits are scored once, for the selected epoch.
        feats = common.split_features(encode, dataset, device, args.precision, only=["id_val"])
        metrics = common.evaluate(feats, head(), dataset, ref, device)
        results.log(epoch, metrics, train_loss=total / n, epoch_seconds=time.time() - start,
                    logit_scale=model.logit_scale.exp().item())
        log(f"epoch {epoch:2d} loss {total / n:.3f} | {common.format_metrics(metrics)}")
        if best is None or metrics["acc/id_val"] > best[0]:
            best = (metrics["acc/id_val"], epoch, copy.deepcopy(model.state_dict()))
        results.save_for_resume(epoch, best, training)  # <out>/resume.pt: where --resume goes on from

    _, epoch, state = best
    model.load_state_dict(state)
    metrics = common.evaluate(common.split_features(encode, dataset, device, args.precision), head(), dataset, ref,
                              device)
    record = results.log(epoch, metrics, stage="selected")
    log(f"best epoch {epoch} (by ID val) | {common.format_metrics(metrics)}")
    if args.save:
        results.save_model(model, step=epoch)
    results.done({"step": epoch, "metrics": metrics})
    return record


if __name__ == "__main__":
    main(common.parse_args(Args, description=__doc__, recipes=RECIPES))
