"""Side by side, per epoch: kiln's and Ultralytics' training losses and validation mAP50 of one run
each (their results.csv files), or, with --scores, the pycocotools scores `parity_score.py` wrote.
Part of `benches/parity_experiment.sh`.

    python benches/parity_table.py KILN_RUN/results.csv ULTRA_RUN/results.csv [--scores K.txt U.txt]
"""

import argparse
import csv


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {int(float(r["epoch"].strip())): {k.strip(): v.strip() for k, v in r.items()} for r in rows}


def read_scores(path):
    """`epoch box50 box50-95 mask50 mask50-95` lines (parity_score.py's output; other lines skipped)."""
    out = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            try:
                out[int(parts[0])] = [float(p) for p in parts[1:]]
            except ValueError:
                continue
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("ultralytics")
    ap.add_argument("--scores", nargs=2, metavar=("KILN_SCORES", "ULTRA_SCORES"))
    args = ap.parse_args()
    k, u = read_csv(args.kiln), read_csv(args.ultralytics)
    ks, us = (read_scores(args.scores[0]), read_scores(args.scores[1])) if args.scores else ({}, {})
    losses = ["box", "seg", "cls", "dfl"]
    print("epoch | " + " | ".join(f"{n} k/u" for n in losses) + " | box50 k/u | mask50 k/u" + (" | coco box50 k/u | coco mask50 k/u" if ks or us else ""))
    for epoch in sorted(set(k) | set(u)):
        if epoch == 0:
            continue
        cells = []
        for n in losses:
            a, b = k.get(epoch, {}).get(f"train/{n}_loss"), u.get(epoch, {}).get(f"train/{n}_loss")
            cells.append(f"{float(a):.3f}/{float(b):.3f}" if a and b else "-")
        for kind in ("B", "M"):
            a, b = k.get(epoch, {}).get(f"metrics/mAP50({kind})"), u.get(epoch, {}).get(f"metrics/mAP50({kind})")
            cells.append(f"{float(a):.3f}/{float(b):.3f}" if a and b else "-")
        if ks or us:
            for i in (0, 2):
                a, b = ks.get(epoch), us.get(epoch)
                cells.append(f"{a[i]:.3f}/{b[i]:.3f}" if a and b else "-")
        print(f"{epoch:5d} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
