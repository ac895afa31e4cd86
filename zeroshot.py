"""Zero-shot CLIP: classify with a head built from the class names and prompt templates, no training at all.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
https://arxiv.org/abs/2103.00020 (Sec. 3.1.4, prompt ensembling). The starting point of FLYP and WiSE-FT.
Recipe: each template filled with each class name, embedded by the text tower, L2-normalised, averaged over templates,
normalised again; logits = logit scale * normalised image embedding . class embeddings.

    python zeroshot.py                 # the embedded world
    python zeroshot.py --dataset embedded --seed 1
    python zeroshot.py --dataset imagenet --data-root /data --weights ViT-B-16.pt

Sources of the defaults, deviations from the paper, logged metrics, results: docs/zeroshot.md
"""
from dataclasses import dataclass

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


def main(args):
    device, results, log = common.setup(args, "zeroshot", clip_for="zero-shot classification")
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    common.describe(dataset, results, log)
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    clip = common.to_device(backbone.clip, device)
    encoder = common.maybe_compile(clip.visual, args.compile, device)

    # ----- method: the head comes from the text tower (edit here) -----
    head = common.zeroshot_head(clip, backbone.tokenizer, dataset.classnames, dataset.templates, device, args.precision)
    # ----- end of method -----

    feats = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)  # = reference
    metrics = common.evaluate(feats, head, dataset, feats, device)
    record = results.log(0, metrics, templates=len(dataset.templates))
    log(f"zero-shot ({len(dataset.templates)} templates) | {common.format_metrics(metrics)}")
    results.done({"step": 0, "metrics": metrics})
    return record


if __name__ == "__main__":
    main(common.parse_args(Args, description=__doc__))
