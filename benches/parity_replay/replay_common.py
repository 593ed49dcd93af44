# What the Ultralytics replay scripts share: the dump and val set converted to a YOLO dataset, and
# Ultralytics' training set patched so that epoch e's batch position p reads dump image e*PER+p
# (optionally unshuffled). Import before `ultralytics` builds its trainer.
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benches/: student_train_baseline
os.environ.setdefault("YOLO_OFFLINE", "1")


def prepare_data(dump, val, val_images, out, reuse=False):
    """The dump as train and `val` as val split of a YOLO dataset under OUT/data; its data.yaml path.
    With `reuse`, a dataset already there is kept."""
    from student_train_baseline import convert

    data_dir = Path(out).resolve() / "data"
    if reuse and (data_dir / "data.yaml").exists():
        return data_dir / "data.yaml"
    coco = json.loads(Path(dump, "annotations.json").read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    convert(f"{dump}/annotations.json", f"{dump}/images", data_dir, "train", index)
    convert(val, val_images, data_dir, "val", index)
    names = "\n".join(f"  {i}: {c['name']}" for i, c in enumerate(cats))
    (data_dir / "data.yaml").write_text(f"path: {data_dir}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data_dir / "data.yaml"


def replay_epochs(model, per, shuffle=True):
    """Patches Ultralytics so that each training epoch is the next PER dump images (augmentation is
    turned off by the caller's train arguments); `shuffle=False` keeps them in order."""
    import ultralytics.data.dataset as D

    epoch = [0]
    orig_len, orig_get = D.YOLODataset.__len__, D.YOLODataset.__getitem__
    D.YOLODataset.__len__ = lambda self: per if self.augment else orig_len(self)
    D.YOLODataset.__getitem__ = lambda self, i: orig_get(self, epoch[0] * per + i) if self.augment else orig_get(self, i)
    if not shuffle:
        import ultralytics.models.yolo.detect.train as T

        orig_build = T.build_dataloader
        T.build_dataloader = lambda dataset, batch, workers, shuffle=True, *a, **k: orig_build(
            dataset, batch, workers, False, *a, **k)
    model.add_callback("on_train_epoch_start", lambda trainer: epoch.__setitem__(0, trainer.epoch))
