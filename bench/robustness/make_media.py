"""Builds the robustness footage: source clips (known and innocent) and their transformed copies.

Sources are real pictures and clips only: the shared conformance photos and clips, and the
sample photos that the scikit-image and matplotlib wheels ship (fetched by run.sh with pip, never
committed). Each still becomes two 6-second Ken Burns clips (a slow zoom and a slow pan over
different parts of it); the real clips are cut into 6-second segments. Sources are split by
picture, never by clip, so no innocent video shows a picture that a known video shows.

Usage: make_media.py OUT_DIR   (writes OUT_DIR/{src,tx}/*.mp4 and OUT_DIR/manifest.tsv)
"""

import concurrent.futures as futures
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

W, H, FPS, SECONDS = 640, 360, 25, 6
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
HERE = Path(__file__).resolve().parent
CONFORMANCE = HERE.parent.parent.parent / "shared" / "conformance"

# Photographic stills: (name, path relative to a source root). Synthetic or near-duplicate pictures
# are left out: the bridge's edited copies, motorcycle_right (a stereo twin of motorcycle_left),
# the flat test squares, skimage's colour wheel and logo (the logo is the watermark instead).
SKIMAGE = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]
CONF_STILLS = [
    "bridge-1-original.jpg", "exif-rotn-6.jpg", "c.png", "pen-and-coaster.png",
    "square-512x512.jpg", "q0122.jpg", "q0291.jpg", "q0746.jpg", "q2821.jpg",
]
# Pictures of one scene share a side of the split (small.jpg is left out: it is black).
SCENE = {"c": "pen-and-coaster", "square-512x512": "bridge-1-original"}
# Real clips: (name, file, start seconds). The chair segments are one source (one camera take).
CLIPS = [
    ("chair", "chair-orig-22-sd-bar.mp4", 0.0),
    ("chair", "chair-orig-22-sd-bar.mp4", 11.0),
    ("doorknob", "doorknob-hd-no-bar.mp4", 0.0),
]


def sh(args):
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def encode_cmd(out, extra_in=(), vf=None, fc=None, rate="-crf 20"):
    cmd = ["ffmpeg", "-v", "error", "-y", *extra_in]
    if vf:
        cmd += ["-vf", vf]
    if fc:
        cmd += ["-filter_complex", fc]
    cmd += ["-an", "-c:v", "libx264", "-preset", "veryfast", *rate.split(), "-pix_fmt", "yuv420p",
            "-r", str(FPS), str(out)]
    return cmd


def ken_burns(photo: Path, out: Path, motion: str, seed: int):
    """A 6 s clip of a 16:9 window moving over the photo (subpixel, so the motion is smooth)."""
    img = Image.open(photo)
    img = img.convert("RGB")
    iw, ih = img.size
    # Largest 16:9 window.
    if iw / ih > W / H:
        bw, bh = ih * W / H, ih
    else:
        bw, bh = iw, iw * H / W
    rng = random.Random(seed)
    n = FPS * SECONDS
    if motion == "zoom":  # from the whole window to 75 % of it, around a random point
        cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
        boxes = []
        for i in range(n):
            s = 1.0 - 0.25 * i / (n - 1)
            w, h = bw * s, bh * s
            x0 = (iw - w) * cx
            y0 = (ih - h) * cy
            boxes.append((x0, y0, x0 + w, y0 + h))
    else:  # a 70 % window panning across
        w, h = bw * 0.7, bh * 0.7
        y0 = (ih - h) * rng.uniform(0.3, 0.7)
        boxes = []
        for i in range(n):
            x0 = (iw - w) * (0.1 + 0.8 * i / (n - 1))
            boxes.append((x0, y0, x0 + w, y0 + h))
    proc = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}",
         "-r", str(FPS), "-i", "-", "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
         "-pix_fmt", "yuv420p", str(out)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    for box in boxes:
        frame = img.resize((W, H), Image.BILINEAR, box=box)
        proc.stdin.write(np.asarray(frame, dtype=np.uint8).tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed for {out}: {proc.stderr.read().decode()}")


def cut_clip(clip: Path, start: float, out: Path):
    """A 6 s segment, cropped to 16:9 from its centre and scaled to 640x360."""
    sh(encode_cmd(out, ["-ss", str(start), "-t", str(SECONDS), "-i", str(clip)],
                  vf=f"crop='min(iw,ih*16/9)':'min(ih,iw*9/16)',scale={W}:{H},setsar=1",
                  rate="-crf 18"))


def transforms(logo: Path):
    """name -> function(src, out, pip_background) building the ffmpeg command."""
    cap = (f"drawtext=fontfile={FONT}:text='WATCH TILL THE END':fontsize=34:fontcolor=black:"
           f"x=(w-text_w)/2:y=32")
    sub = (f"drawtext=fontfile={FONT}:text='you will not believe this':fontsize=26:"
           f"fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=8:x=(w-text_w)/2:y=h-60")
    t = {
        "crop10": lambda s, o, b: encode_cmd(o, ["-i", s], vf=f"crop=iw*0.9:ih*0.9:iw*0.07:ih*0.03,scale={W}:{H}"),
        "crop20": lambda s, o, b: encode_cmd(o, ["-i", s], vf=f"crop=iw*0.8:ih*0.8:iw*0.15:ih*0.05,scale={W}:{H}"),
        "caption": lambda s, o, b: encode_cmd(o, ["-i", s], vf=f"pad=iw:ih+100:0:100:white,{cap},{sub}"),
        "logo": lambda s, o, b: encode_cmd(
            o, ["-i", s, "-i", str(logo)],
            fc=(f"[1]scale=150:-1,format=rgba,colorchannelmixer=aa=0.7[l];[0][l]overlay=W-w-16:16,"
                f"drawtext=fontfile={FONT}:text='@reup_channel':fontsize=22:fontcolor=white@0.6:x=16:y=h-40")),
        "bars916": lambda s, o, b: encode_cmd(o, ["-i", s], vf="scale=360:202,pad=360:640:0:219:black,setsar=1"),
        "blur916": lambda s, o, b: encode_cmd(
            o, ["-i", s],
            fc=("[0]split[a][b];[a]scale=-2:640,crop=360:640,gblur=sigma=20[bg];[b]scale=360:202[fg];"
                "[bg][fg]overlay=0:219,setsar=1")),
        "pip": lambda s, o, b: encode_cmd(
            o, ["-i", s, "-stream_loop", "-1", "-i", b],
            fc=f"[0]scale=320:180[fg];[1][fg]overlay=W*0.45:H*0.4:shortest=1"),
        "mirror": lambda s, o, b: encode_cmd(o, ["-i", s], vf="hflip"),
        "rotate5": lambda s, o, b: encode_cmd(o, ["-i", s], vf="rotate=5*PI/180:fillcolor=black"),
        "speed0.8": lambda s, o, b: encode_cmd(o, ["-i", s], vf="setpts=0.8*PTS"),
        "speed1.25": lambda s, o, b: encode_cmd(o, ["-i", s], vf="setpts=1.25*PTS"),
        "lowrate": lambda s, o, b: encode_cmd(o, ["-i", s], vf="null",
                                               rate="-b:v 120k -maxrate 120k -bufsize 240k"),
    }
    return t


def main():
    out = Path(sys.argv[1])
    sources = Path(sys.argv[2])  # folder holding skimage/ and matplotlib/ unpacked
    (out / "src").mkdir(parents=True, exist_ok=True)
    (out / "tx").mkdir(parents=True, exist_ok=True)

    pictures = [(Path(p).stem, sources / "skimage" / "data" / p) for p in SKIMAGE]
    pictures.append(("grace_hopper", sources / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"))
    pictures += [(Path(p).stem, CONFORMANCE / "pdq" / p) for p in CONF_STILLS]
    scenes = sorted({SCENE.get(n, n) for n, _ in pictures} | {c[0] for c in CLIPS})
    rng = random.Random(11)
    rng.shuffle(scenes)
    by_scene = {n: ("known" if i % 2 == 0 else "innocent") for i, n in enumerate(scenes)}
    side = {n: by_scene[SCENE.get(n, n)] for n in {n for n, _ in pictures} | {c[0] for c in CLIPS}}

    jobs = []  # (video id, side, source picture, function)
    for i, (name, path) in enumerate(pictures):
        for motion in ("zoom", "pan"):
            vid = f"{name}-{motion}"
            jobs.append((vid, side[name], name,
                         lambda p=path, m=motion, v=vid, s=i: ken_burns(p, out / "src" / f"{v}.mp4", m, s)))
    for k, (name, clip, start) in enumerate(CLIPS):
        vid = f"{name}-{k}"
        jobs.append((vid, side[name], name,
                     lambda c=clip, s=start, v=vid: cut_clip(CONFORMANCE / "vpdq" / c, s, out / "src" / f"{v}.mp4")))

    workers = int(os.environ.get("JOBS", "2"))
    with futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(j[3]) for j in jobs if not (out / "src" / f"{j[0]}.mp4").exists()]:
            f.result()

    # Picture-in-picture backgrounds are innocent footage only, and never the video itself.
    innocent = sorted(j[0] for j in jobs if j[1] == "innocent")
    tx = transforms(sources / "skimage" / "data" / "logo.png")
    rows, cmds = [], []
    for n, (vid, sd, name, _) in enumerate(sorted(jobs, key=lambda j: j[0])):
        rows.append((vid, sd, name, "original", f"src/{vid}.mp4"))
        others = [v for v in innocent if not v.startswith(SCENE.get(name, name) + "-")
                  and not v.startswith(name + "-")]
        bg = str(out / "src" / f"{others[n % len(others)]}.mp4")
        for tname, make in tx.items():
            rel = f"tx/{vid}.{tname}.mp4"
            rows.append((vid, sd, name, tname, rel))
            if not (out / rel).exists():
                cmds.append(make(str(out / "src" / f"{vid}.mp4"), str(out / rel), bg))
    with futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(sh, c) for c in cmds]:
            f.result()
    with open(out / "manifest.tsv", "w") as f:
        f.write("video\tside\tsource\ttransform\tpath\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    known = sum(1 for j in jobs if j[1] == "known")
    print(f"{len(jobs)} source videos ({known} known, {len(jobs) - known} innocent), "
          f"{len(rows)} videos in all")


if __name__ == "__main__":
    main()
