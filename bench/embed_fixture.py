#!/usr/bin/env python3
"""Expected embedding vectors for tests/it/embed_model.rs, computed with ONNX Runtime from Python.

For each model (sscd, sscd_distilled) this writes the L2-normalised output of:
  * three conformance photos, decoded by PIL, converted to RGB (alpha dropped), resized to
    320x320 with PIL's BILINEAR (antialiased when shrinking: the filter framematch's
    `embed::resize` imitates with image's Triangle), fed as uint8 NHWC [1, 320, 320, 3]
    (key: the file name);
  * the centre 320x320 crop of each, not resized (key: `NAME#centre`), so both runtimes see the
    same real pixels;
  * a synthetic 320x320 pattern whose pixels are integer formulas (see `pattern`), which the Rust
    test builds identically: it compares the runtimes alone, with no decoder or resizer between.

Run (from the repository root, after `eval "$(.ci/fetch-models)"`):
    python3 bench/embed_fixture.py \
        --models-dir "$(dirname "$FRAMEMATCH_EMBEDDING_MODEL")" \
        --conformance ../shared/conformance/pdq > tests/fixtures/embed_expected.json
Needs numpy, pillow and onnxruntime (1.32.0 made the committed file).
"""

import argparse
import json
import pathlib

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGES = ["bridge-1-original.jpg", "pen-and-coaster.png", "RGB.jpg"]
SIZE = (320, 320)


def pattern(width, height):
    """r = 255x/(w-1), g = 255y/(h-1), b = a 40-pixel checkerboard of 20 and 220 (integer maths)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            img[y, x, 0] = x * 255 // (width - 1)
            img[y, x, 1] = y * 255 // (height - 1)
            img[y, x, 2] = 220 if (x // 40 + y // 40) % 2 else 20
    return img


def embed(session, pixels):
    out = session.run(["embedding"], {"image": pixels[np.newaxis, ...]})[0][0].astype(np.float64)
    return (out / np.linalg.norm(out)).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", required=True, type=pathlib.Path)
    ap.add_argument("--conformance", required=True, type=pathlib.Path)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    result = {
        "onnxruntime": ort.__version__,
        "input": f"{SIZE[0]}x{SIZE[1]}",
        "resize": "PIL BILINEAR",
        "models": {},
    }
    for model in ["sscd", "sscd_distilled"]:
        session = ort.InferenceSession(str(args.models_dir / f"{model}.onnx"), opts)
        vectors = {"pattern": embed(session, pattern(*SIZE))}
        for name in IMAGES:
            with Image.open(args.conformance / name) as im:
                rgb = im.convert("RGB")
            pixels = np.asarray(rgb.resize(SIZE, Image.BILINEAR), dtype=np.uint8)
            vectors[name] = embed(session, pixels)
            # The centre SIZE crop, not resized: the same pixels reach both runtimes (up to the
            # JPEG decoders' rounding), so this compares the runtimes on real content.
            left, top = (rgb.width - SIZE[0]) // 2, (rgb.height - SIZE[1]) // 2
            crop = rgb.crop((left, top, left + SIZE[0], top + SIZE[1]))
            vectors[f"{name}#centre"] = embed(session, np.asarray(crop, dtype=np.uint8))
        result["models"][model] = {
            k: [round(v, 7) for v in vec] for k, vec in vectors.items()
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
