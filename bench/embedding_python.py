#!/usr/bin/env python3
"""Embedding cost per frame with ONNX Runtime from Python, for comparison with bench/embedding.rs.

The same frames (the list bench/embedding.rs writes to target/embedding-bench/frames.txt), the
same stages and the same report: PIL decode (Image.open + convert("RGB")), PIL BILINEAR resize to
320x320 (what the SSCD pipeline and bench/embed_fixture.py use), and the model on one frame,
uint8 NHWC [1, 320, 320, 3], in a session with one intra-op and one inter-op thread. One untimed
warm-up run, then RUNS timed runs of every frame; the medians are over all frames and runs, the
total is the median of the per-run sums.

Run (from the repository root, after `eval "$(.ci/fetch-models)"` and `cargo bench --bench
embedding`, which extracts the video frames):
    python3 bench/embedding_python.py \
        --frames target/embedding-bench/frames.txt \
        --models-dir "$(dirname "$FRAMEMATCH_EMBEDDING_MODEL")" --runs 10
Needs numpy, pillow and onnxruntime.
"""

import argparse
import io
import os
import pathlib
import statistics
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

SIZE = (320, 320)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_model(sess, blobs, runs):
    name = sess.get_inputs()[0].name
    times = {"decode": [], "resize": [], "model": [], "total": []}
    for run in range(runs + 1):
        for data in blobs:
            t0 = time.perf_counter()
            img = Image.open(io.BytesIO(data))
            img = img.convert("RGB")
            t1 = time.perf_counter()
            small = img.resize(SIZE, Image.BILINEAR)
            pixels = np.asarray(small, dtype=np.uint8)[None, ...]
            t2 = time.perf_counter()
            out = sess.run(None, {name: pixels})[0][0]
            out = out / np.linalg.norm(out)
            t3 = time.perf_counter()
            if run > 0:
                for key, value in (
                    ("decode", t1 - t0),
                    ("resize", t2 - t1),
                    ("model", t3 - t2),
                    ("total", t3 - t0),
                ):
                    times[key].append(value * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="target/embedding-bench/frames.txt")
    parser.add_argument(
        "--models-dir",
        default=os.path.dirname(os.environ.get("FRAMEMATCH_EMBEDDING_MODEL", "")) or ".",
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--model", choices=["sscd", "sscd_distilled"], action="append")
    args = parser.parse_args()
    paths = [line.strip() for line in open(args.frames) if line.strip()]
    # Decoding starts from bytes in memory, as the server's does.
    blobs = [pathlib.Path(p).read_bytes() for p in paths]
    print(
        f"{len(paths)} frames, {args.runs} timed runs each after one warm-up, input "
        f"{SIZE[0]}x{SIZE[1]}, onnxruntime {ort.__version__}, 1 intra-op thread\n"
    )
    print("| model | decode ms | resize ms | model ms | total ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.model or ["sscd", "sscd_distilled"]:
        sess = session(pathlib.Path(args.models_dir) / f"{name}.onnx")

        times = time_model(sess, blobs, args.runs)
        row = " | ".join(
            f"{statistics.median(times[k]):.2f}" for k in ("decode", "resize", "model", "total")
        )
        print(f"| {name} | {row} |")


if __name__ == "__main__":
    main()
