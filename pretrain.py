"""Pretrain the embedded CLIP on the embedded world's image-caption corpus (CLIP contrastive loss).

Runs once on first use of the embedded backbone (common.load_backbone calls it) and caches the weights on disk,
keyed by the config; run it by hand to warm the cache:

    python pretrain.py                  # the default model, ~5 minutes on 2 CPU cores
    python pretrain.py --backbone embedded-clip-tiny

Like CLIP, MoCo and the models of the LP-FT paper, the model sees unlabelled images from ALL domains (photo, sketch,
painting, neon); the downstream labels come only from the photo domain.
"""
import argparse
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F

import common
import data


def caption_tokens(tokenizer, shape, domain, colour, g, cache):
    """Tokenise a fresh random caption per image (captions are re-drawn every step; token ids are memoised)."""
    texts = [data.caption(int(s), int(d), int(c), g) for s, d, c in zip(shape, domain, colour)]
    missing = sorted(set(texts) - cache.keys())
    if missing:
        cache.update(zip(missing, tokenizer(missing)))
    return torch.stack([cache[t] for t in texts])


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE of CLIP: matching image-caption pairs are the diagonal."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pretrain(cfg, path, device="cpu", log=print):
    common.seed_everything(cfg.seed)
    corpus = data.generate(cfg.n_corpus, cfg.seed)  # all four domains, balanced shapes
    model = common.EmbeddedCLIP(cfg).to(device)
    model.visual.to(memory_format=torch.channels_last)  # ~20% faster convolutions, on CPU too
    decay = [p for n, p in model.named_parameters() if n != "logit_scale"]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": [model.logit_scale], "weight_decay": 0.0}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    warmup = max(1, int(0.05 * cfg.steps))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    g = torch.Generator().manual_seed(cfg.seed)
    tokens_cache = {}
    model.train()
    start = time.time()
    for step in common.progress(range(cfg.steps), desc=f"pretraining {cfg.name}"):
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (cfg.steps - warmup)))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        idx = torch.randint(cfg.n_corpus, (cfg.batch_size,), generator=g)
        images = data.normalize(corpus["images"][idx]).to(device, memory_format=torch.channels_last)
        tokens = caption_tokens(model.tokenizer, corpus["shape"][idx], corpus["domain"][idx], corpus["colour"][idx], g, tokens_cache)
        loss = clip_loss(model.encode_image(images), model.encode_text(tokens.to(device)), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as in open_clip's training
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  logit_scale {model.logit_scale.exp().item():.1f}")
    common.save_atomic({"config": cfg.__dict__, "state_dict": model.state_dict(), "pretrain_seconds": time.time() - start,
                        "made_with": {**common.host(), "torch": str(torch.__version__), **common.recipe_hashes()}},
                       path)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--backbone", default="embedded-clip", choices=sorted(common.EMBEDDED_BACKBONES),
                        help="which embedded CLIP to pretrain (default: embedded-clip)")
    parser.add_argument("--force", action="store_true", help="retrain even if the cache holds this config")
    args = parser.parse_args()
    cfg = common.EMBEDDED_BACKBONES[args.backbone]
    common.check_environment()
    path = common.embedded_cache_path(cfg)
    loads = False
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            common.EmbeddedCLIP(cfg).load_state_dict(saved["state_dict"])
            loads = True  # as common.load_embedded_clip loads it
        except Exception as e:  # cut short (a full disk, a copy interrupted), another torch's, not ours: made again
            print(f"note: the cached model at {path} cannot be loaded ({common.unreadable(path, e)}): pretraining it "
                  "again", flush=True)
    if loads and not args.force:
        print(f"cached: {path}")
        return
    why = common.cache_write_error(path.parent)
    if why:  # now, not after minutes of pretraining
        raise SystemExit(f"error: {path.parent} cannot be written ({why}): the model pretrained now could not be kept; "
                         "point RFT_CACHE at a folder you can write")
    if path.exists():  # runs fine-tuned from the old model resume, or interpolate, only with it
        aside = path.with_suffix(f".previous{common.next_aside(path.parent, [path.stem])}.pt")
        try:
            os.link(path, aside)  # a second name for the old file: the atomic save below replaces only the first
        except OSError:  # a file system without hard links
            shutil.copy2(path, aside)
        print(f"note: the earlier model is kept as {aside.name}" + (f" (put it back as {path.name} to resume or "
              "interpolate runs fine-tuned from it)" if loads else ""), flush=True)
    pretrain(cfg, path, log=lambda msg: print(msg, flush=True))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
