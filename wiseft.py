"""WiSE-FT: weight-space ensembles of the zero-shot and a fine-tuned model, evaluated along the line between them.

Paper: Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi, Namkoong, Schmidt,
"Robust fine-tuning of zero-shot models", CVPR 2022, https://arxiv.org/abs/2109.01903 (Eq. 1).
theta_alpha = (1 - alpha) theta_zero-shot + alpha theta_fine-tuned, every tensor, for alpha = 0, 0.1, ..., 1; the table
reports alpha = 0.5, the paper's recommended value (fixed in advance, so no test split chooses it).
Endpoints: a FLYP checkpoint interpolates both towers and the temperature and rebuilds the zero-shot head from the
interpolated text tower; an FT checkpoint started from the zero-shot head (ft.py --head-init zeroshot) interpolates
encoder and head; any other checkpoint (a random or LP head) interpolates the encoder only and keeps its head.

    python flyp.py --save && python wiseft.py          # the embedded world, FLYP endpoint
    python ft.py --head-init zeroshot --save && \\
        python wiseft.py --checkpoint runs/ft-zeroshot-head/embedded/seed0/model.pt
    python wiseft.py --checkpoint runs/lpft/living17/seed0/model.pt   # dataset, seed, backbone: the checkpoint's

Sources of the defaults, deviations from the paper, logged metrics, results: docs/wiseft.md
"""
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

import common
import data


@dataclass
class Args:
    dataset: str = None
    """dataset name (see data.DATASETS); default and only choice: the checkpoint's (embedded to find the default
    checkpoint)"""
    data_root: str = None
    """folder holding the real datasets (else the checkpoint's, else $RFT_DATA; layouts: docs/datasets.md); unused by
    the embedded world"""
    backbone: str = None
    """pretrained backbone (see common.BACKBONES); default and only choice: the checkpoint's"""
    weights: str = None
    """local weights file (or open_clip pretrained tag) for real backbones; default: the checkpoint's (pass it when
    that file has moved)"""
    seed: int = None
    """seed of the ID training draw and of every random choice; default and only choice: the checkpoint's (0 to find
    the default checkpoint)"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'"""
    precision: str = "auto"
    """'auto' (bf16 autocast on a GPU with bf16 tensor cores, A100 or newer; else fp32), 'bf16' or 'fp32'"""
    compile: str = "auto"
    """torch.compile the backbone: 'auto' (on a GPU that Triton supports, V100 or newer), 'on' or 'off'"""
    out: str = None
    """output folder; default runs/<method>/<dataset>/seed<seed>"""

    checkpoint: str = None
    """fine-tuned endpoint, a model.pt written by flyp.py / ft.py / lpft.py / l2sp.py --save; default:
    runs/flyp/<dataset>/seed<seed>/model.pt (seed 0 without --seed)"""
    alpha_step: float = 0.1
    """spacing of the alpha grid from 0 to 1 (WiSE-FT paper: 0.1)"""
    report_alpha: float = 0.5
    """the alpha whose evaluation the table reports (WiSE-FT paper's recommendation: 0.5)"""


# ----- method: the two endpoints and the line between them (edit here) -----
def interpolate(theta0, theta1, alpha):
    """(1 - alpha) theta0 + alpha theta1 for every floating-point tensor (integer buffers such as BatchNorm's batch
    counter come from theta1). Exact at the ends: alpha = 0 gives theta0, alpha = 1 gives theta1, bit for bit."""
    return {k: (1 - alpha) * theta0[k] + alpha * theta1[k] if theta1[k].is_floating_point() else theta1[k]
            for k in theta1}


def alpha_grid(step, report):
    """0, step, ..., 1: the step must divide 1 so that both endpoints are evaluated, and the reported alpha must be on
    the grid (no nearest-point rounding that would report another alpha than asked)."""
    n = round(1 / step) if 0 < step <= 1 else 0
    if n == 0 or abs(n * step - 1) > 1e-6:
        raise SystemExit(f"error: --alpha-step {step} does not divide 1; use 1/n, such as 0.1, 0.125, 0.25 or 0.5")
    alphas = [round(i / n, 6) for i in range(n + 1)]
    if round(report, 6) not in alphas:
        raise SystemExit(f"error: --report-alpha {report} is not on the grid 0, {alphas[1]}, ..., 1 of "
                         f"--alpha-step {step}")
    return alphas


def endpoints(ckpt, backbone, dataset, device, precision):
    """The model to evaluate, theta_zero-shot, theta_fine-tuned, and the function that builds its current head."""
    theta1 = {k: v.to(device) for k, v in ckpt["state_dict"].items()}  # read onto the CPU; theta0 is on `device`
    if ckpt["method"] == "flyp":  # both towers; the head comes from the (interpolated) text tower
        model = common.to_device(common.require_clip(backbone, "WiSE-FT of a FLYP checkpoint").clip, device)
        theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model, model.visual, theta0, theta1, lambda: common.zeroshot_head(
            model, backbone.tokenizer, dataset.classnames, dataset.templates, device, precision)
    encoder = common.to_device(backbone.encoder, device)
    if ckpt["args"].get("head_init") == "zeroshot":  # FT from the zero-shot head: interpolate the head too
        clip = common.require_clip(backbone, "WiSE-FT of a zero-shot-initialised FT checkpoint").clip.to(device)
        head = common.zeroshot_head(clip, backbone.tokenizer, dataset.classnames, dataset.templates, device, precision)
    else:  # a new random or LP head has no zero-shot counterpart: interpolate the encoder only
        head = nn.Linear(theta1["1.weight"].shape[1], theta1["1.weight"].shape[0]).to(device)
        head.load_state_dict({"weight": theta1["1.weight"], "bias": theta1["1.bias"]})
    model = nn.Sequential(encoder, head)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, encoder, theta0, theta1, lambda: model[1]
# ----- end of method -----


def endpoint_args(args, ckpt, path):
    """The checkpoint's dataset and seed (its ID training draw and validation split: results are filed under them),
    its backbone (another one has other weights: nothing to interpolate with) and its weights file and data root,
    unless --weights or --data-root point to where they are now."""
    if args.dataset not in (None, ckpt["args"]["dataset"]):
        raise SystemExit(f"error: {path!r} was fine-tuned on {ckpt['args']['dataset']}, not on {args.dataset}; drop "
                         "--dataset (WiSE-FT evaluates a checkpoint on the dataset it was fine-tuned on)")
    args.dataset = ckpt["args"]["dataset"]
    trained = data.default_backbone(args.dataset) if ckpt["args"]["backbone"] is None else ckpt["args"]["backbone"]
    if args.backbone not in (None, trained):
        raise SystemExit(f"error: {path!r} was fine-tuned from {trained}, not {args.backbone}; drop --backbone "
                         "(WiSE-FT interpolates a checkpoint with the backbone it started from)")
    if args.seed not in (None, ckpt["args"]["seed"]):
        raise SystemExit(f"error: {path!r} was fine-tuned with --seed {ckpt['args']['seed']}, not {args.seed}; drop "
                         "--seed (its evaluation uses the checkpoint's, and is filed under it)")
    if args.weights and trained not in common.WEIGHTS:  # check_backbone's advice, another --backbone, is no way here
        raise SystemExit(f"error: --weights {args.weights}: {path!r} was fine-tuned from {trained}, which has no "
                         "weights file (this project pretrains it); drop --weights")
    args.seed, args.backbone = ckpt["args"]["seed"], trained
    args.weights, args.data_root = args.weights or ckpt["args"]["weights"], args.data_root or ckpt["args"]["data_root"]


def check_start(ckpt, now, backbone, path, log):
    """The pretrained weights loaded here must be those the checkpoint was fine-tuned from (model.pt records their
    hub tag, or file size and time, and an embedded model's hash): interpolating with other ones (a LAION tag for
    OpenAI's file, an embedded model pretrained again) gives numbers for neither. The same size elsewhere or written
    again is a note: a copy. `now`: the record of the weights this run loads (its results header's)."""
    then = ckpt.get("weights")
    if not then:  # a model.pt from before 2026-12-03
        return
    if "sha1" in then and "sha1" in now:  # an embedded model (hashed since 2026-12-05)
        if not common.same_weights(then, now):
            raise SystemExit(f"error: {path!r} was fine-tuned from another {backbone} than the one cached at "
                             f"{now['file']}: it was pretrained again since; point RFT_CACHE at the cache the run "
                             "used, put back the model pretrain.py --force kept beside it, or fine-tune again")
        return
    if "tag" in then or "tag" in now:
        if then.get("tag") != now.get("tag"):
            was, fix = ((f"the tag {then['tag']!r}", f"--weights {then['tag']}") if "tag" in then else
                        (then["file"], f"{then['file']} with --weights"))
            loads = f"the tag {now['tag']!r}" if "tag" in now else now["file"]
            raise SystemExit(f"error: {path!r} was fine-tuned from {was}, but this run loads {loads}; WiSE-FT "
                             f"interpolates a checkpoint with the weights it started from: pass {fix}")
        return
    if "bytes" not in then or "bytes" not in now:
        return
    if then["bytes"] != now["bytes"]:
        raise SystemExit(f"error: {path!r} was fine-tuned from {then['file']} ({then['bytes']:,} bytes), but this run "
                         f"loads {now['file']} ({now['bytes']:,} bytes); WiSE-FT interpolates a checkpoint with the "
                         "weights it started from: pass that file with --weights")
    if then != now:
        same = then["file"] == now["file"]
        log(f"note: {path!r} was fine-tuned from {then['file']}, " + ("written again since (the same size)" if same
            else f"and this run loads {now['file']}, of the same size: a copy"))


def check_classes(ckpt, dataset, path):
    """The checkpoint's classes must be the dataset's, in order: a folder dataset is whatever --data-root holds, and
    another dataset's names are data.py's (which named BREEDS' classes otherwise before 2026-12-03)."""
    trained = ckpt.get("classnames")  # absent from checkpoints written before 2026-12-03
    if trained is not None and list(trained) != list(dataset.classnames):
        folder = dataset.name == "folder"
        here, fix = (("this --data-root", "pass the data root it was fine-tuned on") if folder else
                     (f"data.py's {dataset.name}",
                      "data.py names them otherwise since it was saved; fine-tune it again"))
        raise SystemExit(f"error: {path!r} was fine-tuned on the classes {', '.join(trained)}, but {here} holds "
                         f"{', '.join(dataset.classnames)}; {fix}")


def main(args):
    alphas = alpha_grid(args.alpha_step, args.report_alpha)
    name = args.dataset or "embedded"
    path = args.checkpoint or str(Path("runs", "flyp", name, f"seed{args.seed or 0}", "model.pt"))
    clip = args.backbone or ("" if data.default_backbone(name) in common.CLIP_BACKBONES else "clip-vit-b16")  # FLYP's
    where = (f" --backbone {clip}" if clip else "") + (f" --data-root {args.data_root}" if args.data_root else "") + (
        f" --seed {args.seed}" if args.seed else "")  # where it looks: runs/flyp/<dataset>/seed<seed>
    ckpt = common.read_checkpoint(path, f"make one with `python flyp.py --dataset {name}{where} --save` (or `python "
                                        f"ft.py --dataset {name}{where} --head-init zeroshot --save` and pass its "
                                        "model.pt with --checkpoint)")
    # The zero-shot endpoint is the pretrained backbone the checkpoint was fine-tuned from, on the same data.
    endpoint_args(args, ckpt, path)
    device, results, log = common.setup(args, f"wiseft-{ckpt['method']}")
    check_start(ckpt, results.header["weights"], args.backbone, path, log)
    dataset = data.load_dataset(args.dataset, seed=args.seed, data_root=args.data_root, backbone=args.backbone)
    check_classes(ckpt, dataset, path)
    common.describe(dataset, results, log)
    backbone = common.load_backbone(dataset.backbone, args.weights, log=log)
    model, encoder, theta0, theta1, classifier = endpoints(ckpt, backbone, dataset, device, args.precision)
    encode = common.maybe_compile(encoder, args.compile, device)
    ref = common.split_features(encoder, dataset, device, args.precision, pretrained=backbone)  # distortion origin

    records = []
    for i, alpha in enumerate(common.progress(alphas, desc="alpha")):
        model.load_state_dict(interpolate(theta0, theta1, alpha))
        # At alpha = 0 the weights are theta0 bit for bit: its features are the reference ones, already computed.
        feats = ref if alpha == 0 else common.split_features(encode, dataset, device, args.precision)
        metrics = common.evaluate(feats, classifier(), dataset, ref, device)
        records.append(results.log(i, metrics, alpha=alpha, endpoint=path, endpoint_step=ckpt.get("step")))
        log(f"alpha {alpha:.2f} | {common.format_metrics(metrics)}")

    reported = next(r for r in records if r["alpha"] == round(args.report_alpha, 6))
    endpoint = {"recipe": ckpt.get("recipe"), "options": common.run_options(ckpt["args"], ckpt.get("recipe"))}
    results.done({"step": reported["step"], "alpha": reported["alpha"], "metrics": reported["metrics"],
                  "endpoint": endpoint})  # summarize.py averages the seeds of endpoints with one recipe and options
    return records


if __name__ == "__main__":
    main(common.parse_args(Args, description=__doc__))
