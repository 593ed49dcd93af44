# The dump as Ultralytics trains on it, for kiln too: each RLE mask replaced by the largest contour
# polygon `student_train_baseline.convert` writes for Ultralytics, and each box taken from that
# polygon (Ultralytics derives a segment label's box from its polygon: about 1 px narrower than the
# mask's own box). Both tools then read the same polygons and boxes.
# Usage: PYTHONPATH=benches polygon_dump.py SRC_DUMP OUT_DIR
import json, os, sys
import cv2, numpy as np
from student_train_baseline import polygons_of

src, out = sys.argv[1:3]
d = json.load(open(f"{src}/annotations.json"))
images = {i["id"]: i for i in d["images"]}
kept = []
for a in d["annotations"]:
    image = images[a["image_id"]]
    polys = polygons_of(a["segmentation"], image["height"], image["width"])
    if not polys:
        continue
    p = max(polys, key=lambda q: cv2.contourArea(q.astype(np.float32))).astype(float)
    x0, y0, x1, y1 = p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()
    kept.append(dict(a, segmentation=[[round(float(v), 3) for v in p.reshape(-1)]],
                     bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     area=float(cv2.contourArea(p.astype(np.float32)))))
os.makedirs(out, exist_ok=True)
json.dump(dict(d, annotations=kept), open(f"{out}/annotations.json", "w"))
if not os.path.exists(f"{out}/images"):
    os.symlink(os.path.abspath(f"{src}/images"), f"{out}/images")
print(len(kept), "of", len(d["annotations"]), "annotations kept")
