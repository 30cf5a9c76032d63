"""SSCD descriptors of every video in the manifest, one sampled frame per second.

Each sampled frame gives up to three descriptors, as the server would compute them:
- `whole`: the whole frame;
- `content`: the content area inside uniform bars, found by the same rule as src/hash/border.rs
  (ported below: the same constants, the same growth from each edge);
- `band`: for a portrait frame only, its centred 16:9 band (a candidate for the vertical-video
  layouts, whatever the bars are made of: black or a blurred copy).
Every crop is squashed to 320x320 RGB uint8 (NHWC) for the model, whose graph normalises it.

Usage: embed.py OUT_DIR MODEL.onnx TAG   (reads OUT_DIR/manifest.tsv, writes OUT_DIR/emb-TAG.npz)
"""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

SIDE = 320
# src/hash/border.rs
TOLERANCE = 20
MIN_UNIFORM_SHARE = 0.98
MIN_BORDER_SHARE = 0.02
MIN_CONTENT_SHARE = 0.3
MAX_CONTENT_ASPECT = 3.0


def luma(rgb):
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((299 * r + 587 * g + 114 * b) // 1000).astype(np.int16)


def thickness(lines):
    """lines: [n, len] luma, edge first. Border rows grow inward while nearly uniform."""
    n, length = lines.shape
    colour = np.sort(lines[0])[length // 2]
    allowed = length - math.ceil(length * MIN_UNIFORM_SHARE)
    off = (np.abs(lines - colour) > TOLERANCE).sum(axis=1)
    bad = np.nonzero(off > allowed)[0]
    return int(bad[0]) if len(bad) else n


def content_area(rgb):
    """(x, y, w, h) inside uniform bars, or None (src/hash/border.rs `content_area`)."""
    y_ = luma(rgb)
    h, w = y_.shape
    top = thickness(y_)
    if top == h:
        return None
    bottom = thickness(y_[::-1])
    left = thickness(y_.T)
    right = thickness(y_.T[::-1])

    def keep(border, dim):
        return 0 if border < dim * MIN_BORDER_SHARE else border

    top, bottom, left, right = keep(top, h), keep(bottom, h), keep(left, w), keep(right, w)
    if top + bottom + left + right == 0:
        return None
    cw, ch = w - left - right, h - top - bottom
    if cw <= 0 or ch <= 0:
        return None
    if cw < w * MIN_CONTENT_SHARE or ch < h * MIN_CONTENT_SHARE:
        return None
    if max(cw, ch) > min(cw, ch) * MAX_CONTENT_ASPECT:
        return None
    return left, top, cw, ch


def frames(path):
    """One frame per second (ffmpeg's fps filter: the frames nearest t = 0, 1, 2 ... s)."""
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height", "-of", "csv=p=0", str(path)],
        check=True, capture_output=True, text=True).stdout.split()[0]
    w, h = map(int, probe.split(",")[:2])
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-vf", "fps=1", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def squash(rgb):
    return np.asarray(Image.fromarray(rgb).resize((SIDE, SIDE), Image.BILINEAR), dtype=np.uint8)


def main():
    out, model, tag = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rows = [line.rstrip("\n").split("\t") for line in open(out / "manifest.tsv")][1:]
    result = {}
    n_inputs = 0
    t0 = time.time()
    for video, side, source, transform, rel in rows:
        fr = frames(out / rel)
        crops, kinds, index = [], [], []
        for i, f in enumerate(fr):
            crops.append(squash(f))
            kinds.append(0)
            index.append(i)
            area = content_area(f)
            if area is not None:
                x, y, w, h = area
                crops.append(squash(np.ascontiguousarray(f[y:y + h, x:x + w])))
                kinds.append(1)
                index.append(i)
            fh, fw = f.shape[:2]
            if fh > fw:
                bh = fw * 9 // 16
                y = (fh - bh) // 2
                crops.append(squash(np.ascontiguousarray(f[y:y + bh])))
                kinds.append(2)
                index.append(i)
        emb = np.concatenate([sess.run(["embedding"], {"image": np.stack(crops[k:k + 16])})[0]
                              for k in range(0, len(crops), 16)])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        key = f"{video}|{transform}"
        result[key + "|emb"] = emb.astype(np.float32)
        result[key + "|kind"] = np.array(kinds, np.int8)
        result[key + "|frame"] = np.array(index, np.int16)
        n_inputs += len(crops)
    dt = time.time() - t0
    np.savez(out / f"emb-{tag}.npz", **result)
    print(f"{tag}: {len(rows)} videos, {n_inputs} model inputs in {dt:.0f} s "
          f"({1000 * dt / max(n_inputs, 1):.1f} ms per input, decode included)")


if __name__ == "__main__":
    main()
