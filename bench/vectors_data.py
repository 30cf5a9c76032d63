#!/usr/bin/env python3
"""Dataset of issue #11 item 7: real SSCD frame descriptors plus generated distractors, 512-d.

    python3 bench/vectors_data.py [--sizes 100k,1M] [--seed 11]
        [--fps 15] [--out target/vectors-bench] [--model PATH]

Needs ffmpeg, numpy, pillow and onnxruntime (the venv of the team sheet has them). Deterministic
for a seed (ffmpeg's decoder and x264 included: one thread, fixed settings). Writes, into --out
(under target/, never committed):

  real.f32             R x 512  descriptors of the real reference frames (see below), f32 LE
  real.json            per real row: source file, frame number, kind ("frame" or "picture")
  queries.f32          Q x 512  descriptors of mildly edited copies of real frames
  queries.json         per query: the real row it was made from ("original") and the edit
  base-N.f32           N x 512  the database at size N: the R real rows and N - R distractors,
                       shuffled (seeded); rows of the 100k set are not a prefix of the 1M set
  base-N.kind.u8       N        0 real, 1 gaussian, 2 blend, 3 perturbed, 4 random (see below)
  base-N.real.i32      N        the real row of a real database row, -1 for distractors
  truth-N.i32 / .f32   Q x 100  exact top-100 database rows per query by f32 inner product
                       (numpy, f64 accumulate not needed: ties are re-sorted by row id)
  meta.json            counts, seed, model sha256, the mix of distractors

Real frames: every video of ../shared/conformance/vpdq (8 clips, ~95 s) at --fps frames per
second (ffmpeg fps filter, PNG), and every picture of ../shared/conformance/pdq that decodes
(EXIF orientation ignored, alpha dropped, palette converted to RGB). Each frame is resized to
320x320 (bilinear, aspect not kept, as the server feeds `sscd_distilled.onnx`) and embedded with
ONNX Runtime (CPU, 1 thread); the descriptor comes out L2-normalised.

Queries: for every third video frame (5 fps at the default 15) and every picture, three edits:
  crop      a random crop keeping 75-90 % of width and height, anywhere in the frame;
  reencode  video frames: the same frame of the clip re-encoded by ffmpeg/x264 at half size,
            CRF 38 (a low-bitrate re-upload); pictures: half size, JPEG quality 20;
  crop+jpeg a centred 90 % crop, brightness x1.15, JPEG quality 35.
Each must find its original (reported by the benches as "original in top 10").

Distractors (to reach N), a mix chosen so that they are not trivially separable from the real
rows (isotropic random vectors alone are ~orthogonal to everything in 512-d and never compete):
  40 % gaussian   samples of a Gaussian fitted to the real descriptors (their mean and full
                  covariance, +1e-4 isotropic), re-normalised: the same region and spread as
                  real descriptors, no copy of any;
  25 % blend      normalise(a r1 + (1 - a) r2 + noise), r1, r2 two random real rows,
                  a ~ U(0.2, 0.8), noise N(0, 0.3^2 / d) per value: points between real scenes;
  25 % perturbed  normalise(r + s g / sqrt(d)), r a random real row, g ~ N(0, 1)^d,
                  s ~ U(0.4, 2.0) (cosine to r about 0.45 to 0.93): competitors near real rows;
  10 % random     uniform unit vectors.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFORMANCE = os.path.join(os.path.dirname(ROOT), "shared", "conformance")
# `eval "$(.ci/fetch-models)"` names sscd.onnx; the distilled model lies beside it.
DEFAULT_MODEL = os.path.join(
    os.path.dirname(os.environ.get("FRAMEMATCH_EMBEDDING_MODEL", "")), "sscd_distilled.onnx"
)
DIM = 512
SIDE = 320
TRUTH_K = 100
MIX = [("gaussian", 1, 0.40), ("blend", 2, 0.25), ("perturbed", 3, 0.25), ("random", 4, 0.10)]


def parse_size(text):
    text = text.strip().lower()
    if text.endswith("k"):
        return int(text[:-1]) * 1000
    if text.endswith("m"):
        return int(text[:-1]) * 1_000_000
    return int(text)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(video, fps, directory, reencode=False):
    """PNG frames of the video at `fps` (optionally of its low-bitrate re-encode), sorted."""
    os.makedirs(directory, exist_ok=True)
    source = video
    if reencode:
        source = os.path.join(directory, "reencoded.mp4")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", "-i", video,
                        "-vf", "scale=trunc(iw/4)*2:trunc(ih/4)*2", "-c:v", "libx264",
                        "-preset", "veryfast", "-crf", "38", "-threads", "1", "-an", source],
                       check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", "-i", source,
                    "-vf", f"fps={fps}", os.path.join(directory, "%05d.png")], check=True)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".png"))


def rgb(path):
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image.convert("RGB")


def jpeg(image, quality):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def crop(image, rng):
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.75, 0.90)), int(h * rng.uniform(0.75, 0.90))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch))


def crop_jpeg(image):
    from PIL import ImageEnhance

    w, h = image.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    edited = ImageEnhance.Brightness(image.crop((dx, dy, w - dx, h - dy))).enhance(1.15)
    return jpeg(edited, 35)


class Embedder:
    def __init__(self, model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.pending = []
        self.out = []

    def add(self, image):
        from PIL import Image

        self.pending.append(np.asarray(image.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.uint8))
        if len(self.pending) == 32:
            self.flush()

    def flush(self):
        if self.pending:
            batch = np.stack(self.pending)
            self.out.append(self.session.run(["embedding"], {"image": batch})[0].astype(np.float32))
            self.pending = []

    def result(self):
        self.flush()
        vectors = np.concatenate(self.out) if self.out else np.zeros((0, DIM), np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def normalise(x):
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def distractors(real, count, rng):
    """`count` distractors in the mix of MIX (exact counts per kind), in a seeded order."""
    counts = [int(round(share * count)) for _, _, share in MIX]
    counts[0] += count - sum(counts)
    mean = real.mean(axis=0)
    cov = np.cov(real, rowvar=False) + 1e-4 * np.eye(DIM)
    chol = np.linalg.cholesky(cov)
    parts, kinds = [], []
    chunk = 100_000
    for (name, kind, _), n in zip(MIX, counts):
        done = 0
        while done < n:
            m = min(chunk, n - done)
            if name == "gaussian":
                x = mean + rng.standard_normal((m, DIM)) @ chol.T
            elif name == "blend":
                a = rng.uniform(0.2, 0.8, (m, 1))
                r1 = real[rng.integers(0, len(real), m)]
                r2 = real[rng.integers(0, len(real), m)]
                x = a * r1 + (1 - a) * r2 + rng.standard_normal((m, DIM)) * (0.3 / np.sqrt(DIM))
            elif name == "perturbed":
                s = rng.uniform(0.4, 2.0, (m, 1))
                x = real[rng.integers(0, len(real), m)] + s * rng.standard_normal((m, DIM)) / np.sqrt(DIM)
            else:
                x = rng.standard_normal((m, DIM))
            parts.append(normalise(x))
            kinds.append(np.full(m, kind, np.uint8))
            done += m
    vectors = np.concatenate(parts)
    kinds = np.concatenate(kinds)
    order = rng.permutation(count)
    return vectors[order], kinds[order]


def truth(base, queries, k=TRUTH_K):
    """Exact top-k rows by inner product (ties by row id), in f32 with BLAS, chunked."""
    q = len(queries)
    ids = np.zeros((q, k), np.int32)
    scores = np.zeros((q, k), np.float32)
    best_s = np.full((q, k), -np.inf, np.float32)
    best_i = np.zeros((q, k), np.int64)
    step = 200_000
    for start in range(0, len(base), step):
        s = queries @ base[start:start + step].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    ids[:] = best_i
    scores[:] = best_s
    return ids, scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100k,1M")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(ROOT, "target", "vectors-bench"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    real_path = os.path.join(args.out, "real.f32")
    query_path = os.path.join(args.out, "queries.f32")
    if os.path.exists(real_path) and os.path.exists(query_path):
        print(f"reusing {real_path} and {query_path}", file=sys.stderr)
        real = np.fromfile(real_path, np.float32).reshape(-1, DIM)
        queries = np.fromfile(query_path, np.float32).reshape(-1, DIM)
        with open(os.path.join(args.out, "real.json")) as f:
            real_rows = json.load(f)
        with open(os.path.join(args.out, "queries.json")) as f:
            query_rows = json.load(f)
    else:
        db, qe = Embedder(args.model), Embedder(args.model)
        real_rows, query_rows = [], []
        with tempfile.TemporaryDirectory() as tmp:
            videos = sorted(f for f in os.listdir(os.path.join(CONFORMANCE, "vpdq")) if f.endswith(".mp4"))
            for v, name in enumerate(videos):
                path = os.path.join(CONFORMANCE, "vpdq", name)
                frames = extract(path, args.fps, os.path.join(tmp, f"v{v}"))
                again = extract(path, args.fps, os.path.join(tmp, f"r{v}"), reencode=True)
                print(f"{name}: {len(frames)} frames ({len(again)} re-encoded)", file=sys.stderr, flush=True)
                for i, frame in enumerate(frames):
                    image = rgb(frame)
                    row = len(real_rows)
                    real_rows.append({"source": f"vpdq/{name}", "frame": i, "kind": "frame"})
                    db.add(image)
                    if i % 3 == 0:
                        qe.add(crop(image, rng))
                        query_rows.append({"original": row, "edit": "crop"})
                        if i < len(again):
                            qe.add(rgb(again[i]))
                            query_rows.append({"original": row, "edit": "reencode"})
                        qe.add(crop_jpeg(image))
                        query_rows.append({"original": row, "edit": "crop+jpeg"})
            pictures = sorted(f for f in os.listdir(os.path.join(CONFORMANCE, "pdq"))
                              if f.lower().endswith((".jpg", ".png", ".webp")))
            for name in pictures:
                try:
                    image = rgb(os.path.join(CONFORMANCE, "pdq", name))
                except Exception as error:  # noqa: BLE001 - a picture PIL cannot read is skipped
                    print(f"skipping {name}: {error}", file=sys.stderr)
                    continue
                if min(image.size) < 32:
                    continue
                row = len(real_rows)
                real_rows.append({"source": f"pdq/{name}", "frame": 0, "kind": "picture"})
                db.add(image)
                qe.add(crop(image, rng))
                query_rows.append({"original": row, "edit": "crop"})
                w, h = image.size
                qe.add(jpeg(image.resize((max(1, w // 2), max(1, h // 2))), 20))
                query_rows.append({"original": row, "edit": "reencode"})
                qe.add(crop_jpeg(image))
                query_rows.append({"original": row, "edit": "crop+jpeg"})
        real, queries = db.result(), qe.result()
        real.astype("<f4").tofile(real_path)
        queries.astype("<f4").tofile(query_path)
        with open(os.path.join(args.out, "real.json"), "w") as f:
            json.dump(real_rows, f)
        with open(os.path.join(args.out, "queries.json"), "w") as f:
            json.dump(query_rows, f)
    print(f"{len(real)} real descriptors, {len(queries)} queries", file=sys.stderr, flush=True)
    own = np.einsum("ij,ij->i", queries, real[[r["original"] for r in query_rows]])
    print(f"cosine query-original: median {np.median(own):.3f}, min {own.min():.3f}", file=sys.stderr)

    meta = {"dimension": DIM, "seed": args.seed, "fps": args.fps, "real": len(real),
            "queries": len(queries), "truth_k": TRUTH_K, "model": os.path.basename(args.model),
            "model_sha256": sha256(args.model), "mix": {n: s for n, _, s in MIX},
            "kinds": {"real": 0, **{n: k for n, k, _ in MIX}}, "sizes": {}}
    for n in sizes:
        # One generator per size, so each size is reproducible on its own.
        size_rng = np.random.default_rng([args.seed, n])
        extra, extra_kinds = distractors(real, n - len(real), size_rng)
        base = np.concatenate([real, extra])
        kinds = np.concatenate([np.zeros(len(real), np.uint8), extra_kinds])
        real_of = np.concatenate([np.arange(len(real), dtype=np.int32), np.full(len(extra), -1, np.int32)])
        del extra
        order = size_rng.permutation(n)
        base, kinds, real_of = base[order], kinds[order], real_of[order]
        base.astype("<f4").tofile(os.path.join(args.out, f"base-{n}.f32"))
        kinds.tofile(os.path.join(args.out, f"base-{n}.kind.u8"))
        real_of.astype("<i4").tofile(os.path.join(args.out, f"base-{n}.real.i32"))
        ids, scores = truth(base, queries)
        ids.astype("<i4").tofile(os.path.join(args.out, f"truth-{n}.i32"))
        scores.astype("<f4").tofile(os.path.join(args.out, f"truth-{n}.f32"))
        position = np.empty(n, np.int64)
        position[order] = np.arange(n)
        originals = position[[r["original"] for r in query_rows]]
        top10 = np.mean([o in row[:10] for o, row in zip(originals, ids)])
        kinds10 = np.bincount(kinds[ids[:, :10].ravel()], minlength=5) / ids[:, :10].size
        gap = float(np.median(scores[:, 9] - scores[:, 10]))
        meta["sizes"][str(n)] = {"original_in_exact_top10": float(top10),
                                 "top10_kind_shares": kinds10.round(4).tolist(),
                                 "median_score_10th": float(np.median(scores[:, 9])),
                                 "median_gap_10th_11th": gap}
        print(f"N={n}: original in exact top 10 for {top10:.3f} of queries; top-10 kinds "
              f"{kinds10.round(3).tolist()}; median 10th score {np.median(scores[:, 9]):.3f}, "
              f"gap to 11th {gap:.5f}", file=sys.stderr, flush=True)
        del base
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
