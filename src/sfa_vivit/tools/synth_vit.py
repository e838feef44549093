"""The synthetic recipe's image checkpoint: what the paper's ImageNet-21k ViT is to Kinetics.

Every ViViT-FE of the paper starts its spatial encoder from an image ViT, the baseline and SFA alike.
A ViT trained from scratch on the synthetic videos has to discover, from one label per clip, how to
find the target square in a frame: it waits at chance for a number of steps that depends on the seed
(a plateau we measured from 3 to more than 12 epochs), so a from-scratch comparison of two recipes
measures the seed. This module makes the image checkpoint for the synthetic data instead:

- data (task `cell`): single frames of synthetic scenes (`synth.scene` + `synth.draw`, the videos'
  renderer, from a seed space of its own), each labelled with the cell of a `grid` x `grid` partition of
  the frame that holds the target square's centre. Distractors and noise as in the videos' difficulty.
  This checkpoint already knows where the target is: the features the video task needs.
- data (task `texture`, the `textures` world only): stills of the same photographic world
  (`synth.still`), labelled with the texture their objects show, never with where they are. Like an
  ImageNet checkpoint for Kinetics, it sees the videos' world but not the features their labels need.
  Task `object_cell`: one object of any texture per still, labelled with the cell of a 4 x 4 grid that
  holds it: where an object is, never which of several (a video's frame holds four, and the label follows
  the one with the cat's fur).
- model: Hugging Face `ViTForImageClassification` with the spatial encoder's sizes (width, depth,
  heads, MLP, patch, image size) taken from the recipe, so that `load_image_vit` maps it one to one.
- training: AdamW, linear warm-up then cosine, batch 32 (a from-scratch ViT needs many updates more
  than large batches to leave the plateau), on `steps` random batches.
- output: a `save_pretrained` folder (the `hf` image format) plus `image_vit.json` with the options,
  the held-out accuracy and the time. A folder whose `image_vit.json` holds the same options is reused.

    sfa data synth-vit --out DIR [--difficulty medium] [--steps 2500]

Then train with `--set image_checkpoint=DIR`. Its time is preparation, like the paper's image
pretraining: it is reported, and counted in neither recipe's `train_time_s`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sfa_vivit.core.options import option
from sfa_vivit.data.augment import normalize
from sfa_vivit.data.prep import synth
from sfa_vivit.models.vivit import vivit
from sfa_vivit.train.config import TrainConfig, resolve

log = logging.getLogger(__name__)

REPORT = "image_vit.json"


TASKS = ("cell", "texture", "object_cell")


@dataclasses.dataclass(frozen=True)
class ImageViTOptions:
    difficulty: str = option("medium", "world of the stills (sfa data synth --difficulty)",
                             choices=tuple(synth.DIFFICULTY))
    task: str = option("cell", "label: cell (where the target is), texture (what is shown), object_cell (where the "
                               "one object of a still is, whatever it is)", choices=TASKS)
    videos: int = option(2000, "training scenes (frames_per_video stills each)")
    val_videos: int = option(200, "held-out scenes")
    frames_per_video: int = option(4, "stills per scene")
    grid: int = option(4, "the label's grid (grid x grid cells)")
    steps: int = option(2500, "optimizer steps")
    batch_size: int = option(32, "stills per step")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.05, "AdamW weight decay")
    seed: int = option(0, "random seed")

    def validate(self) -> None:
        synth.SynthOptions(difficulty=self.difficulty).validate()
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {list(TASKS)}")
        if self.task != "cell" and not synth.DIFFICULTY[self.difficulty].get("textured"):
            raise ValueError(f"task={self.task!r} needs a textured world (difficulty='textures'), "
                             f"not {self.difficulty!r}")
        for name in ("videos", "val_videos", "frames_per_video", "grid", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.frames_per_video > synth.SynthOptions().num_frames:
            raise ValueError(f"frames_per_video={self.frames_per_video} is more than a video's "
                             f"{synth.SynthOptions().num_frames} frames")


def num_labels(options: ImageViTOptions) -> int:
    return {"cell": options.grid ** 2, "texture": len(synth.TEXTURES),
            "object_cell": 16}[options.task]


def frames(options: ImageViTOptions, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 frames (N, 3, size, size), labels (N,)) of `split` ('train' or 'val'): the target's cell, or
    the texture shown (task `texture`: `frames_per_video` stills per 'video')."""
    count = options.videos if split == "train" else options.val_videos
    scene_options = synth.SynthOptions(size=size, difficulty=options.difficulty)
    images, labels = [], []
    for i in range(count):
        rng = random.Random(f"image-vit/{options.seed}/{split}/{i}")
        if options.task != "cell":
            for _ in range(options.frames_per_video):
                image, label = synth.still(scene_options, rng, "cell" if options.task == "object_cell" else "texture")
                images.append(image)
                labels.append(label)
            continue
        scene = synth.scene(i % len(synth.CLASSES), scene_options, rng)
        video = synth.draw(scene, scene_options, rng)
        for t in rng.sample(range(scene_options.num_frames), options.frames_per_video):
            images.append(video[t])
            labels.append(scene.target_cell(t, size, options.grid))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def hf_config(train_config: TrainConfig, num_labels: int):
    """A transformers ViTConfig with the spatial encoder's sizes of `train_config`."""
    from transformers import ViTConfig

    c = vivit(train_config.variant, num_frames=2, image_size=train_config.image_size, num_classes=1,
              **train_config.model).config
    return ViTConfig(hidden_size=c.width, num_hidden_layers=c.spatial_depth, num_attention_heads=c.heads,
                     intermediate_size=c.mlp_dim, image_size=c.image_size, patch_size=c.patch,
                     num_channels=c.in_channels, num_labels=num_labels)


def pretrain(out: str, options: ImageViTOptions = ImageViTOptions(), recipe: str = "synthetic",
             sets: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the image ViT for `recipe`'s spatial encoder and save it under the local folder `out`.
    Returns the report (also in out/image_vit.json). Reuses `out` when it holds the same options."""
    from transformers import ViTForImageClassification

    from sfa_vivit.core.progress import bar as progress_bar

    options.validate()
    config = resolve("baseline", recipe, sets=sets)
    wanted = {"options": dataclasses.asdict(options), "recipe": recipe, "sets": list(sets or [])}
    report_path = os.path.join(out, REPORT)
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        if {k: report.get(k) for k in wanted} == wanted:
            log.info("image ViT in %s already trained with these options (held-out accuracy %.1f%%)",
                     out, report["val_accuracy"])
            return report
        raise ValueError(f"--out {out} holds an image ViT trained with other options ({report_path}); "
                              "choose another --out or remove it")

    start = time.perf_counter()
    torch.manual_seed(options.seed)
    x_train, y_train = frames(options, "train", config.image_size)
    x_val, y_val = frames(options, "val", config.image_size)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return normalize(x.float().div_(255), config.augment["mean"], config.augment["std"])

    model = ViTForImageClassification(hf_config(config, num_labels(options)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    bar = progress_bar(range(options.steps), desc="image ViT", unit="step", disable=not progress)
    model.train()
    for step in bar:
        warm = min(1.0, (step + 1) / options.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = options.lr * warm * 0.5 * (1 + math.cos(math.pi * step / options.steps))
        index = torch.randint(0, len(x_train), (options.batch_size,), generator=generator)
        loss = F.cross_entropy(model(pixel_values=prepare(x_train[index])).logits, y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # shown at the next redraw, with the count
    bar.close()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(pixel_values=prepare(x_val[i:i + 256])).logits.argmax(-1)
                           == y_val[i:i + 256]).sum()) for i in range(0, len(x_val), 256))
    report = {**wanted, "val_accuracy": round(100.0 * correct / len(x_val), 2),
              "chance_accuracy": round(100.0 / num_labels(options), 2), "final_loss": round(loss.item(), 4),
              "time_s": round(time.perf_counter() - start, 1), "train_frames": len(x_train)}
    # Whole folder or nothing: written beside `out`, then renamed into place.
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    log.info("image ViT: held-out accuracy %.1f%% (chance %.1f%%) in %.0f s -> %s", report["val_accuracy"],
             report["chance_accuracy"], report["time_s"], out)
    return report


__all__ = ["ImageViTOptions", "frames", "hf_config", "pretrain", "REPORT"]
