"""Side by side, per epoch: kiln's and Ultralytics' training losses and validation mAP50 (their
results.csv files); with --ultralytics-scores, Ultralytics' pycocotools scores from
`parity_score.py` beside kiln's own COCO evaluation (which equals pycocotools: tests/coco_eval.rs).
With --summary OUT, the whole experiment's verdict per dataset over its seeds (the issue's goal:
final box and mask mAP50 >= 0.97x Ultralytics', mean of the seeds, and never more than 0.05 behind
after the first quarter of the epochs). Part of `benches/parity_experiment.sh`.

    python benches/parity_table.py KILN_RUN/results.csv ULTRA_RUN/results.csv [--ultralytics-scores F]
    python benches/parity_table.py --summary OUT [OUT ...] [--tag TAG]
"""

import argparse
import csv
import re
from pathlib import Path


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {int(float(r["epoch"].strip())): {k.strip(): v.strip() for k, v in r.items()} for r in rows}


def read_scores(path):
    """`epoch box50 box50-95 mask50 mask50-95` lines (parity_score.py's output)."""
    out = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            out[int(parts[0])] = [float(p) for p in parts[1:]]
    return out


def kiln_coco(k):
    """kiln's own per-epoch COCO figures, as parity_score.py's columns."""
    return {
        e: [float(r[f"metrics/{m}({kind})"]) for kind in ("B", "M") for m in ("mAP50", "mAP50-95")]
        for e, r in k.items()
        if e > 0
    }


def side_by_side(kiln_csv, ultra_csv, ultra_scores):
    k, u = read_csv(kiln_csv), read_csv(ultra_csv)
    us = read_scores(ultra_scores) if ultra_scores else {}
    kc = kiln_coco(k)
    losses = ["box", "seg", "cls", "dfl"]
    header = "epoch | " + " | ".join(f"{n} loss k/u" for n in losses) + " | own box50 k/u | own mask50 k/u"
    print(header + (" | COCO box50 k/u | COCO mask50 k/u" if us else ""))
    for epoch in sorted(e for e in set(k) | set(u) if e > 0):
        cells = []
        for n in losses:
            a, b = k.get(epoch, {}).get(f"train/{n}_loss"), u.get(epoch, {}).get(f"train/{n}_loss")
            cells.append(f"{float(a):.3f}/{float(b):.3f}" if a and b else "-")
        for kind in ("B", "M"):
            a, b = k.get(epoch, {}).get(f"metrics/mAP50({kind})"), u.get(epoch, {}).get(f"metrics/mAP50({kind})")
            cells.append(f"{float(a):.3f}/{float(b):.3f}" if a and b else "-")
        if us:
            for i in (0, 2):
                a, b = kc.get(epoch), us.get(epoch)
                cells.append(f"{a[i]:.3f}/{b[i]:.3f}" if a and b else "-")
        print(f"{epoch:5d} | " + " | ".join(cells))


LOSS_TERMS = ("box", "seg", "cls", "dfl")


def goal_holds(a, b, epochs):
    """The goal's test of runs `a` against runs `b` (each a {epoch: [box50, box50-95, mask50,
    mask50-95]}): the means' final ratio >= 0.97 for box and mask, and the mean never more than
    0.05 behind after the first quarter."""
    mean = lambda runs, e, i: sum(r[e][i] for r in runs) / len(runs)
    last = epochs[-1]
    for i in (0, 2):
        if mean(b, last, i) > 0 and mean(a, last, i) < 0.97 * mean(b, last, i):
            return False
        if any(mean(b, e, i) - mean(a, e, i) > 0.05 for e in epochs if e > last / 4):
            return False
    return True


def noise_floor(kiln, ultra, epochs, size=3):
    """How often the goal's test passes on every choice of `size` seeds per side: kiln against
    Ultralytics, and each tool against itself on disjoint seeds (two equal trainers, told apart by
    nothing but the seeds). A pass rate well under 100 % for a tool against itself means the test
    on `size` seeds cannot tell a few per cent from noise on this set."""
    from itertools import combinations

    def rate(a, b, disjoint):
        tried = passed = 0
        for x in combinations(range(len(a)), size):
            for y in combinations(range(len(b)), size):
                if disjoint and set(x) & set(y):
                    continue
                tried += 1
                passed += goal_holds([a[i] for i in x], [b[i] for i in y], epochs)
        return f"{passed / tried:.0%} of {tried}" if tried else "n/a"

    return (f"the goal's test on every choice of {size} seeds per side passes: kiln vs Ultralytics "
            f"{rate(kiln, ultra, False)}; Ultralytics vs itself (disjoint seeds) {rate(ultra, ultra, True)}; "
            f"kiln vs itself {rate(kiln, kiln, True)}")


def summary(outs, tag):
    print(f"dataset | seeds | final box50 kiln / Ultralytics (ratio) | final mask50 kiln / Ultralytics (ratio) | "
          f"worst shortfall box / mask after the first quarter | final difference box / mask ± 2 s.e. (paired by seed) | goal")
    pooled = {}
    for dataset in sorted((p for out in outs for p in Path(out).iterdir() if p.is_dir()), key=lambda p: p.name):
        curves = []
        for run in sorted(dataset.glob(f"kiln-s*{tag}")):
            m = re.fullmatch(rf"kiln-s(\d+){re.escape(tag)}", run.name)
            ultra = dataset / f"ultra-s{m.group(1)}{tag}.scores" if m else None
            if not m or not (run / "results.csv").is_file() or not ultra.is_file():
                continue
            k = read_csv(run / "results.csv")
            kc, us = kiln_coco(k), read_scores(ultra)
            epochs = sorted(set(kc) & set(us))
            ultra_csv = dataset / f"ultra-s{m.group(1)}{tag}" / "run" / "results.csv"
            if epochs:
                curves.append((epochs, kc, us, int(m.group(1)), k, read_csv(ultra_csv) if ultra_csv.is_file() else {}))
        if not curves:
            continue
        # A run killed before its last epoch (its weights are saved every epoch) would cut every
        # seed's curve short: the verdict counts only the runs that reached the longest run's end.
        final = max(c[0][-1] for c in curves)
        unfinished = [c for c in curves if c[0][-1] < final]
        curves = [c for c in curves if c[0][-1] == final]
        seeds = f"{len(curves)}" + (f" ({len(unfinished)} unfinished left out)" if unfinished else "")
        epochs = sorted(set.intersection(*(set(c[0]) for c in curves)))
        mean = lambda source, e, i: sum(c[source][e][i] for c in curves) / len(curves)
        last = epochs[-1]
        kb, ub, km, um = mean(1, last, 0), mean(2, last, 0), mean(1, last, 2), mean(2, last, 2)
        after = [e for e in epochs if e > last / 4]
        worst_box = max(mean(2, e, 0) - mean(1, e, 0) for e in after)
        worst_mask = max(mean(2, e, 2) - mean(1, e, 2) for e in after)
        ratio = lambda a, b: a / b if b > 0 else float("nan")
        ok = ratio(kb, ub) >= 0.97 and ratio(km, um) >= 0.97 and worst_box <= 0.05 and worst_mask <= 0.05
        # Where neither tool scores above zero at any epoch, the set tells nothing either way.
        silent = all(c[1][e][i] == 0 and c[2][e][i] == 0 for c in curves for e in epochs for i in (0, 2))
        goal = "no signal: both tools score 0 at every epoch" if silent else "met" if ok else "missed"
        shown = lambda a, b: f"{a / b:.2f}x" if b > 0 else "n/a: Ultralytics scored 0"
        # Seed-to-seed spread: one run's final figure moves by 0.04-0.08 at this scale (README), so
        # the difference of the means is shown with twice its standard error; a shortfall inside it
        # is not told apart from noise by these seeds. Paired by seed: kiln's and Ultralytics' runs
        # of one seed start from the same weights (kiln draws them as PyTorch does), so what moves
        # both with the start cancels in the per-seed difference.
        def difference(i):
            d = [c[1][last][i] - c[2][last][i] for c in curves]
            if len(d) < 2:
                return f"{d[0]:+.3f} ± n/a (one seed)"
            m = sum(d) / len(d)
            se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
            return f"{m:+.3f} ± {2 * se:.3f}"
        print(f"{dataset.name} | {seeds} | {kb:.3f} / {ub:.3f} ({shown(kb, ub)}) | "
              f"{km:.3f} / {um:.3f} ({shown(km, um)}) | {worst_box:+.3f} / {worst_mask:+.3f} | "
              f"{difference(0)} / {difference(2)} | {goal}")
        if not silent:
            pooled[dataset.name] = [(c[1][last][0], c[2][last][0], c[1][last][2], c[2][last][2]) for c in curves]
        if len(curves) > 3 and not silent:
            print("  " + noise_floor([c[1] for c in curves], [c[2] for c in curves], epochs))
        # Per seed: where a run ends against the other tool's, and how its training loss compared
        # over the last five epochs (a run that ends behind has, so far, always trained to a higher
        # loss on its own samples: README, "Every set at c0e6cd2").
        for _, kc, us, seed, k, u in sorted(curves, key=lambda c: c[3]):
            ratio_text = "n/a"
            tail = [e for e in epochs[-5:] if e in k and e in u]
            if tail:
                total = lambda rows: sum(float(rows[e][f"train/{t}_loss"]) for e in tail for t in LOSS_TERMS)
                ratio_text = f"{total(k) / total(u):.2f}"
            print(f"  seed {seed}: final box {kc[last][0]:.3f} / {us[last][0]:.3f}, mask {kc[last][2]:.3f} / "
                  f"{us[last][2]:.3f}; training loss kiln / Ultralytics over the last 5 epochs {ratio_text}")
    if len(pooled) > 1:
        print(pooled_ratio(pooled))


def pooled_ratio(pooled):
    """Every set's seeds pooled: each run's final figure minus Ultralytics' of the same seed, over
    Ultralytics' mean on that set, averaged over all runs of all sets, with twice its standard
    error. One set's three seeds resolve about 0.1 (README); pooled over sets and seeds, the
    question "does kiln learn as well as Ultralytics" gets an answer a few per cent wide."""
    def line(k, u):
        rel = []
        for runs in pooled.values():
            base = sum(r[u] for r in runs) / len(runs)
            rel += [(r[k] - r[u]) / base for r in runs] if base > 0 else []
        if len(rel) < 2:
            return "n/a"
        m = sum(rel) / len(rel)
        se = (sum((x - m) ** 2 for x in rel) / (len(rel) - 1) / len(rel)) ** 0.5
        return f"{1 + m:.3f}x ± {2 * se:.3f}"
    runs = sum(len(r) for r in pooled.values())
    return (f"pooled over {len(pooled)} sets, {runs} paired runs: final kiln / Ultralytics, box "
            f"{line(0, 1)}, mask {line(2, 3)} (each run against Ultralytics' mean on its set, ± 2 s.e.)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln", nargs="?")
    ap.add_argument("ultralytics", nargs="?")
    ap.add_argument("--ultralytics-scores")
    ap.add_argument("--summary", metavar="OUT", nargs="+", help="one or more experiment directories")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary, args.tag)
    else:
        side_by_side(args.kiln, args.ultralytics, args.ultralytics_scores)


if __name__ == "__main__":
    main()
