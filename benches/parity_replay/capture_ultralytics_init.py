"""The exact initial weights of an Ultralytics 8.4 parity run (the settings of
benches/student_train_baseline.py), saved at `on_pretrain_routine_end` as a checkpoint kiln's
`--weights` reads; then one epoch is trained and its losses printed, to be checked against row 1
of the original run's results.csv (equal to the last digit: the same draw).

Usage: capture_ultralytics_init.py ULTRA_RUN/data/data.yaml SEED OUT.pt"""
import copy, os, sys, torch
os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO
data, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
class Stop(Exception): pass
def save_init(trainer):
    torch.save({"model": copy.deepcopy(trainer.model).float()}, out)
    print("saved", out, flush=True)
def after_epoch(trainer):
    print("epoch1 tloss", trainer.label_loss_items(trainer.tloss, prefix="train"), flush=True)
    raise Stop()
model = YOLO("yolov8n-seg.yaml")
model.add_callback("on_pretrain_routine_end", save_init)
model.add_callback("on_train_epoch_end", after_epoch)
try:
    model.train(data=data, imgsz=256, batch=8, epochs=30, optimizer="AdamW", lr0=0.003, device="cpu",
                workers=0, project="/tmp/capture", name=f"s{seed}", exist_ok=True, pretrained=False,
                amp=False, plots=False, seed=seed, deterministic=True, verbose=False, val=False)
except Stop:
    pass
