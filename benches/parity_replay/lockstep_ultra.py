# Ultralytics 8.4 on pre-augmented samples in a fixed order from given initial weights: epoch e is
# dump images e*PER .. e*PER+PER-1, unshuffled, no validation. Usage: DUMP VAL_JSON VAL_IMAGES OUT EPOCHS PER W0
import os, sys, json
from pathlib import Path
from replay_common import prepare_data, replay_epochs
dump, val, val_images, out, epochs, per, w0 = sys.argv[1:8]
epochs, per = int(epochs), int(per)
import torch
torch.set_num_threads(2)
out = Path(out).resolve()
data_yaml = prepare_data(dump, val, val_images, out, reuse=True)
from ultralytics import YOLO
losses = []
model = YOLO("yolov8n-seg.yaml")
replay_epochs(model, per, shuffle=False)
model.add_callback("on_train_epoch_end", lambda tr: losses.append([float(tr.tloss[k]) for k in ("box_loss", "seg_loss", "cls_loss", "dfl_loss")]))
model.train(data=str(data_yaml), imgsz=256, batch=8, epochs=epochs, optimizer="AdamW", lr0=0.003,
            device="cpu", workers=0, project=str(out), name="run", exist_ok=True, pretrained=w0, amp=False,
            plots=False, warmup_epochs=float(os.environ.get("WARMUP", 3)), seed=0, deterministic=True, verbose=False, val=False, close_mosaic=0,
            mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
json.dump(losses, open(out / "losses.json", "w"))
