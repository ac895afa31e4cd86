"""The picture behind the theory: a 2-D map of how fine-tuning moves the features of ID and OOD test images.

The projection (PCA) is fitted on the PRETRAINED features of ID and OOD test images; each fine-tuned model's features
of the same images are drawn in that same plane, with an arrow from where each image started. Fine-tuning with a
random head (FT) drags the ID features along with the head while the OOD features lag behind; LP-FT barely moves
either (Kumar et al., ICLR 2022, Sec. 3 and Fig. 1).

    python feature_map.py --dataset embedded --seed 0 --root runs      # needs ft.py / lpft.py --save checkpoints
"""
import argparse
from pathlib import Path

import torch

import common
import data

LABELS = {"ft": "FT", "lpft": "LP-FT", "l2sp": "L2-SP", "flyp": "FLYP"}


def fine_tuned_encoder(ckpt, backbone, weights):
    """The fine-tuned image encoder of a checkpoint (nn.Sequential(encoder, head), or a whole CLIP for FLYP)."""
    fresh = common.load_backbone(backbone, weights, log=lambda m: None)
    if ckpt["method"] == "flyp":
        fresh.clip.load_state_dict(ckpt["state_dict"])
    else:
        fresh.encoder.load_state_dict({k[2:]: v for k, v in ckpt["state_dict"].items() if k.startswith("0.")})
    return fresh.encoder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--dataset", default="embedded", help="dataset name (see data.DATASETS; default: embedded)")
    parser.add_argument("--data-root", default=None, help="root folder of real datasets")
    parser.add_argument("--seed", type=int, default=0, help="which seed's checkpoints to draw (default: 0)")
    parser.add_argument("--root", default="runs", help="folder holding the run folders (default: runs)")
    parser.add_argument("--methods", nargs="+", default=["ft", "lpft"],
                        help="methods whose --save checkpoints to draw (default: ft lpft; also l2sp, flyp, "
                        "ft-zeroshot-head, one of your own; not lp or zeroshot: they leave the features as they were)")
    parser.add_argument("--points", type=int, default=120,
                        help="arrows per panel for ID and for OOD images (default: 120)")
    parser.add_argument("--device", default="auto", help="where features are computed: auto (CUDA if available; the "
                        "default), cpu, cuda, cuda:N (every ID and OOD test image, three times: hours on a CPU for "
                        "ImageNet)")
    parser.add_argument("--out", default=None, help="PNG path; default <root>/<dataset>_seed<seed>_feature_map.png")
    args = parser.parse_args()
    unmoved = [m for m in args.methods if m in ("lp", "zeroshot")]
    if unmoved:  # not "no model.pt: rerun lp.py with --save"
        raise SystemExit(f"error: --methods {unmoved[0]}: its features are the pretrained ones (nothing to draw); "
                         "draw methods that fine-tune the backbone, such as ft lpft l2sp flyp")
    if args.points < 1:
        raise SystemExit(f"error: --points {args.points}: must be at least 1")
    if args.out and not Path(args.out).absolute().parent.is_dir():  # before the features, not after
        raise SystemExit(f"error: --out {args.out}: {Path(args.out).absolute().parent} is not a folder")
    common.check_environment()
    device = common.get_device(args.device)
    default = data.default_backbone(args.dataset)  # (a typo in --dataset stops here)

    # The arrows start at the pretrained model the checkpoints were fine-tuned from, seen through its preprocessing.
    saved = sorted(p.parents[2].name for p in Path(args.root).glob(f"*/{args.dataset}/seed{args.seed}/model.pt"))

    def checkpoint(method):
        return common.read_checkpoint(Path(args.root) / method / args.dataset / f"seed{args.seed}" / "model.pt",
                                      f"rerun {method}.py with --save (run_all.sh does); the methods with one there: "
                                      f"{', '.join(saved) or 'none'}")

    starts = {}
    for m in args.methods:  # read again when drawn: one checkpoint in memory at a time (a whole CLIP for FLYP)
        ckpt_args = checkpoint(m)["args"]
        starts[m] = (ckpt_args["backbone"] or default, ckpt_args["weights"])
    if len(set(starts.values())) > 1:
        named = "; ".join(f"{m}: {b} with {w or 'its default weights'}" for m, (b, w) in starts.items())
        raise SystemExit(f"error: the checkpoints were fine-tuned from different pretrained models ({named}); one "
                         "picture has one starting point: draw them with separate --methods")
    backbone, weights = starts[args.methods[0]]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=backbone)
    pretrained = common.load_backbone(backbone, weights, log=lambda m: None)
    ood = [f"ood_{k}" for k in dataset.ood]

    def features(encoder, cached_as=None):
        """ID test and OOD features; the pretrained ones of a real dataset come from the cache the runs filled."""
        f = common.split_features(encoder.to(device), dataset, device, only=["id_test", *ood], pretrained=cached_as)
        return {"ID": f["id_test"], "OOD": torch.cat([f[k] for k in ood])}

    before = features(pretrained.encoder, cached_as=pretrained)
    g = torch.Generator().manual_seed(0)
    picked = {k: torch.randperm(len(v), generator=g)[:args.points] for k, v in before.items()}
    fit = torch.cat(list(before.values()))
    mean = fit.mean(0)
    _, _, v = torch.linalg.svd(fit - mean, full_matrices=False)  # PCA of the pretrained features
    project = lambda f: (f - mean) @ v[:2].T

    fig, axes = plt.subplots(1, len(args.methods), figsize=(5.5 * len(args.methods), 5), squeeze=False)
    for ax, method in zip(axes[0], args.methods):
        after = features(fine_tuned_encoder(checkpoint(method), backbone, weights))
        for (name, colour) in (("ID", "tab:blue"), ("OOD", "tab:orange")):
            p0, p1 = project(before[name][picked[name]]), project(after[name][picked[name]])
            ax.quiver(p0[:, 0], p0[:, 1], p1[:, 0] - p0[:, 0], p1[:, 1] - p0[:, 1], angles="xy", scale_units="xy",
                      scale=1, color=colour, alpha=0.35, width=0.003)
            pooled = ", its splits pooled" if name == "OOD" and len(ood) > 1 else ""  # the runs' ood_avg: their mean
            ax.scatter(p1[:, 0], p1[:, 1], s=8, color=colour, label=f"{name} (distortion "
                       f"{common.distortion(after[name], before[name]):.3g}{pooled})")
        ax.set_title(f"{LABELS.get(method, method)}: pretrained → fine-tuned features")
        ax.set_xlabel("PC 1 of the pretrained features")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.dataset}, seed {args.seed}: arrows start at each test image's pretrained feature", fontsize=10)
    fig.tight_layout()
    out = args.out or str(Path(args.root) / f"{args.dataset}_seed{args.seed}_feature_map.png")
    common.write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
