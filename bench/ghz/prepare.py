#!/usr/bin/env python3
"""Writes the ghz payloads and the noise references for bench/ghz/run.sh.

ghz reads a JSON array as the messages of one client or bidi stream (one array = one call) and a
JSON object as the request of a unary call; bytes fields are base64 (protobuf's JSON mapping).
Field names are the proto's own (snake_case), which ghz's dynamic messages accept.

Inputs, made by run.sh with ffmpeg and the real `framematch hash`:
  --hashes FILE   vPDQ lines (frame,quality,pdq_hex,timestamp) of the query clip, every frame
  --frames DIR    the query clip's 720p JPEG frames (*.jpg, sorted by name)
Outputs in --out:
  match-video-hashes.json   MatchVideo: one stream of precomputed PDQ hashes
  match-video-jpeg.json     MatchVideo: one stream of 720p JPEG frames (the server hashes them)
  match-image.json          MatchImage: one 720p JPEG frame
  noise/noise-NNN.txt       random vPDQ references that fill the index (`framematch ref add`)
  payloads.json             frames per stream, for the report
Standard library only, so CI needs nothing installed for it.
"""

import argparse
import base64
import json
import random
import sys
from pathlib import Path


def read_vpdq(path: Path) -> list[tuple[int, int, bytes, float]]:
    """Parses `frame,quality,pdq_hex,timestamp` lines (the C++ vpdq-hash-video form)."""
    frames = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        index, quality, hex_hash, timestamp = line.split(",")[:4]
        digest = bytes.fromhex(hex_hash)
        if len(digest) != 32:
            raise SystemExit(f"{path}: not a 256-bit PDQ hash: {hex_hash}")
        frames.append((int(index), int(quality), digest, float(timestamp)))
    return frames


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hashes", type=Path, required=True)
    parser.add_argument("--frames", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jpeg-frames", type=int, default=10, help="JPEG frames per stream")
    parser.add_argument("--noise-refs", type=int, default=100)
    parser.add_argument("--noise-frames", type=int, default=1000, help="frames per noise reference")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    hashes = read_vpdq(args.hashes)
    if not hashes:
        raise SystemExit(f"{args.hashes}: no hashes")
    jpegs = sorted(args.frames.glob("*.jpg"))[: args.jpeg_frames]
    if not jpegs:
        raise SystemExit(f"{args.frames}: no *.jpg frames")

    # MatchVideo, precomputed hashes. expected_frame_count lets verdicts become FINAL early, as
    # an upload service that knows its frame count would send it.
    stream = []
    for position, (_, quality, digest, timestamp) in enumerate(hashes):
        message = {
            "frame": {
                "frame_index": position,
                "timestamp_ms": int(round(timestamp * 1000)),
                "pdq": {"hash": b64(digest), "quality": quality},
            }
        }
        if position == 0:
            message["options"] = {"expected_frame_count": len(hashes)}
        stream.append(message)
    (args.out / "match-video-hashes.json").write_text(json.dumps(stream))

    # MatchVideo, 720p JPEG frames at one per second (what a client that lets the server hash
    # sends: `framematch scan --send-images`).
    stream = []
    for position, path in enumerate(jpegs):
        message = {
            "frame": {
                "frame_index": position,
                "timestamp_ms": position * 1000,
                "image": b64(path.read_bytes()),
            }
        }
        if position == 0:
            message["options"] = {"expected_frame_count": len(jpegs)}
        stream.append(message)
    (args.out / "match-video-jpeg.json").write_text(json.dumps(stream))

    # MatchImage: the middle frame.
    middle = jpegs[len(jpegs) // 2]
    image = {"frame": {"frame_index": 0, "image": b64(middle.read_bytes())}}
    (args.out / "match-image.json").write_text(json.dumps(image))

    # Noise references: random hashes (quality 100, one per second) that make the index a
    # realistic size without matching anything (random 256-bit hashes sit ~128 bits apart).
    rng = random.Random(args.seed)
    noise = args.out / "noise"
    noise.mkdir(exist_ok=True)
    for old in noise.glob("noise-*.txt"):
        old.unlink()
    for ref in range(args.noise_refs):
        lines = [
            f"{frame},100,{rng.getrandbits(256):064x},{frame:.3f}"
            for frame in range(args.noise_frames)
        ]
        (noise / f"noise-{ref:03d}.txt").write_text("\n".join(lines) + "\n")

    sizes = {
        "match-video-hashes": len(hashes),
        "match-video-jpeg": len(jpegs),
        "match-image": 1,
        "jpeg_bytes_mean": sum(p.stat().st_size for p in jpegs) // len(jpegs),
        "noise_frames": args.noise_refs * args.noise_frames,
    }
    (args.out / "payloads.json").write_text(json.dumps(sizes, indent=2) + "\n")
    print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
