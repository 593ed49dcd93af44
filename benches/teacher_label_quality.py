#!/usr/bin/env python3
"""How good a teacher's labels are: a distilled run's `teacher_labels.json` (COCO, with scores)
against the true labels of the same unlabelled images (a COCO file, e.g. the experiment's
splits/unl.json), matched by file name; greedy by score as COCO matches, IoU >= 0.5, once
regardless of class and once requiring the class. Prints precision and recall of each.

    python3 benches/teacher_label_quality.py TRUTH.json RUN/teacher_labels.json [MIN_SCORE]
"""
import json, sys
from collections import defaultdict
truth = json.load(open(sys.argv[1])); labels = json.load(open(sys.argv[2]))
if isinstance(labels, dict):
    ids = {i["file_name"]: i["id"] for i in truth["images"]}
    missing = [i["file_name"] for i in labels["images"] if i["file_name"] not in ids]
    if missing:
        sys.exit(f"{sys.argv[2]}: {len(missing)} image(s) not in {sys.argv[1]} (first: {missing[0]}); pass the truth of the same unlabelled images")
    local = {i["id"]: ids[i["file_name"]] for i in labels["images"]}
    labels = [dict(l, image_id=local[l["image_id"]]) for l in labels["annotations"]]
thr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
gt = defaultdict(list)
for a in truth["annotations"]: gt[a["image_id"]].append(a)
pr = defaultdict(list)
for l in labels:
    if l["score"] >= thr: pr[l["image_id"]].append(l)
def iou(a, b):
    ax, ay, aw, ah = a; bx, by, bw, bh = b
    ix = max(0, min(ax+aw, bx+bw) - max(ax, bx)); iy = max(0, min(ay+ah, by+bh) - max(ay, by))
    i = ix*iy; u = aw*ah + bw*bh - i
    return i/u if u > 0 else 0
for name, same_class in (("any class", False), ("same class", True)):
    tp = 0; n = 0
    for img in truth["images"]:
        g = gt[img["id"]]; used = [False]*len(g)
        for p in sorted(pr[img["id"]], key=lambda p: -p["score"]):
            best, bi = 0.5, -1
            for i, a in enumerate(g):
                if used[i] or (same_class and a["category_id"] != p["category_id"]): continue
                v = iou(p["bbox"], a["bbox"])
                if v >= best: best, bi = v, i
            if bi >= 0: used[bi] = True; tp += 1
    n_pred = sum(len(v) for v in pr.values()); n_gt = len(truth["annotations"])
    print(f"{name}: {tp} of {n_pred} labels match one of {n_gt} objects: precision {tp/n_pred:.2f}, recall {tp/n_gt:.2f}")
