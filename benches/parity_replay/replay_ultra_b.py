# Ultralytics 8.4 on pre-augmented samples, unshuffled, from given initial weights: epoch e's batch
# position p is dump image e*PER+p (augmentation off); each batch's losses in OUT.batches;
# STOP_EPOCHS ends it early. Usage: DUMP VAL_JSON VAL_IMAGES OUT SEED EPOCHS PER W0.pt
import os, sys
from pathlib import Path
from replay_common import prepare_data, replay_epochs
dump, val, val_images, out, seed, epochs, per, w0 = sys.argv[1:9]
seed, epochs, per = int(seed), int(epochs), int(per)
import torch
torch.set_num_threads(2)
out = Path(out).resolve()
data_yaml = prepare_data(dump, val, val_images, out)
from ultralytics import YOLO
model = YOLO("yolov8n-seg.yaml")
replay_epochs(model, per, shuffle=False)
LOG = open(str(out) + ".batches", "w")
def on_batch(tr):
    li = tr.loss_items; li = (list(li.values()) if isinstance(li, dict) else li.tolist()); li = [float(v) for v in li]
    LOG.write("BATCH " + " ".join("%.5f" % v for v in li) + " acc %d lr %s\n" % (tr.accumulate, [round(g["lr"], 6) for g in tr.optimizer.param_groups])); LOG.flush()
model.add_callback("on_train_batch_end", on_batch)
STOP = int(os.environ.get("STOP_EPOCHS", "0"))
def on_epoch_end(tr):
    if STOP and tr.epoch + 1 >= STOP: raise SystemExit(0)
model.add_callback("on_train_epoch_end", on_epoch_end)
model.train(data=str(data_yaml), imgsz=256, batch=8, epochs=epochs, optimizer="AdamW", lr0=0.003,
            device="cpu", workers=0, project=str(out), name="run", exist_ok=True, pretrained=w0, amp=False,
            plots=False, seed=seed, deterministic=True, verbose=False, save_period=1,
            mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
