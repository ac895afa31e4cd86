"""Building a zero-shot head (common.zeroshot_weights): peak memory and time with the text tower called on
common.TEXT_BATCH captions at a time against one call on every caption, each in a fresh process, in one run. CLIP
ViT-B/16's text tower with random weights (memory and time do not depend on them), on the CPU; the two must give
the same class embeddings.

    python benchmarks/zeroshot_memory.py                      # 1,000 classes x 2 templates = 2,000 captions
    python benchmarks/zeroshot_memory.py --templates 80       # ImageNet's 80,000 captions (slow on a CPU)
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def build(classes, templates, text_batch, out):
    """One measurement, in this process: resident memory before and at the peak, seconds, the embeddings to `out`."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu").eval()
    del clip.visual  # only the text tower runs; the image tower's weights would only add to the baseline
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    names, prompts = [f"class {i}" for i in range(classes)], [f"a photo of a {{}}, style {j}." for j in range(templates)]
    common.tokenize(tokenizer, tuple(t.format(c) for c in names for t in prompts))  # BPE outside the clock
    common.TEXT_BATCH = text_batch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    weights = common.zeroshot_weights(clip, tokenizer, names, prompts, torch.device("cpu"), "fp32")
    seconds = time.perf_counter() - start
    torch.save(weights, out)
    return {"baseline_mib": before / 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: TEXT_BATCH and output file
    args = parser.parse_args()
    if args.one:
        print(json.dumps(build(args.classes, args.templates, int(args.one[0]), args.one[1])))
        return
    n = args.classes * args.templates
    rows, weights = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text_batch in ((f"one call of {n:,}", n), (f"chunks of {common.TEXT_BATCH:,}", common.TEXT_BATCH)):
            out = Path(tmp) / f"{text_batch}.pt"
            run = subprocess.run([sys.executable, __file__, "--classes", str(args.classes), "--templates",
                                  str(args.templates), "--one", str(text_batch), str(out)],
                                 capture_output=True, text=True, check=True)
            rows[name], weights[name] = json.loads(run.stdout.splitlines()[-1]), torch.load(out)
    one_call, chunked = weights.values()
    gap = (one_call - chunked).abs().max().item()
    print(f"{args.classes:,} classes x {args.templates} templates = {n:,} captions, CLIP ViT-B/16 text tower, CPU fp32, "
          f"{torch.get_num_threads()} threads")
    print("| text tower called on | peak memory above the loaded model (MiB) | seconds |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_mib'] - r['baseline_mib']:,.0f} | {r['seconds']:.1f} |")
    print(f"largest difference between the two heads' weights: {gap:.2e}")


if __name__ == "__main__":
    main()
