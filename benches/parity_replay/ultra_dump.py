# Ultralytics 8.4's training samples of a YOLO set for EPOCHS epochs (the last 10 without mosaic,
# as its trainer does), written as a COCO set with full-size RLE masks.
import os, sys, json, random, numpy as np, cv2
os.environ["YOLO_OFFLINE"] = "1"
from pycocotools import mask as M
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset, polygon2mask
from ultralytics.data.augment import Compose
from ultralytics.utils import DEFAULT_CFG
from copy import copy
yaml, imgsz, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = get_cfg(DEFAULT_CFG, dict(task="segment", imgsz=imgsz, mode="train"))
data = check_det_dataset(yaml)
ds = build_yolo_dataset(cfg, os.path.join(data["path"], data["train"]), 8, data, mode="train", stride=32)
random.seed(0); np.random.seed(0)
os.makedirs(f"{out}/images", exist_ok=True)
images, anns = [], []
n = len(ds); k = 0
for epoch in range(epochs):
    if epoch == epochs - 10:
        ds.close_mosaic(hyp=copy(cfg))
    pre = Compose(ds.transforms.transforms[:-1])
    order = list(range(n)); random.shuffle(order)
    for i in order:
        lab = pre(ds.get_image_and_label(i))
        img = lab["img"]; h, w = img.shape[:2]
        inst = lab["instances"]; inst.convert_bbox("xyxy"); inst.denormalize(w, h)
        name = f"s{k:05}.png"; cv2.imwrite(f"{out}/images/{name}", img)
        images.append(dict(id=k + 1, file_name=name, width=w, height=h))
        for j in range(len(inst)):
            m = polygon2mask((h, w), [inst.segments[j].reshape(-1)], color=1, downsample_ratio=1)
            r = M.encode(np.asfortranarray(m.astype(np.uint8))); r["counts"] = r["counts"].decode()
            b = [float(v) for v in inst.bboxes[j]]
            anns.append(dict(id=len(anns) + 1, image_id=k + 1, category_id=int(lab["cls"][j][0]) + 1,
                             bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], area=int(m.sum()), iscrowd=0, segmentation=r))
        k += 1
cats = [dict(id=c + 1, name=nm) for c, nm in data["names"].items()]
json.dump(dict(images=images, annotations=anns, categories=cats), open(f"{out}/annotations.json", "w"))
print(len(images), len(anns))
