"""`sfa data synth`: a synthetic video dataset whose labels live in the order of frames.

A white square (the target) moves in one direction, turns at a random moment between 35% and
65% of the clip, and moves in another direction: the 12 classes are the ordered pairs of distinct
directions ("right then up" ≠ "up then right"). Any single frame, and any short window that misses
the turn, is ambiguous; reversing or shuffling the frames changes the evidence. Distractor squares
move in straight lines (at 'hard', some are white too and some turn once with a different timing),
and pixel noise is added. Directions are the labels, so horizontal flipping is off for it.

It is written in the Kinetics layout (videos `<id>_000000_<end:06d>.mp4` + `train.csv` /
`validate.csv` with `label,youtube_id,time_start,time_end,split`) so that it goes through the same
`sfa data prep` path as the real datasets (`--dataset synthetic`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random

import av
import numpy as np

DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
CLASSES = [f"{a} then {b}" for a in DIRECTIONS for b in DIRECTIONS if a != b]

DIFFICULTY = {
    # distractors, white distractors, turning distractors, noise std, square side and speed (fractions)
    "easy": dict(distractors=0, white=0, turning=0, noise=4.0, size=0.16, speed=0.9),
    "medium": dict(distractors=2, white=0, turning=0, noise=10.0, size=0.14, speed=0.9),
    "hard": dict(distractors=4, white=2, turning=1, noise=20.0, size=0.12, speed=0.9),
}


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    num_train: int = 360
    num_val: int = 120
    num_frames: int = 32
    size: int = 64
    fps: int = 16
    difficulty: str = "medium"
    seed: int = 0

    def validate(self) -> None:
        if self.difficulty not in DIFFICULTY:
            raise ValueError(f"difficulty={self.difficulty!r} is not one of {list(DIFFICULTY)}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size={self.size} must be an even number >= 16")
        if self.num_frames < 4:
            raise ValueError(f"num_frames={self.num_frames} must be >= 4")
        if self.num_train < 1 or self.num_val < 0 or self.fps < 1:
            raise ValueError("num_train >= 1, num_val >= 0 and fps >= 1 are required")


def render(label: int, options: SynthOptions, rng: random.Random) -> np.ndarray:
    """One video of class `label`: uint8 (T, H, W, 3)."""
    return draw(scene(label, options, rng), options, rng)


@dataclasses.dataclass
class Scene:
    """What a video shows: each object's colour and top-left corner per frame, in draw order."""
    objects: list[tuple[tuple[int, int, int], list[tuple[float, float]]]]
    side: int      # square side in pixels
    target: int    # index in `objects` of the target square

    def target_cell(self, t: int, size: int, grid: int) -> int:
        """Row-major cell of a grid x grid partition of the frame holding the target's centre at frame t."""
        x, y = self.objects[self.target][1][t]
        col, row = (min(grid - 1, max(0, int((v + self.side / 2) * grid / size))) for v in (x, y))
        return row * grid + col


def scene(label: int, options: SynthOptions, rng: random.Random) -> Scene:
    """The objects and paths of one video of class `label` (draws from `rng`)."""
    p = DIFFICULTY[options.difficulty]
    T, S = options.num_frames, options.size
    first, second = CLASSES[label].split(" then ")
    side = max(3, round(p["size"] * S))

    def path(d1: str, d2: str | None, turn: int) -> list[tuple[float, float]]:
        # Speed such that the whole path fits in the frame from some start point.
        speed = p["speed"] * (S - side) / (0.65 * T)   # the longer leg (<= 65% of T) fits in the frame
        v1 = np.array(DIRECTIONS[d1], float) * speed
        v2 = np.array(DIRECTIONS[d2] if d2 else DIRECTIONS[d1], float) * speed
        steps = [v1 if t < turn else v2 for t in range(T)]
        offsets = np.cumsum([np.zeros(2)] + steps[:-1], axis=0)
        lo, hi = offsets.min(0), offsets.max(0)
        start = np.array([rng.uniform(-lo[k], S - side - hi[k]) for k in range(2)])
        return [tuple(start + o) for o in offsets]

    turn = rng.randint(round(0.35 * T), round(0.65 * T))
    target = ((255, 255, 255), path(first, second, turn))
    objects = [target]
    for i in range(p["distractors"]):
        white = i < p["white"]
        color = (255, 255, 255) if white else tuple(rng.randint(60, 200) for _ in range(3))
        d1 = rng.choice(list(DIRECTIONS))
        d2 = rng.choice([d for d in DIRECTIONS if d != d1]) if i < p["turning"] else None
        # A turning distractor turns early or late, never in the target's window.
        dturn = rng.choice([rng.randint(1, round(0.25 * T)), rng.randint(round(0.75 * T), T - 1)])
        objects.append((color, path(d1, d2, dturn)))
    rng.shuffle(objects)   # draw order carries no information
    return Scene(objects, side, next(i for i, o in enumerate(objects) if o is target))


def draw(s: Scene, options: SynthOptions, rng: random.Random) -> np.ndarray:
    """The frames of a scene, with pixel noise: uint8 (T, H, W, 3)."""
    T, S, noise = options.num_frames, options.size, DIFFICULTY[options.difficulty]["noise"]
    frames = np.empty((T, S, S, 3), np.uint8)
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    for t in range(T):
        canvas = np.full((S, S, 3), 30.0)
        for color, positions in s.objects:
            x, y = positions[t]
            x0, y0 = int(round(x)), int(round(y))
            canvas[y0:y0 + s.side, x0:x0 + s.side] = color
        canvas += noise_rng.normal(0, noise, canvas.shape)
        frames[t] = np.clip(canvas, 0, 255).astype(np.uint8)
    return frames


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 (T, H, W, 3) frames as lossless H.264 (yuv420p) in an .mp4 with PyAV.

    Lossless, because lossy x264 here is not a function of its input: the same frames encoded at
    crf 17 in one process gave different bitstreams (and so different decoded pixels) depending on what
    the process had run before (other threads alive, e.g. torch's or tqdm's; about 1 encoding in 4 under
    CPU load), also with one encoder thread and with a standalone codec context. Lossless decoding
    returns the yuv420p input exactly whatever the encoder decides, so the dataset and every figure
    trained on it are reproducible; the bytes of the file still may differ. About 4x the size
    (~120 kB for a 32-frame 64 px clip)."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast"}
        for array in frames:
            # One-thread colour conversion: the pixels must not depend on how swscale slices the frame.
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p", threads=1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(out: str, options: SynthOptions = SynthOptions(), progress: bool = True) -> dict[str, str]:
    """Write the dataset under the local folder `out`. Seeded and deterministic; balanced classes.
    Returns the paths of the two annotation files and the videos folder."""
    from sfa_vivit.progress import bar as progress_bar

    options.validate()
    videos = os.path.join(out, "videos")
    os.makedirs(videos, exist_ok=True)
    duration = options.num_frames / options.fps
    end = math.ceil(duration)
    files = {"train": os.path.join(out, "train.csv"), "validate": os.path.join(out, "validate.csv")}
    total = options.num_train + options.num_val
    bar = progress_bar(total=total, unit="video", desc="synth", disable=not progress)
    index = 0
    for split, count in (("train", options.num_train), ("validate", options.num_val)):
        rows = []
        for i in range(count):
            label = i % len(CLASSES)
            rng = random.Random(f"{options.seed}/{split}/{i}")
            ytid = f"synth-{split}-{i:05d}"
            path = os.path.join(videos, f"{ytid}_000000_{end:06d}.mp4")
            if not os.path.exists(path):
                tmp = path + ".tmp-" + str(os.getpid()) + ".mp4"
                write_video(tmp, render(label, options, rng), options.fps)
                os.replace(tmp, path)
            rows.append([CLASSES[label], ytid, 0, end, split])
            index += 1
            bar.update(1)
        with open(files[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writerows(rows)
    bar.close()
    return {"train": files["train"], "validation": files["validate"], "videos": videos}
