"""What thread-independent augmentation costs: clips/s of `train_transform` at 224 px, this tree's
augmentation against an earlier commit's (default: the last one with thread-dependent arithmetic),
interleaved in one process (old, new, old, new, ...) so load on the machine falls on both alike.

    python bench/augment_cost.py [--rev 399ed65] [--repeats 7] [--threads 1]

One intra-op thread by default: what a DataLoader worker runs with. Inputs: random uint8 frames at
256x340 (the stored short side of the recipes). Writes bench/results/augment_cost.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import save  # noqa: E402

from sfa_vivit.data import augment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str):
    """sfa_vivit/data/augment.py as it was at git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:src/sfa_vivit/data/augment.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "augment_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def clips_per_s(module, frames: torch.Tensor, config_name: str, clips: int, seed: int) -> float:
    config = module.AugmentConfig(**CONFIGS[config_name])
    start = time.perf_counter()
    for i in range(clips):
        module.train_transform(frames, 224, config, torch.Generator().manual_seed(seed + i))
    return clips / (time.perf_counter() - start)


CONFIGS = {"kinetics (colour jitter 0.8)": dict(color_jitter_probability=0.8),
           "ssv2 (RandAugment 2 x 15)": dict(color_jitter_probability=0.0, randaugment_layers=2,
                                             randaugment_magnitude=15)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="399ed65", help="the commit whose augmentation is the reference")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved old/new pairs per cell")
    parser.add_argument("--clips", type=int, default=4, help="clips per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (workers run with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = module_at(args.rev)
    rows = []
    for num_frames in (8, 32):
        frames = torch.randint(0, 256, (num_frames, 256, 340, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        for name in CONFIGS:
            pairs = []
            for r in range(args.repeats):
                a = clips_per_s(old, frames, name, args.clips, 100 * r)
                b = clips_per_s(augment, frames, name, args.clips, 100 * r)
                pairs.append((a, b))
            ratio = [b / a for a, b in pairs]
            rows.append({"frames": num_frames, "recipe": name, "threads": args.threads,
                         "old_clips_per_s": round(statistics.median(a for a, _ in pairs), 2),
                         "new_clips_per_s": round(statistics.median(b for _, b in pairs), 2),
                         "new_over_old_median": round(statistics.median(ratio), 3),
                         "new_over_old_min": round(min(ratio), 3), "new_over_old_max": round(max(ratio), 3)})
            print(rows[-1], flush=True)
    save(f"augment_cost_t{args.threads}", {"rev": args.rev, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
