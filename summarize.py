"""Build the ID/OOD summary table from finished runs: mean ± 90% CI over seeds (1.645 std / sqrt(n), as in the
LP-FT paper) of the evaluation each run selected on ID validation (its `done` marker).

    python summarize.py runs                 # prints a markdown table, writes runs/summary.md and runs/summary.csv
"""
import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp", "wiseft"]


def mean_ci(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.645 * std / math.sqrt(n)


def load_runs(root):
    runs = defaultdict(list)  # (dataset, method) -> list of done records
    for marker in sorted(Path(root).rglob("done")):
        record = json.loads(marker.read_text())
        runs[(record["dataset"], record["method"])].append(record)
    return runs


def build_table(runs):
    """Returns (markdown, csv rows) with one row per (dataset, method)."""
    lines, rows = [], []
    for dataset in sorted({d for d, _ in runs}):
        methods = sorted({m for d, m in runs if d == dataset}, key=lambda m: (METHOD_ORDER + [m]).index(m))
        ood = sorted({k[len("acc/ood_"):] for m in methods for r in runs[(dataset, m)] for k in r["metrics"]
                      if k.startswith("acc/ood_") and k != "acc/ood_avg"})
        cols = [("ID", "acc/id_test")] + [(f"OOD {o}", f"acc/ood_{o}") for o in ood] + [("OOD avg", "acc/ood_avg"),
                ("distortion ID", "distortion/id_test"), ("distortion OOD", "distortion/ood_avg")]
        lines += [f"**{dataset}**", "", "| method | seeds | " + " | ".join(c for c, _ in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for method in methods:
            records = runs[(dataset, method)]
            cells, row = [], {"dataset": dataset, "method": method, "seeds": len(records)}
            for name, key in cols:
                mean, ci = mean_ci([r["metrics"][key] for r in records])
                digits = 4 if key.startswith("distortion") else 1
                cells.append(f"{mean:.{digits}f} ± {ci:.{digits}f}")
                row[f"{name} mean"], row[f"{name} ci90"] = round(mean, 6), round(ci, 6)
            lines.append(f"| {method} | {len(records)} | " + " | ".join(cells) + " |")
            rows.append(row)
        lines.append("")
    return "\n".join(lines), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="runs", help="folder holding the run folders (default: runs)")
    args = parser.parse_args()
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"error: no finished runs (no 'done' markers) under {args.root!r}; run lp.py, ft.py, ... first")
    markdown, rows = build_table(runs)
    print(markdown)
    (Path(args.root) / "summary.md").write_text(markdown + "\n")
    with open(Path(args.root) / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
