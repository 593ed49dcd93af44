# Ultralytics 8.4 trained on pre-augmented samples: epoch e's batch position p is dump image e*PER+p
# (augmentation off), the full schedule of a PER-image run. Usage: DUMP VAL_JSON VAL_IMAGES OUT SEED EPOCHS PER [W0.pt]
import os, sys, json
from pathlib import Path
sys.path.insert(0, "/work/main/benches")
os.environ["YOLO_OFFLINE"] = "1"
from student_train_baseline import convert
dump, val, val_images, out, seed, epochs, per = sys.argv[1:8]
w0 = sys.argv[8] if len(sys.argv) > 8 else False  # initial weights; none: Ultralytics' own seeded init
seed, epochs, per = int(seed), int(epochs), int(per)
import torch
torch.set_num_threads(2)
out = Path(out).resolve(); data_dir = out / "data"
coco = json.loads(Path(dump, "annotations.json").read_text())
cats = sorted(coco["categories"], key=lambda c: c["id"]); ci = {c["id"]: i for i, c in enumerate(cats)}
convert(f"{dump}/annotations.json", f"{dump}/images", data_dir, "train", ci)
convert(val, val_images, data_dir, "val", ci)
names = "\n".join(f"  {i}: {c['name']}" for i, c in enumerate(cats))
(data_dir / "data.yaml").write_text(f"path: {data_dir}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
import ultralytics.data.dataset as D
EPOCH = [0]
orig_len, orig_get = D.YOLODataset.__len__, D.YOLODataset.__getitem__
D.YOLODataset.__len__ = lambda self: per if self.augment else orig_len(self)
D.YOLODataset.__getitem__ = lambda self, i: orig_get(self, EPOCH[0] * per + i) if self.augment else orig_get(self, i)
from ultralytics import YOLO
model = YOLO("yolov8n-seg.yaml")
model.add_callback("on_train_epoch_start", lambda tr: EPOCH.__setitem__(0, tr.epoch))
model.train(data=str(data_dir / "data.yaml"), imgsz=256, batch=8, epochs=epochs, optimizer="AdamW", lr0=0.003,
            device="cpu", workers=0, project=str(out), name="run", exist_ok=True, pretrained=w0, amp=False,
            plots=False, seed=seed, deterministic=True, verbose=False, save_period=1,
            mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
