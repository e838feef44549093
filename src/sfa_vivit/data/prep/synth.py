"""`sfa data synth`: a synthetic video dataset whose labels live in the order of frames.

A white square (the target) moves in one direction, turns at a random moment between 35% and
65% of the clip, and moves in another direction: the 12 classes are the ordered pairs of distinct
directions ("right then up" ≠ "up then right"). Any single frame, and any short window that misses
the turn, is ambiguous; reversing or shuffling the frames changes the evidence. Distractor squares
move in straight lines (at 'hard', some are white too and some turn once with a different timing),
and pixel noise is added; at 'big' the target is alone and a third of the frame wide (the quick start's
world). Directions are the labels, so horizontal flipping is off for it.

The `textures` world keeps the labels and swaps flat squares for real photographs (the sample images
that ship inside scikit-image): each frame's background is a dimmed crop of one photo, every object
is a square cut from another, and the target is the one whose texture is a cat's fur (`TARGET_TEXTURE`)
among distractors of other textures. What a frame shows is then a matter of texture identity, which
an image model can learn from stills (`image_vit`'s `texture` task) without ever learning where things
are, and where the target is, frame after frame, is what the label needs: the gap between an image
checkpoint and the video task that SFA's stage 1 exists to close.

It is written in the Kinetics layout (videos `<id>_000000_<end:06d>.mp4` + `train.csv` /
`validate.csv` with `label,youtube_id,time_start,time_end,split`) so that it goes through the same
`sfa data prep` path as the real datasets (`--dataset synthetic`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import random

import av
import numpy as np

from sfa_vivit.core.options import option

DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
CLASSES = [f"{a} then {b}" for a in DIRECTIONS for b in DIRECTIONS if a != b]

DIFFICULTY = {
    # distractors, white distractors, turning distractors, noise std, square side and speed (fractions)
    # One big square alone: the quick start's world, which a ViViT learns from scratch in a few hundred steps.
    "big": dict(distractors=0, white=0, turning=0, noise=4.0, size=0.3, speed=0.9),
    "easy": dict(distractors=0, white=0, turning=0, noise=4.0, size=0.16, speed=0.9),
    "medium": dict(distractors=2, white=0, turning=0, noise=10.0, size=0.14, speed=0.9),
    "hard": dict(distractors=4, white=2, turning=1, noise=20.0, size=0.12, speed=0.9),
    # Photographs: textured objects on a photographic background (see the module's docstring).
    "textures": dict(distractors=2, white=0, turning=0, noise=4.0, size=0.25, speed=0.9, textured=True),
    # The same photographs with the target alone: the main job's reduced form of the benchmark's task.
    "textures-solo": dict(distractors=0, white=0, turning=0, noise=4.0, size=0.25, speed=0.9, textured=True),
}

# The photographs of the `textures` world: files inside scikit-image's package (no download).
# The target's fur is the only warm colour among them (the photos that resemble it, coffee and skin, are
# left out), so that finding the target is a matter of seeing, and the task's difficulty is in its motion.
TEXTURES = ("chelsea.png", "brick.png", "gravel.png", "rocket.jpg", "grass.png", "coins.png")
TARGET_TEXTURE = 0          # the cat's fur: the target in every video; distractors are the others
BACKGROUNDS = ("hubble_deep_field.jpg", "moon.png", "camera.png", "page.png", "text.png", "motorcycle_left.png",
               "horse.png", "clock_motion.png")
TEXTURE_SIDE = 96           # a texture photo is resized to this side: an object shows a part of it
BACKGROUND_SIDE = 160       # a background photo is resized to this side: a frame shows a crop
BACKGROUND_GAIN = 0.55      # backgrounds are dimmed: objects stand out as they do in most videos


@functools.lru_cache(maxsize=None)
def photo(name: str, side: int) -> np.ndarray:
    """A scikit-image sample photograph as uint8 (side, side, 3): centre square, resized (bilinear)."""
    from importlib.resources import files

    from PIL import Image
    try:
        path = files("skimage") / "data" / name
        image = Image.open(str(path)).convert("RGB")
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise RuntimeError(f"the 'textures' world needs scikit-image's sample photographs ({name}): "
                           f"pip install scikit-image ({error})") from None
    w, h = image.size
    edge = min(w, h)
    image = image.crop(((w - edge) // 2, (h - edge) // 2, (w - edge) // 2 + edge, (h - edge) // 2 + edge))
    return np.asarray(image.resize((side, side), Image.BILINEAR), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    num_train: int = option(360, "training videos")
    num_val: int = option(120, "validation videos")
    num_frames: int = option(32, "frames per video")
    size: int = option(64, "square frame size (px)")
    fps: int = option(16, "frames per second written")
    difficulty: str = option("medium", "the world", choices=tuple(DIFFICULTY))
    seed: int = option(0, "random seed of the scenes")

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
    """What a video shows: each object's look and top-left corner per frame, in draw order. A look is an
    RGB colour, or in the textures world (texture index, x, y of the part of its photo the object shows);
    `background` is then (photo index, x, y of the crop), else None (flat grey)."""
    objects: list[tuple[tuple[int, int, int], list[tuple[float, float]]]]
    side: int      # square side in pixels
    target: int    # index in `objects` of the target square
    background: tuple[int, int, int] | None = None

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

    textured = p.get("textured", False)

    def texture(index: int) -> tuple[int, int, int]:
        return (index, rng.randrange(TEXTURE_SIDE - side + 1), rng.randrange(TEXTURE_SIDE - side + 1))

    turn = rng.randint(round(0.35 * T), round(0.65 * T))
    target = (texture(TARGET_TEXTURE) if textured else (255, 255, 255), path(first, second, turn))
    objects = [target]
    for i in range(p["distractors"]):
        white = i < p["white"]
        if textured:
            color = texture(rng.choice([k for k in range(len(TEXTURES)) if k != TARGET_TEXTURE]))
        else:
            color = (255, 255, 255) if white else tuple(rng.randint(60, 200) for _ in range(3))
        d1 = rng.choice(list(DIRECTIONS))
        d2 = rng.choice([d for d in DIRECTIONS if d != d1]) if i < p["turning"] else None
        # A turning distractor turns early or late, never in the target's window.
        dturn = rng.choice([rng.randint(1, round(0.25 * T)), rng.randint(round(0.75 * T), T - 1)])
        objects.append((color, path(d1, d2, dturn)))
    rng.shuffle(objects)   # draw order carries no information
    background = None
    if textured:
        crop = min(BACKGROUND_SIDE, S)
        background = (rng.randrange(len(BACKGROUNDS)), rng.randrange(BACKGROUND_SIDE - crop + 1),
                      rng.randrange(BACKGROUND_SIDE - crop + 1))
    return Scene(objects, side, next(i for i, o in enumerate(objects) if o is target), background)


def canvas(s: Scene, size: int) -> np.ndarray:
    """The frame behind the objects: float (size, size, 3)."""
    if s.background is None:
        return np.full((size, size, 3), 30.0)
    index, x, y = s.background
    return photo(BACKGROUNDS[index], BACKGROUND_SIDE)[y:y + size, x:x + size].astype(np.float64) * BACKGROUND_GAIN


def paint(frame: np.ndarray, look: tuple[int, int, int], x0: int, y0: int, side: int, textured: bool) -> None:
    """Draw one object (clipped to the frame) in place."""
    if textured:
        index, tx, ty = look
        size = frame.shape[0]
        x1, y1 = max(x0, 0), max(y0, 0)
        x2, y2 = min(x0 + side, size), min(y0 + side, size)
        if x2 > x1 and y2 > y1:
            part = photo(TEXTURES[index], TEXTURE_SIDE)[ty:ty + side, tx:tx + side]
            frame[y1:y2, x1:x2] = part[y1 - y0:y2 - y0, x1 - x0:x2 - x0]
    else:
        frame[y0:y0 + side, x0:x0 + side] = look


STILL_LABELS = ("texture", "cell")


def still(options: SynthOptions, rng: random.Random, label: str = "texture") -> tuple[np.ndarray, int]:
    """One still of the textures world for an image task, with a background as the videos'. Returns
    (uint8 (H, W, 3), label). label='texture': one to three objects of the videos' size, all of one
    texture, at random places, labelled with the texture (what the frame shows, never where).
    label='cell': one object of any texture, labelled with the cell of a 4 x 4 grid that holds its centre
    (where an object is, never which object: a frame of the videos holds four)."""
    p, S = DIFFICULTY[options.difficulty], options.size
    side = max(3, round(p["size"] * S))
    texture = rng.randrange(len(TEXTURES))
    count = rng.randint(1, 3) if label == "texture" else 1
    looks = [(texture, rng.randrange(TEXTURE_SIDE - side + 1), rng.randrange(TEXTURE_SIDE - side + 1))
             for _ in range(count)]
    objects = [(look, [(rng.uniform(0, S - side), rng.uniform(0, S - side))]) for look in looks]
    crop = min(BACKGROUND_SIDE, S)
    background = (rng.randrange(len(BACKGROUNDS)), rng.randrange(BACKGROUND_SIDE - crop + 1),
                  rng.randrange(BACKGROUND_SIDE - crop + 1))
    scene = Scene(objects, side, 0, background)
    frame = draw(scene, dataclasses.replace(options, num_frames=1), rng)[0]
    return frame, scene.target_cell(0, S, 4) if label == "cell" else texture


def draw(s: Scene, options: SynthOptions, rng: random.Random) -> np.ndarray:
    """The frames of a scene, with pixel noise: uint8 (T, H, W, 3)."""
    T, S, noise = options.num_frames, options.size, DIFFICULTY[options.difficulty]["noise"]
    frames = np.empty((T, S, S, 3), np.uint8)
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    back = canvas(s, S)
    for t in range(T):
        frame = back.copy()
        for look, positions in s.objects:
            x, y = positions[t]
            paint(frame, look, int(round(x)), int(round(y)), s.side, s.background is not None)
        frame += noise_rng.normal(0, noise, frame.shape)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
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
    from sfa_vivit.core.progress import bar as progress_bar

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
