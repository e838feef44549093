"""Training configuration: one typed dataclass, named recipes, and `--set key=value` overrides.

Recipes are the SFA supplementary's Table 1 ("ViViT hyperparameters"), which are the ViViT paper's:
synchronous SGD with momentum 0.9, batch 128, cosine schedule with 2.5 linear warm-up epochs,
random crop (1.0), flip (0.5), scale jitter 0.9-1.33 for all datasets, and per dataset:

    recipe          base LR  epochs  colour jitter  RandAugment  stoch. depth  label smooth.  mixup
    kinetics400     0.1      30      0.8            -            -             -              -
    kinetics600     0.1      30      0.8            -            -             -              -
    mit             0.25     10      0.8            -            -             -              -
    epic-kitchens-100 0.5      50      -              2 / 15       0.2           0.2            0.1
    ssv2            0.5      35      -              2 / 20       0.3           0.3            0.3
    something-else  0.5      35      -              -            -             -              -

Gradient clipping at global norm 1.0 is Scenic's default. The learning rate scales linearly with
the global batch (Goyal et al. 2017): lr = base_lr * batch_size / 128, so a run on fewer devices
with a smaller batch keeps the per-example step size (`lr_scaling=none` turns this off).

`synthetic` is for CPU runs on `sfa data synth` data: a small ViViT (width 96, 4+2 blocks,
64x64 frames in 8x8 patches). Give it the image ViT of `sfa data synth-vit` as `image_checkpoint`,
as the paper's runs start from an image checkpoint; without one the spatial encoder starts from
scratch and a run waits at chance for a seed-dependent number of epochs.

It reads clips in the training process (`workers=0`): on a CPU device a DataLoader worker takes
cores from the model's threads, and on 2 cores it made stage-1 epochs 1.5x slower and no epoch
faster (README, "Data loading on a CPU device").

`synthetic-small` is the README's quick start: the smallest ViViT (`TINY_MODEL`, 1+1 blocks of width 32) at
32x32, from scratch with AdamW, for `sfa data synth --difficulty big` clips of 16 frames; a recipe may give
per-mode values (`modes`: here stage 1 takes 8 frames at stride 2, stage 2 and the baseline 16 at stride 1).

`optimizer=adamw` (beta1 = `momentum`) is there for runs from scratch; every dataset's recipe uses SGD.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from sfa_vivit.core.runtime import DEVICES, PRECISIONS
from sfa_vivit.data.augment import AugmentConfig
from sfa_vivit.models.vivit import VARIANTS, ViViTConfig

_AUGMENT_FIELDS = {f.name: f for f in dataclasses.fields(AugmentConfig)}


def augment_defaults() -> dict[str, Any]:
    """AugmentConfig's defaults as a run's `augment` settings (mean and std as lists, as YAML and JSON hold them;
    mean and std are those of the image checkpoint the spatial encoder starts from)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(AugmentConfig()).items()}

MODES = ("baseline", "stage1", "stage2")
TEMPORAL_INITS = ("scratch", "stage1")
OPTIMIZERS = ("sgd", "adamw")
DECAY_EXEMPTIONS = ("model", "none")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. `None` fields take their mode's default (see `resolve`)."""

    mode: str = "baseline"
    recipe: str = "kinetics400"
    # Model ------------------------------------------------------------------------------------
    variant: str = "B"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ViViTConfig overrides
    image_checkpoint: str | None = None      # spatial init for baseline / stage 1 (hf, timm or npz)
    num_frames: int | None = None            # stage1: 8; baseline, stage2: 32
    stride: int = 1                          # between sampled frames (prep stores 12.5 fps)
    image_size: int = 224
    # What is trained, and from where (the paper's Table 1 switches) -------------------------------
    freeze_spatial: bool | None = None       # stage2: True
    freeze_temporal: bool = False
    adapter: bool | None = None              # stage2: True
    adapter_dim: int | None = None
    temporal_init: str | None = None         # 'scratch' | 'stage1'; stage2: 'stage1'
    reinit_head: bool = False                # allow --init from a dataset with other classes
    spatial_chunk: int = 0                   # tubelets per frozen-spatial chunk (0: all)
    # Stage-2 fast path (frozen spatial encoder only) ------------------------------------------------
    cache_views: int = 0                     # >0: train from cached features of this many views per clip
    cache_dir: str | None = None             # default: <out>/feature_cache (shareable across runs)
    cache_dtype: str = "float32"             # float32 | bfloat16 | float16 (halves the cache)
    compile: bool = False                    # torch.compile the spatial and temporal encoders
    # Optimisation -------------------------------------------------------------------------------
    epochs: int = 30
    batch_size: int = 128                    # global, over all ranks
    base_lr: float = 0.1
    reference_batch_size: int = 128          # the batch base_lr is quoted for
    lr_scaling: str = "linear"               # 'linear' | 'none'
    warmup_epochs: float = 2.5
    optimizer: str = "sgd"                   # 'sgd' (the paper's, with momentum) | 'adamw'
    momentum: float = 0.9                    # SGD momentum; AdamW's beta1
    weight_decay: float = 0.0
    exempt_from_decay: str = "model"        # 'model': norms, biases, positions, CLS get none (timm); 'none'
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    drop_path: float = 0.0
    dropout: float = 0.0
    # Augmentation: AugmentConfig's fields and defaults (`--set augment.min_scale=1.0`), like model.* ------
    augment: dict[str, Any] = dataclasses.field(default_factory=lambda: augment_defaults())
    # Evaluation ---------------------------------------------------------------------------------
    eval_every: int = 1                      # epochs between validation passes (0: final only)
    eval_views: str = "1x1"                  # clips x crops during training
    final_eval_views: str = "4x3"            # clips x crops at the end
    eval_split: str = "validation"
    train_split: str = "train"
    # Run ----------------------------------------------------------------------------------------
    seed: int = 0
    workers: int = 2                         # DataLoader worker processes per rank
    device: str = "auto"
    precision: str = "auto"                  # auto: bf16 autocast on CUDA/TPU, fp32 on CPU
    checkpoint_every: int = 0                # steps between checkpoints (0: epoch ends only)
    checkpoint_every_minutes: float = 0.0    # also commit one when this many minutes passed since the last (0: off)
    keep_checkpoints: int = 2
    log_every: int = 20                      # steps between progress lines
    steps_per_epoch: int | None = None       # default: train samples // batch_size
    verify_data: bool = False                # check every shard's sha256 before training starts
    mixed_prep: bool = False                 # accept train and validation splits prepared at other frame rates
    mlflow_experiment: str = "sfa-vivit"
    mlflow_log_model: bool = True            # the final model as an MLflow model too (local run folders)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):      # settings left out take AugmentConfig's defaults
            self.augment = {**augment_defaults(), **self.augment}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields every dataset recipe shares (supplementary Table 1, first rows).
_COMMON = dict(batch_size=128, warmup_epochs=2.5, momentum=0.9, grad_clip=1.0)


def _augment(**values: Any) -> dict[str, Any]:
    """A recipe's augmentation: every dataset's random crop, flip and scale jitter, and `values`."""
    return dict(min_scale=0.9, max_scale=1.33, flip_probability=0.5, **values)


# The smallest ViViT: the quick start's recipe, the tests and the local pipeline's `size="tiny"` (the one definition
# of "tiny": seconds per epoch on one CPU core).
TINY_MODEL: dict[str, int] = dict(width=32, spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=64, patch=8)

RECIPES: dict[str, dict[str, Any]] = {
    "kinetics400": dict(_COMMON, base_lr=0.1, epochs=30, augment=_augment(color_jitter_probability=0.8)),
    "kinetics600": dict(_COMMON, base_lr=0.1, epochs=30, augment=_augment(color_jitter_probability=0.8)),
    "mit": dict(_COMMON, base_lr=0.25, epochs=10, augment=_augment(color_jitter_probability=0.8)),
    "epic-kitchens-100": dict(_COMMON, base_lr=0.5, epochs=50, drop_path=0.2, label_smoothing=0.2, mixup_alpha=0.1,
                              augment=_augment(color_jitter_probability=0.0, randaugment_layers=2,
                                               randaugment_magnitude=15)),
    "ssv2": dict(_COMMON, base_lr=0.5, epochs=35, drop_path=0.3, label_smoothing=0.3, mixup_alpha=0.3,
                 augment=_augment(color_jitter_probability=0.0, randaugment_layers=2, randaugment_magnitude=20)),
    "something-else": dict(_COMMON, base_lr=0.5, epochs=35, augment=_augment(color_jitter_probability=0.0)),
    "synthetic": dict(variant="Ti", model=dict(width=96, spatial_depth=4, temporal_depth=2, heads=4, mlp_dim=192,
                                               patch=8),
                      image_size=64, batch_size=16, base_lr=0.8, epochs=12, warmup_epochs=0.5, workers=0,
                      final_eval_views="2x1", eval_views="1x1",
                      augment=dict(color_jitter_probability=0.0, min_scale=1.0, max_scale=1.15)),
    # The README's quick start: the smallest ViViT (TINY_MODEL) at 32 px, from scratch with AdamW, on the 16-frame
    # clips of `sfa data synth --difficulty big --size 32 --num-frames 16`. Stage 1 takes every second frame of the
    # clip (8 frames at stride 2 span it), stage 2 and the baseline all 16.
    "synthetic-small": dict(dataset="synthetic", variant="Ti", model=TINY_MODEL, image_size=32, batch_size=16,
                            optimizer="adamw", base_lr=0.008, epochs=10, warmup_epochs=0.5, workers=0,
                            final_eval_views="2x1", eval_views="1x1",
                            augment=dict(color_jitter_probability=0.0, min_scale=1.0, max_scale=1.15),
                            modes=dict(stage1=dict(num_frames=8, stride=2), stage2=dict(num_frames=16, epochs=5),
                                       baseline=dict(num_frames=16))),
}


def tiny_sets() -> list[str]:
    """`--set` strings of a tiny run of the synthetic recipe: TINY_MODEL at 32 px, batch 4, in-process data."""
    return [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + ["image_size=32", "batch_size=4", "workers=0",
                                                                "log_every=1"]


def recipe_dataset(recipe: str) -> str:
    """The dataset a recipe was chosen for: its own name, or its `dataset` (synthetic-small: synthetic)."""
    return RECIPES.get(recipe, {}).get("dataset", recipe)


# Names of earlier releases: a recipe is now named after its dataset (`sfa data prep --dataset`).
RENAMED_RECIPES = {"k400": "kinetics400", "k600": "kinetics600", "epic-kitchens": "epic-kitchens-100"}

MODE_DEFAULTS = {
    "baseline": dict(num_frames=32, freeze_spatial=False, adapter=False, temporal_init="scratch"),
    "stage1": dict(num_frames=8, freeze_spatial=False, adapter=False, temporal_init="scratch"),
    "stage2": dict(num_frames=32, freeze_spatial=True, adapter=True, temporal_init="stage1"),
}


def resolve(mode: str, recipe: str = "kinetics400", overrides: dict[str, Any] | None = None,
            sets: list[str] | None = None) -> TrainConfig:
    """The config of a run: dataclass defaults < recipe < the recipe's values for this mode (its `modes`, if any) <
    mode defaults (for fields left None) < `overrides` < `--set key=value` strings. Raises ValueError naming an
    unknown mode, recipe or key, a value that does not parse, or settings that contradict each other."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    if recipe in RENAMED_RECIPES:
        raise ValueError(f"recipe {recipe!r} is now called {RENAMED_RECIPES[recipe]!r} (recipes take their "
                         "dataset's name, as `sfa data prep --dataset` does)")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
    recipe_values = _copy(RECIPES[recipe])
    recipe_values.pop("dataset", None)
    per_mode = recipe_values.pop("modes", {}).get(mode, {})   # a recipe's frames and stride per mode, if it has them
    values: dict[str, Any] = {"mode": mode, "recipe": recipe, **recipe_values, **per_mode}
    for key, value in (overrides or {}).items():
        _set(values, key, value)
    for item in sets or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        _set(values, key.strip(), _parse(key.strip(), text.strip()))
    values["augment"] = {**augment_defaults(), **values.get("augment", {})}
    config = TrainConfig(**values)
    for key, value in MODE_DEFAULTS[mode].items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    validate(config)
    return config


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# ViViT fields a run may override under model.*: not those the run or the data decide (frames, image size,
# classes), nor those that are run-level settings here (TrainConfig's fields of the same names).
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ViViTConfig)
                 if f.name not in _FIELDS and f.name != "num_classes"}
# Augmentation settings: nested like model.*, not the flat keys of earlier releases.
_NESTED = {"model": _MODEL_FIELDS, "augment": _AUGMENT_FIELDS}


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    group, dot, name = key.partition(".")
    if dot and group in _NESTED:
        fields = _NESTED[group]
        if name not in fields:
            raise ValueError(f"unknown key {key!r}{_did_you_mean(key, [f'{group}.{k}' for k in fields])}; "
                             f"{group} keys: {sorted(f'{group}.{k}' for k in fields)}")
        values.setdefault(group, {})[name] = value
        return
    if key in _AUGMENT_FIELDS:
        raise ValueError(f"key {key!r} is now 'augment.{key}' (augmentation settings are nested, like model.*): "
                         f"--set augment.{key}=...")
    if key == "augment":             # a config file's augment: merged over the recipe's
        if not isinstance(value, dict):
            raise ValueError(f"augment={value!r} must be a mapping of augmentation settings, e.g. min_scale: 1.0")
        for name, item in value.items():
            _set(values, f"augment.{name}", item)
        return
    if key not in _FIELDS or key in ("mode",):
        known = [k for k in _FIELDS if k != "mode"]
        nested = [f"{g}.{k}" for g, fields in _NESTED.items() for k in fields]
        raise ValueError(f"unknown key {key!r}{_did_you_mean(key, known + nested)}; "
                         f"known keys: {sorted(known)}, model.<ViViT field> and augment.<augmentation field>")
    values[key] = value


def _did_you_mean(key: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest known key (also a model field given without 'model.'), or ''."""
    import difflib
    # A key that begins a known one is the likeliest meaning ('augment.flip': 'augment.flip_probability')
    close = sorted(k for k in known if k.startswith(key))[:1] \
        or difflib.get_close_matches(key, known, n=1, cutoff=0.6) \
        or difflib.get_close_matches(f"model.{key}", known, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(key: str, text: str) -> Any:
    """Parse a --set value by the field's declared type (annotations are strings here)."""
    group, _, name = key.partition(".")
    if group in _NESTED and name in _NESTED[group]:
        hint = str(_NESTED[group][name].type)
    elif key in _FIELDS:
        hint = str(_FIELDS[key].type)
    else:
        _set({}, key, None)  # raises the unknown-key error
    base = hint.replace("| None", "").strip()
    if "None" in hint and text.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base.startswith(("dict", "list", "tuple")):
            return json.loads(text)
    except ValueError as e:
        raise ValueError(f"--set {key}={text!r}: {e}") from None
    return text


def validate(c: TrainConfig) -> None:
    """Reject contradictory or out-of-range settings with a message naming the field."""
    def choice(name, allowed):
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name}={getattr(c, name)!r} is not one of {list(allowed)}")

    for field in dataclasses.fields(c):
        value = getattr(c, field.name)
        numbers = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            raise ValueError(f"{field.name}={value!r} must be a finite number")
    choice("temporal_init", TEMPORAL_INITS)
    choice("device", DEVICES)
    choice("precision", PRECISIONS)
    choice("lr_scaling", ("linear", "none"))
    choice("optimizer", OPTIMIZERS)
    choice("exempt_from_decay", DECAY_EXEMPTIONS)
    choice("cache_dtype", ("float32", "bfloat16", "float16"))
    if c.cache_views and not c.freeze_spatial:
        raise ValueError(f"cache_views={c.cache_views} needs freeze_spatial=true: only a frozen spatial "
                         "encoder's features can be cached")
    if c.variant not in VARIANTS:
        raise ValueError(f"variant={c.variant!r} is not one of {list(VARIANTS)}")
    for name in ("num_frames", "stride", "image_size", "epochs", "batch_size", "reference_batch_size",
                 "keep_checkpoints", "log_every"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    for name in ("workers", "checkpoint_every", "eval_every", "spatial_chunk", "cache_views"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
    if not (math.isfinite(c.checkpoint_every_minutes) and c.checkpoint_every_minutes >= 0):
        raise ValueError(f"checkpoint_every_minutes={c.checkpoint_every_minutes!r} must be a finite number >= 0")
    for name in ("base_lr", "warmup_epochs", "momentum", "weight_decay", "grad_clip", "mixup_alpha"):
        if getattr(c, name) < 0:
            raise ValueError(f"{name}={getattr(c, name)!r} must be >= 0")
    for name in ("label_smoothing", "drop_path", "dropout"):
        if not 0 <= getattr(c, name) < 1:
            raise ValueError(f"{name}={getattr(c, name)!r} must be in [0, 1)")
    for name in ("eval_views", "final_eval_views"):
        parse_views(getattr(c, name), name)
    if c.steps_per_epoch is not None and c.steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={c.steps_per_epoch!r} must be >= 1")
    if not isinstance(c.model, dict):
        raise ValueError(f"model={c.model!r} must be a dict of ViViT fields")
    unknown = sorted(set(c.model) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; allowed: {sorted(_MODEL_FIELDS)}")
    if not isinstance(c.augment, dict) or set(c.augment) - set(_AUGMENT_FIELDS):
        raise ValueError(f"augment={c.augment!r} must be a dict of augmentation fields: {sorted(_AUGMENT_FIELDS)}")
    for name in ("mean", "std"):
        value = c.augment[name]
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            raise ValueError(f"augment.{name}={value!r} must be three numbers (per RGB channel)")
    if any(v <= 0 for v in c.augment["std"]):
        raise ValueError(f"augment.std={c.augment['std']!r} must be > 0 per channel (pixels are divided by it)")
    layers = c.augment["randaugment_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"augment.randaugment_layers={layers!r} must be an integer >= 0")
    try:
        augment_config(c).validate()
    except ValueError as e:
        raise ValueError(f"augment: {e}") from None
    if c.optimizer == "sgd" and c.momentum >= 1:
        raise ValueError(f"momentum={c.momentum!r} must be < 1 (SGD diverges otherwise)")
    if c.warmup_epochs > c.epochs:
        raise ValueError(f"warmup_epochs={c.warmup_epochs} is longer than epochs={c.epochs}")


def parse_views(text: str, name: str = "views") -> tuple[int, int]:
    """'4x3' → (4 clips, 3 crops)."""
    try:
        clips, crops = (int(x) for x in str(text).lower().split("x"))
        if clips < 1 or crops < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}={text!r} must look like CLIPSxCROPS, e.g. 4x3") from None
    if clips > MAX_VIEW_CLIPS or crops > MAX_VIEW_CROPS:
        raise ValueError(f"{name}={text!r}: at most {MAX_VIEW_CLIPS} clips x {MAX_VIEW_CROPS} crops per video (the "
                         "paper uses 4x3; every view is a forward pass of the whole model)")
    return clips, crops


MAX_VIEW_CLIPS, MAX_VIEW_CROPS = 64, 10


def augment_config(c: TrainConfig) -> AugmentConfig:
    """The run's AugmentConfig, from its `augment` settings."""
    return AugmentConfig(**{**c.augment, "mean": tuple(c.augment["mean"]), "std": tuple(c.augment["std"])})


__all__ = ["TrainConfig", "RECIPES", "MODES", "resolve", "validate", "parse_views", "augment_config",
           "augment_defaults"]


# Moved in 0.1.x (the old names work until 0.2, with a DeprecationWarning).
_MOVED = {"learning_rate": "sfa_vivit.train.optim", "make_optimizer": "sfa_vivit.train.optim",
          "learning_rate_at": "sfa_vivit.train.optim"}


def __getattr__(name: str) -> Any:
    from sfa_vivit._moved import moved_attribute
    return moved_attribute(__name__, name, _MOVED)
