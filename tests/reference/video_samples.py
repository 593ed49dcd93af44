"""Writes the small video datasets `tests/video.rs` imports: a DAVIS / SAM 2 video-predictor layout
and an SA-V sample, with every source mask also written out plainly (`expected.json`: per frame
file, per object id, the mask's rows as strings of 0/1) for the Rust test to compare the imported
COCO masks with.

    python tests/reference/video_samples.py      # needs numpy, Pillow and pycocotools

- davis/: JPEGImages/480p/<video>/00000.jpg ... and Annotations/480p/<video>/00000.png (palette
  PNGs, the pixel value is the object id; the 480p/ level as DAVIS has it), classes.yaml naming the
  objects per video. Video `dogs` has objects 1 and 2 (2 leaves in the last frame), `bear` object 1;
  `bear` has one frame without a mask PNG (not annotated: not an image).
- sav/: sav_000001_manual.json as SA-V writes it (numbers as floats, `masklet` = per annotated
  frame a list of COCO compressed RLEs, an absent object an empty RLE) and the frames as SAM 2's
  extraction script writes them (JPEGImages_24fps/sav_000001/00000.jpg, 00004.jpg, 00008.jpg).
"""

import json
import os
import shutil

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "video")
W, H = 24, 16
rng = np.random.default_rng(7)


def frame_image(seed):
    pixels = np.random.default_rng(seed).integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def blob(x0, y0, x1, y1):
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    # An irregular edge, so the masks are not just boxes.
    m[y0, x0] = 0
    return m


def rows(mask):
    return ["".join(str(int(v)) for v in row) for row in mask]


def write_davis(expected):
    root = os.path.join(ROOT, "davis")
    videos = {
        "dogs": [
            {1: blob(2, 2, 9, 8), 2: blob(12, 5, 20, 14)},
            {1: blob(3, 2, 10, 9), 2: blob(13, 6, 21, 15)},
            {1: blob(4, 3, 11, 10)},
        ],
        "bear": [
            {1: blob(5, 4, 18, 12)},
            None,  # a frame without annotation
            {1: blob(6, 4, 19, 13)},
        ],
    }
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for video, frames in videos.items():
        os.makedirs(os.path.join(root, "JPEGImages", "480p", video))
        os.makedirs(os.path.join(root, "Annotations", "480p", video))
        for index, objects in enumerate(frames):
            name = f"{index:05d}"
            frame_image(sum(map(ord, video)) * 10 + index).save(
                os.path.join(root, "JPEGImages", "480p", video, name + ".jpg"), quality=95
            )
            if objects is None:
                continue
            ids = np.zeros((H, W), dtype=np.uint8)
            for object_id, mask in objects.items():
                ids[mask == 1] = object_id
            png = Image.fromarray(ids, mode="P")
            png.putpalette(palette)
            png.save(os.path.join(root, "Annotations", "480p", video, name + ".png"))
            expected[f"{video}/{name}.jpg"] = {
                str(object_id): rows((ids == object_id).astype(np.uint8)) for object_id in objects
            }
    with open(os.path.join(root, "classes.yaml"), "w") as f:
        f.write("dogs: {1: dog, 2: dog}\nbear: {1: bear}\n")


def write_sav(expected):
    root = os.path.join(ROOT, "sav")
    video = "sav_000001"
    frames_dir = os.path.join(root, "JPEGImages_24fps", video)
    os.makedirs(frames_dir)
    annotated = [
        [blob(1, 1, 8, 7), np.zeros((H, W), dtype=np.uint8)],  # object 1 not yet in view
        [blob(2, 1, 9, 8), blob(14, 8, 22, 15)],
        [blob(3, 2, 10, 9), blob(13, 7, 21, 14)],
    ]
    masklet = []
    for k, objects in enumerate(annotated):
        frame = f"{4 * k:05d}"
        frame_image(100 + k).save(os.path.join(frames_dir, frame + ".jpg"), quality=95)
        encoded = []
        for mask in objects:
            rle = mask_util.encode(np.asfortranarray(mask))
            encoded.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
        masklet.append(encoded)
        expected[f"{video}/{frame}.jpg"] = {
            str(track): rows(mask) for track, mask in enumerate(objects) if mask.any()
        }
    annotation = {
        "video_id": video,
        "video_duration": 0.5,
        "video_frame_count": 12.0,
        "video_height": float(H),
        "video_width": float(W),
        "video_resolution": float(H * W),
        "video_environment": "Indoor",
        "video_split": "train",
        "masklet": masklet,
        "masklet_id": [0, 1],
        "masklet_size_rel": [0.1, 0.1],
        "masklet_size_abs": [40.0, 50.0],
        "masklet_size_bucket": ["small", "small"],
        "masklet_visibility_changes": [0, 1],
        "masklet_first_appeared_frame": [0.0, 1.0],
        "masklet_frame_count": [3, 3],
        "masklet_edited_frame_count": [0, 0],
        "masklet_type": ["manual", "manual"],
        "masklet_stability_score": [None, None],
        "masklet_num": 2,
    }
    with open(os.path.join(root, f"{video}_manual.json"), "w") as f:
        json.dump(annotation, f)


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    davis, sav = {}, {}
    write_davis(davis)
    write_sav(sav)
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump({"davis": davis, "sav": sav}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
