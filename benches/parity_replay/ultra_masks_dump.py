# kiln's dumped stream with the mask targets Ultralytics would train on: each RLE -> the largest
# contour polygon (benches/student_train_baseline.py's convert, coordinates rounded to 6 decimals of
# the size as YOLO labels are) -> polygon2mask at 1/4 (fillPoly, resize), blown up 4x so that kiln's
# cell-centre sampling reads that quarter mask exactly. Boxes unchanged. Usage: SRC DST
import sys, json, os, numpy as np
sys.path.insert(0, "/work/main/benches")
from student_train_baseline import polygons_of
from ultralytics.data.utils import polygon2mask
from pycocotools import mask as M
import cv2
src, dst = sys.argv[1:3]
d = json.load(open(f"{src}/annotations.json"))
imgs = {i["id"]: i for i in d["images"]}
out = []
for a in d["annotations"]:
    im = imgs[a["image_id"]]; h, w = im["height"], im["width"]
    polys = polygons_of(a["segmentation"], h, w)
    if not polys:
        continue
    p = max(polys, key=lambda q: cv2.contourArea(q.astype(np.float32)))
    p = np.array([[round(x / w, 6) * w, round(y / h, 6) * h] for x, y in p], dtype=np.float32)
    q = polygon2mask((h, w), [p.reshape(-1)], color=1, downsample_ratio=4)
    full = np.kron(q, np.ones((4, 4), dtype=np.uint8))[:h, :w]
    r = M.encode(np.asfortranarray(full.astype(np.uint8))); r["counts"] = r["counts"].decode()
    out.append(dict(a, segmentation=r, area=int(full.sum())))
os.makedirs(dst, exist_ok=True)
if not os.path.exists(f"{dst}/images"):
    os.symlink(os.path.abspath(f"{src}/images"), f"{dst}/images")
json.dump(dict(d, annotations=out), open(f"{dst}/annotations.json", "w"))
print(len(d["annotations"]), len(out))
