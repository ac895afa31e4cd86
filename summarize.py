"""Build the ID/OOD summary table and pictures from finished runs: mean ± 90% CI over seeds (1.645 std / sqrt(n), as
in the LP-FT paper; one seed shows its mean alone) of the evaluation each run selected on ID validation (its `done`
marker). For real datasets the paper's number stands beside ours where reference/published.json has one and our
runs used the paper's backbone (and OpenAI's CLIP weights), with its provenance tag. Seeds of one method on other
backbones, pretrained weights, recipes or other options (L2-SP's --alpha), WiSE-FT of endpoints fine-tuned with other
recipes or options, or that scored other OOD test sets, are not averaged: an error. A row's OOD average over fewer sets
than the other rows' says which it averages.

    python summarize.py runs       # prints the table; writes runs/summary.md, runs/summary.csv and, per dataset,
                                   # runs/<dataset>_id_ood.png and runs/<dataset>_distortion.png
"""
import argparse
import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path

TUNED = ["ft", "ft-zeroshot-head", "lpft", "l2sp", "flyp"]  # the methods that can be WiSE-FT endpoints
METHOD_ORDER = ["zeroshot", "lp", *TUNED] + [f"wiseft-{m}" for m in ["flyp"] + TUNED[:-1]]
LABELS = {"zeroshot": "zero-shot", "lp": "LP", "ft": "FT", "ft-zeroshot-head": "FT from zero-shot head", "lpft": "LP-FT",
          "l2sp": "L2-SP", "flyp": "FLYP", "flyp_fewshot": "FLYP few-shot"}
LABELS.update({f"wiseft-{m}": f"WiSE-FT ({LABELS[m]}, α=0.5)" for m in TUNED})
RENAMED = {"flyp-fewshot": "flyp_fewshot"}  # a method's name in runs made before it became its file's
PUBLISHED = Path(__file__).with_name("reference") / "published.json"


def mean_ci(values):
    """(mean, 90% CI half-width); the CI is None for one value, which has no spread to measure (not 0)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, 1.645 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def load_runs(root):
    """(dataset, method) -> the `done` records of its finished runs, each with the path of its results file."""
    runs, seen = defaultdict(list), {}
    for marker in sorted(Path(root).rglob("done")):
        if not marker.is_file():  # a folder of that name
            continue
        record = read_json(marker)
        if not isinstance(record, dict) or {"method", "dataset", "seed", "metrics"} - record.keys():
            raise SystemExit(f"error: {marker} is not a finished run's marker (no method, dataset, seed and metrics); "
                             f"move {marker.parent} out of {root}, or run it again")
        record["method"] = RENAMED.get(record["method"], record["method"])
        key = (record["dataset"], record["method"], record["seed"])
        if key in seen:  # a sweep or a variant under the same root would be averaged in as another seed
            raise SystemExit(f"error: {seen[key]} and {marker.parent} are both {key[1]} on {key[0]} with seed "
                             f"{key[2]}; a table row averages seeds of one recipe: a variant of a method needs its own name "
                             f"(common.setup(args, \"<name>\") in its script); else move one run out of {root}, or "
                             "summarize each folder on its own")
        seen[key] = marker.parent
        runs[(record["dataset"], record["method"])].append({**record, "results": str(marker.with_name("results.jsonl"))})
    for (dataset, method), records in runs.items():
        # in `done` markers since 2026-12-05; options are the other flags, as L2-SP's --alpha; endpoint: WiSE-FT's
        # fine-tuned checkpoint's recipe and options (since 2026-12-05 too)
        for field in ("backbone", "weights", "recipe", "options", "endpoint"):
            known = [r for r in records if r.get(field)]
            if any(not same(field, known[0][field], r[field]) for r in known[1:]):
                runs_of = "; ".join(f"{Path(r['results']).parent}: {json.dumps(r.get(field), sort_keys=True)}"
                                    for r in records)
                raise SystemExit(f"error: the {method} runs on {dataset} under {root} differ in their {field} "
                                 f"({runs_of}); a table row averages seeds of one recipe and options on one backbone: "
                                 "summarize each folder on its own, or give a variant of a method its own name "
                                 "(common.setup(args, \"<name>\") in its script)")
        scored = {Path(r["results"]).parent: sorted(ood_sets(r["metrics"])) for r in records}
        if len({tuple(sets) for sets in scored.values()}) > 1:  # a set missing when a seed ran (data.py skips it)
            runs_of = "; ".join(f"{folder}: {', '.join(sets) or 'none'}" for folder, sets in scored.items())
            raise SystemExit(f"error: the {method} runs on {dataset} under {root} scored other OOD test sets "
                             f"({runs_of}); their OOD averages are not one quantity: put the missing set in place "
                             "(docs/datasets.md) and run the seeds that lack it again")
    return runs


def read_json(path, lines=False):
    """A run's file (`done`, or results.jsonl's lines), or an error that names it: runs write them atomically, so one
    that does not parse was cut short or edited by something else."""
    try:
        text = Path(path).read_text()
        return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} cannot be read ({e}); move {Path(path).parent} out of the folder summarized, "
                         "or run it again") from None


def ood_sets(metrics):
    """The OOD test sets scored, from metric keys, in their order (a loader skips a missing ImageNet OOD set, with a
    note)."""
    return [k[len("acc/ood_"):] for k in metrics if k.startswith("acc/ood_") and k != "acc/ood_avg"]


def fewer_sets(runs, dataset, method):
    """The OOD sets a method's runs scored, sorted, where they are fewer than the dataset's other runs scored (its
    OOD average is not theirs); else None."""
    every = {o for (d, _), records in runs.items() if d == dataset for r in records for o in ood_sets(r["metrics"])}
    scored = set(ood_sets(runs[(dataset, method)][0]["metrics"]))  # every seed's (load_runs)
    return sorted(scored) if scored != every else None


def same(field, a, b):
    """Whether two seeds' records of `field` let them share a table row: equal by value (lr 1, set in code, is --lr
    1.0); options on the flags both record (a flag added since is not a difference); weights by common.same_weights'
    rule (written out here: summarize.py imports no torch): one hub tag, one embedded model (its weights' hash, else
    its file's), or files of one name and size, wherever they lay."""
    if field == "options":
        return all(a[k] == b[k] for k in a.keys() & b.keys())
    if field == "endpoint":  # WiSE-FT's fine-tuned checkpoints: one without a recipe (before 2026-12-03) pools
        return (None in (a["recipe"], b["recipe"]) or a["recipe"] == b["recipe"]) and same("options", a["options"],
                                                                                          b["options"])
    if field != "weights":
        return a == b
    if "tag" in a or "tag" in b:
        return a.get("tag") == b.get("tag")
    for key in ("weights_sha1", "sha1"):
        if key in a and key in b:
            return a[key] == b[key]
    return "bytes" not in a or "bytes" not in b or (Path(a["file"]).name, a["bytes"]) == (Path(b["file"]).name,
                                                                                           b["bytes"])


def comparable(paper, records):
    """Whether a paper's number compares with these runs: none records another backbone than the paper's (a tiny one
    of ours), nor a CLIP hub tag other than OpenAI's (LAION's), which the papers fine-tuned. Markers before 2026-12-05
    record neither."""
    backbones = {r.get("backbone") for r in records} - {None}
    tags = {(r.get("weights") or {}).get("tag") for r in records} - {None, "openai"}
    return not tags and ("backbone" not in paper or backbones <= {paper["backbone"]})


def load_published(path=PUBLISHED):
    """(dataset, method, column) -> published entry."""
    entries = json.loads(Path(path).read_text())["entries"] if Path(path).exists() else []
    return {(e["dataset"], e["method"], e["column"]): e for e in entries}


def ordered_methods(runs, dataset):
    return sorted({m for d, m in runs if d == dataset}, key=lambda m: ((METHOD_ORDER + [m]).index(m), m))


HEADLINE = {"macro_f1": "macro-F1", "worst_region_acc": "worst region"}  # iWildCam's and FMoW's own metrics


def columns(runs, dataset):
    """(column name, metric key) pairs: ID, each OOD split, OOD average, the benchmark's own metric ID and OOD where
    it has one (HEADLINE), feature distortion ID and OOD."""
    keys = list(dict.fromkeys(k for (d, m), records in sorted(runs.items()) if d == dataset for r in records
                              for k in r["metrics"]))
    ood = ood_sets(keys)
    own = [(f"{side} {label}", f"{metric}/{split}") for metric, label in HEADLINE.items()
           for side, split in (("ID", "id_test"), ("OOD", "ood_avg")) if f"{metric}/{split}" in keys]
    return ([("ID", "acc/id_test")] + [(f"OOD {o}", f"acc/ood_{o}") for o in ood] + [("OOD avg", "acc/ood_avg")]
            + own + [("distortion ID", "distortion/id_test"), ("distortion OOD", "distortion/ood_avg")])


def build_table(runs, published=None):
    """Returns (markdown, csv rows) with one row per (dataset, method)."""
    published = load_published() if published is None else published
    lines, rows = [], []
    for dataset in sorted({d for d, _ in runs}):
        cols = columns(runs, dataset)
        lines += [f"**{dataset}**", "", "| method | seeds | " + " | ".join(c for c, _ in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for method in ordered_methods(runs, dataset):
            records = runs[(dataset, method)]
            cells, row = [], {"dataset": dataset, "method": method, "seeds": len(records)}
            fewer = fewer_sets(runs, dataset, method)
            for name, key in cols:
                values = [r["metrics"][key] for r in records if key in r["metrics"]]
                if not values:
                    cells.append("–")
                    continue
                mean, ci = mean_ci(values)
                digits = 4 if key.startswith("distortion") else 1
                cell = f"{mean:.{digits}f}" + ("" if ci is None else f" ± {ci:.{digits}f}")  # one seed: no CI
                row[f"{name} mean"], row[f"{name} ci90"] = round(mean, 6), "" if ci is None else round(ci, 6)
                paper = published.get((dataset, method, name))
                if key.endswith("/ood_avg") and fewer:  # not the other rows' average, nor the paper's
                    cell += f" (over {', '.join(fewer)} only)"
                    row[f"{name} over"] = ", ".join(fewer)
                elif paper and comparable(paper, records):
                    cell += f" (paper {paper['value']:.1f}" + (f" ± {paper['ci']:.1f}" if "ci" in paper else "") + \
                            f" [{paper['tag']}])"
                    row[f"{name} paper"], row[f"{name} paper source"] = paper["value"], f"{paper['source']} [{paper['tag']}]"
                cells.append(cell)
            lines.append(f"| {LABELS.get(method, method)} | {len(records)} | " + " | ".join(cells) + " |")
            rows.append(row)
        lines.append("")
    return "\n".join(lines), rows


def alpha_curve(records, axes=("acc", "acc")):
    """WiSE-FT's (alpha, mean ID metric, mean OOD average metric) over seeds, from each run's results file; `axes`
    names the two metrics (plotted_axes)."""
    by_alpha = defaultdict(list)
    for r in records:
        for entry in read_json(r["results"], lines=True):
            by_alpha[entry["alpha"]].append(entry["metrics"])
    return [(a, mean_ci([m[f"{axes[0]}/id_test"] for m in ms])[0], mean_ci([m[f"{axes[1]}/ood_avg"] for m in ms])[0])
            for a, ms in sorted(by_alpha.items())]


ID_AXIS = {"worst_region_acc": "acc"}  # FMoW's papers (WiSE-FT, FLYP) plot average ID accuracy vs worst-region OOD


def plotted_axes(runs, dataset):
    """The two metrics of the ID-vs-OOD picture, as the benchmark's papers plot them: its own metric (HEADLINE:
    iWildCam's macro-F1 on both axes; FMoW's worst region on the OOD axis, average accuracy on the ID axis) where
    every run has it; else accuracy."""
    records = [r for (d, _), rs in runs.items() if d == dataset for r in rs]
    own = next((k for k in HEADLINE if all(f"{k}/{s}" in r["metrics"] for r in records for s in ("id_test", "ood_avg"))),
               "acc")
    return ID_AXIS.get(own, own), own


def plot(runs, dataset, out_dir):
    """Two pictures: ID vs OOD accuracy of every method (with WiSE-FT's alpha curves) and feature distortion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, (id_metric, ood_metric) = ordered_methods(runs, dataset), plotted_axes(runs, dataset)
    stats = {m: {k: mean_ci([r["metrics"][k] for r in runs[(dataset, m)]]) for k in
                 (f"{id_metric}/id_test", f"{ood_metric}/ood_avg", "distortion/id_test", "distortion/ood_avg")}
             for m in methods}
    colours = {m: f"C{i}" for i, m in enumerate(methods)}

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for m in methods:
        if m.startswith("wiseft"):
            curve = alpha_curve(runs[(dataset, m)], (id_metric, ood_metric))
            ax.plot([c[1] for c in curve], [c[2] for c in curve], "-", color=colours[m], alpha=0.6, zorder=1)
            for a, x, y in curve:
                if a in (0.0, 0.5, 1.0):
                    ax.annotate(f"α={a:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8,
                                color=colours[m])
        (x, xe), (y, ye) = stats[m][f"{id_metric}/id_test"], stats[m][f"{ood_metric}/ood_avg"]
        fewer = fewer_sets(runs, dataset, m)  # its OOD average is over fewer sets than the others' (the table says so)
        label = LABELS.get(m, m) + (f" (OOD: {', '.join(fewer)} only)" if fewer else "")
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color=colours[m], label=label, capsize=3, zorder=2)
    ax.set_xlabel(f"ID test {HEADLINE.get(id_metric, 'accuracy')} (%)")
    ax.set_ylabel(f"OOD {HEADLINE.get(ood_metric, 'accuracy')}, average over shifts (%)")
    ax.set_title(f"{dataset}: ID vs OOD (mean ± 90% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    write_atomic(Path(out_dir) / f"{dataset}_id_ood.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    moved = [m for m in methods if stats[m]["distortion/id_test"][0] > 0 or stats[m]["distortion/ood_avg"][0] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (key, name) in enumerate((("distortion/id_test", "ID test"), ("distortion/ood_avg", "OOD (avg)"))):
        ax.bar([j + (i - 0.5) * 0.38 for j in range(len(moved))], [stats[m][key][0] for m in moved], 0.38,
               yerr=[math.nan if stats[m][key][1] is None else stats[m][key][1] for m in moved], capsize=3, label=name)
    ax.set_xticks(range(len(moved)), [LABELS.get(m, m) for m in moved], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("feature distortion  ‖f − f₀‖² / ‖f₀‖²")
    ax.set_title(f"{dataset}: how far fine-tuning moved the features (LP, zero-shot: 0)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    write_atomic(Path(out_dir) / f"{dataset}_distortion.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_atomic(path, write):
    """`write(tmp)` beside, then renamed: a reader never sees half a table or picture. common.py has the same lines;
    importing it (torch, open_clip) would add 6 s to the 2.5 s this script takes."""
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("root", nargs="?", default="runs", help="folder holding the run folders (default: runs)")
    parser.add_argument("--no-plots", action="store_true", help="write the table and CSV only")
    args = parser.parse_args()
    if not Path(args.root).is_dir():
        raise SystemExit(f"error: {args.root!r} is not a folder; pass the folder that holds the run folders "
                         "(run_all.sh writes them to runs/)")
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"error: no finished runs (no 'done' markers) under {args.root!r}; run lp.py, ft.py, ... first")
    markdown, rows = build_table(runs)
    print(markdown)
    write_atomic(Path(args.root) / "summary.md", lambda tmp: tmp.write_text(markdown + "\n"))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(args.root) / "summary.csv", lambda tmp: tmp.write_text(table.getvalue()))
    if not args.no_plots:
        for dataset in sorted({d for d, _ in runs}):
            if all("acc/ood_avg" in r["metrics"] for (d, _), rs in runs.items() if d == dataset for r in rs):
                plot(runs, dataset, args.root)
            else:  # PCam, SST-2: FLYP's few-shot benchmarks have no OOD test set
                print(f"{dataset}: no OOD test sets, so no ID-vs-OOD picture")


if __name__ == "__main__":
    main()
