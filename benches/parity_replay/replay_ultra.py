# Ultralytics 8.4 trained on pre-augmented samples: epoch e's batch position p is dump image e*PER+p
# (augmentation off), the full schedule of a PER-image run. Usage: DUMP VAL_JSON VAL_IMAGES OUT SEED EPOCHS PER [W0.pt]
import sys
from pathlib import Path
from replay_common import prepare_data, replay_epochs
dump, val, val_images, out, seed, epochs, per = sys.argv[1:8]
w0 = sys.argv[8] if len(sys.argv) > 8 else False  # initial weights; none: Ultralytics' own seeded init
seed, epochs, per = int(seed), int(epochs), int(per)
import torch
torch.set_num_threads(2)
out = Path(out).resolve()
data_yaml = prepare_data(dump, val, val_images, out)
from ultralytics import YOLO
model = YOLO("yolov8n-seg.yaml")
replay_epochs(model, per)
model.train(data=str(data_yaml), imgsz=256, batch=8, epochs=epochs, optimizer="AdamW", lr0=0.003,
            device="cpu", workers=0, project=str(out), name="run", exist_ok=True, pretrained=w0, amp=False,
            plots=False, seed=seed, deterministic=True, verbose=False, save_period=1,
            mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
