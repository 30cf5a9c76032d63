#!/usr/bin/env python3
"""Pictures for the decode-budget measurement (bench/memory/run.sh, issue #13 item 1).

    make_images.py OUT_DIR [MAX_PIXELS MAX_DECODE_BYTES]

Writes into OUT_DIR:
  frames/frame-NN.jpg   eight 1920x1080 JPEG frames (quality 85), the 64 streams' load;
  bombs/*               decode bombs just under every limit of the server (defaults: 50,000,000
                        pixels, 268,435,456 bytes decoded), each a few hundred KB to a few MB:
    rgba16-under.png    16-bit RGBA, as many pixels as fit under the decode limit (5792x5792);
    rgb8-under.png      8-bit RGB just under the pixel limit (7071x7071, 150 MB decoded);
    grey8-under.png     8-bit grey just under the pixel limit (the most working set per decoded
                        byte: the server converts it to RGB for the content-area search);
    grey16-under.png    16-bit grey just under the pixel limit;
    progressive.jpg     a progressive JPEG just under the pixel limit (its decoder keeps every
                        coefficient: the most decoder scratch);
    lossy.webp          a WebP just under the pixel limit;
  refused/rgba16-7071.png  the issue's 7071x7071 16-bit RGBA PNG (400 MB decoded): over the
                        decode limit, refused from its header.
Pure stdlib PNG writing (Pillow cannot write 16-bit colour); Pillow for JPEG and WebP.
"""

import math
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image


def png(path, width, height, depth, color, row):
    """A PNG of `height` copies of `row` (bytes of one scanline without its filter byte)."""
    channels = {0: 1, 2: 3, 6: 4}[color]
    assert len(row) == width * channels * depth // 8
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    line = b"\x00" + row
    parts = []
    # Compress in slabs so that memory stays small.
    slab = max(1, (8 << 20) // len(line))
    done = 0
    while done < height:
        n = min(slab, height - done)
        parts.append(comp.compress(line * n))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def texture_row(width, channels, depth):
    x = np.arange(width)
    vals = []
    for c in range(channels):
        v = ((x * (7 + 5 * c)) ^ (x // 3)) % 256
        vals.append(v)
    a = np.stack(vals, axis=1).astype(np.uint16 if depth == 16 else np.uint8)
    if depth == 16:
        a = (a.astype(np.uint16) * 257).astype(">u2")
    return a.tobytes()


def textured(width, height, mode):
    """A picture with texture everywhere (JPEG and WebP must not compress it to nothing, and PDQ
    must give it quality)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    r = ((x * 7) ^ (y * 13)) & 255
    g = ((x + y) * 3) & 255
    b = ((x * y) >> 4) & 255
    rgb = np.stack([r, g, b], axis=2).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    return im.convert(mode)


def main():
    out = sys.argv[1]
    max_pixels = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000_000
    max_decode = int(sys.argv[3]) if len(sys.argv) > 3 else 256 * 1024 * 1024
    for d in ("frames", "bombs", "refused"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for i in range(8):
        path = os.path.join(out, "frames", f"frame-{i:02}.jpg")
        if not os.path.exists(path):
            im = textured(1920 + 0, 1080, "RGB").rotate(i * 45, expand=False)
            im.save(path, quality=85)
    side = math.isqrt(max_pixels)
    while side * side > max_pixels - 1:  # strictly under
        side -= 1
    side16 = math.isqrt(max_decode // 8)
    bombs = os.path.join(out, "bombs")
    jobs = [
        ("rgba16-under.png", lambda p: png(p, side16, side16, 16, 6, texture_row(side16, 4, 16))),
        ("rgb8-under.png", lambda p: png(p, side, side, 8, 2, texture_row(side, 3, 8))),
        ("grey8-under.png", lambda p: png(p, side, side, 8, 0, texture_row(side, 1, 8))),
        ("grey16-under.png", lambda p: png(p, side, side, 16, 0, texture_row(side, 1, 16))),
        ("progressive.jpg", lambda p: textured(side, side, "RGB").save(p, quality=70, progressive=True)),
        ("lossy.webp", lambda p: textured(side // 8, side // 8, "RGB").resize((side, side), Image.BILINEAR).save(p, quality=60, method=0)),
    ]
    for name, make in jobs:
        path = os.path.join(bombs, name)
        if not os.path.exists(path):
            make(path)
    refused = os.path.join(out, "refused", "rgba16-7071.png")
    if not os.path.exists(refused):
        png(refused, 7071, 7071, 16, 6, texture_row(7071, 4, 16))
    for d in ("frames", "bombs", "refused"):
        for name in sorted(os.listdir(os.path.join(out, d))):
            p = os.path.join(out, d, name)
            print(f"{d}/{name}\t{os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
