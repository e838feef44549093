"""How a run starts: its config assembled from mode, recipe, data, --init, a config file and `--set`
(`run_config`, the one place the CLI, the pipeline's train step and the Python API take it from); the
checks that refuse a run whose inputs contradict each other (`TrainError`); and the model it starts from
(its own last checkpoint, an --init run, an image checkpoint, or random weights), with the rules for what
may change between a run and its resumption."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from sfa_vivit.core.lease import Lease, LeaseHeld, lease_key
from sfa_vivit.core.runtime import Runtime
from sfa_vivit.data.manifest import Manifest, load_manifest
from sfa_vivit.models import checkpoints
from sfa_vivit.models.vivit import ViViT, ViViTConfig, architecture_differences, init_from, set_training_switches, vivit
from sfa_vivit.train.config import RECIPES, RENAMED_RECIPES, TrainConfig, augment_defaults, recipe_dataset, resolve

log = logging.getLogger(__name__)


class TrainError(ValueError):
    """The run cannot start: its inputs contradict each other (found before any training)."""


def run_config(mode: str | None, recipe: str | None = None, *, data: str | None = None, init: str | None = None,
               config_file: str | None = None, sets: Sequence[str] = (),
               say: Callable[[str], None] | None = None) -> TrainConfig:
    """The resolved config of a run, from low to high precedence: the recipe (`recipe`, else the one named after
    the prepared dataset `data`), the mode's defaults, the architecture of the --init run (stage 2 continues
    stage 1's model), a YAML config file (every run writes its resolved one as config.yaml; it may name the
    mode and recipe), and `--set key=value` strings. Raises ValueError (TrainError for a bad --init) naming
    what is wrong. `say`: where the recipe taken from the data is told (the log by default)."""
    inherited = init_architecture(init) if init else {}
    saved = read_config_file(config_file) if config_file else {}
    mode, recipe = mode or saved.get("mode"), recipe or saved.get("recipe")
    saved = {k: v for k, v in saved.items() if k not in ("mode", "recipe")}
    if mode is None:
        raise ValueError("--mode is required (or a --config file that names one)")
    return resolve(mode, recipe_for(recipe, data, say), overrides={**inherited, **saved}, sets=list(sets))


def check_runtime(c: TrainConfig, rt: Runtime, out: str) -> None:
    """What the devices and the output folder refuse, before anything is read: a batch the devices cannot
    share, a feature cache on a multi-host TPU slice, torch.compile on XLA, an --out inside a checkpoint."""
    if c.batch_size % rt.batch_multiple:
        raise TrainError(f"batch_size={c.batch_size} is not divisible by the job's "
                         f"{rt.batch_multiple} devices ({rt.describe()})")
    if rt.spmd_hosts and c.cache_views:
        raise TrainError("cache_views on a multi-host TPU slice: the feature cache is built per host, which one "
                         "SPMD program over every host cannot do; train stage 2 from videos there, or on one host")
    if c.compile and rt.kind == "xla":
        raise TrainError("compile=true is for CPU and CUDA (torch.compile); on XLA every step is compiled "
                         "as one graph already")
    inside = checkpoints.committed_ancestor(out)
    if inside is not None:
        raise TrainError(f"--out {out} is {'a' if inside.rstrip('/') == out.rstrip('/') else 'inside a'} "
                         f"committed checkpoint ({inside}); a run writes a run folder of its own: use another "
                         "--out (and pass the checkpoint as --init to start from it)")


def banner(c: TrainConfig, model: ViViT, *, data_url: str, clips: int, steps_per_epoch: int, rt: Runtime,
           out: str, step: int, tracking_uri: str) -> list[str]:
    """What a run is about to do, before its first step (`sfa train` prints it)."""
    return [
        f"sfa train: {c.mode} ({c.recipe} recipe) on {data_url}",
        f"  model      ViViT-{c.variant} FE, {c.num_frames} frames at {c.image_size} px; "
        f"{model.num_parameters(trainable=True) / 1e6:.2f}M of {model.num_parameters() / 1e6:.2f}M parameters trained",
        f"  data       {clips} training clips, {steps_per_epoch} steps per epoch of {c.batch_size} clips, "
        f"{c.epochs} epochs",
        f"  compute    {rt.describe()}, {'bf16 autocast' if rt.bf16 else 'fp32'}",
        f"  outputs    {out} (checkpoints every {f'{c.checkpoint_every} steps' if c.checkpoint_every else 'epoch'}"
        f"{f' and {c.checkpoint_every_minutes:g} min' if c.checkpoint_every_minutes else ''}; "
        f"{f'resuming at step {step}' if step else 'a new run'})",
        f"  tracking   MLflow {tracking_uri} (experiment {c.mlflow_experiment})",
    ]


def lease_output(c: TrainConfig, rt: Runtime, out: str) -> Lease | None:
    """Rank 0 leases the output folder (one writer per run folder); every rank learns whether it did, so none
    goes on alone into a collective. Raises LeaseHeld (or OSError) on rank 0, TrainError on the others."""
    lease, failure = None, None
    if rt.is_main:
        try:
            lease = Lease(out, f"sfa train ({c.mode})", key=lease_key()).acquire()
        except (LeaseHeld, OSError) as e:
            failure = e
    if rt.world > 1 and not rt.spmd_hosts:
        held = rt.all_reduce(torch.tensor([0.0 if failure else 1.0]), "min")
        if not failure and not rt.is_main and held.item() < 1:
            raise TrainError(f"rank 0 could not take the lease on {out}; see its error")
    if failure is not None:
        raise failure
    return lease


def ready_model(model: ViViT, c: TrainConfig, device: torch.device) -> list[torch.nn.Parameter]:
    """Apply the paper's Table 1 switches (adapter, what is frozen), move the model to `device`, compile it if
    asked; returns the parameters to train (refused when there are none)."""
    try:
        set_training_switches(model, adapter=c.adapter, adapter_dim=c.adapter_dim, freeze_spatial=c.freeze_spatial,
                              freeze_temporal=c.freeze_temporal, spatial_chunk=c.spatial_chunk)
    except ValueError as e:
        raise TrainError(str(e)) from None
    model.to(device)
    if c.compile:
        model.spatial.compile()
        model.temporal.compile()
    trainable = model.trainable_parameters()
    if not trainable:
        raise TrainError("nothing to train: every parameter is frozen (check freeze_spatial/freeze_temporal)")
    return trainable


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a YAML config file (`sfa train --config`)."""
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings, e.g. 'epochs: 30'")
    return values


def recipe_for(recipe: str | None, data: str | None, say: Callable[[str], None] | None = None) -> str:
    """--recipe, or the recipe named after the prepared dataset (`say` tells which: the log by default); a
    recipe for another dataset is said aloud."""
    if data is None:
        if recipe is None:
            raise ValueError("--recipe is needed to print a config without --data (the data names its recipe)")
        return recipe
    try:
        dataset = load_manifest(data).dataset
    except (ValueError, OSError):
        if recipe is None:
            raise
        return recipe                        # no data yet (--print-config): training would say so itself
    if recipe is None:
        if dataset not in RECIPES:
            raise ValueError(f"{data} holds dataset {dataset!r}, which has no recipe of its own; choose --recipe "
                             f"from {sorted(RECIPES)}")
        (say or log.info)(f"recipe {dataset} (the dataset of {data}; --recipe to choose another)")
        return dataset
    if recipe_dataset(recipe) != dataset:
        log.warning("recipe %s on dataset %s: its sizes, epochs and augmentation were chosen for %s",
                    recipe, dataset, recipe)
    return recipe


ARCHITECTURE_FIELDS = ("variant", "model", "image_size")


def init_architecture(init: str) -> dict[str, Any]:
    """The architecture settings (variant, model.* sizes, image size) of the run that wrote the --init
    checkpoint or run folder: what stage 2 starts from unless --set says otherwise (`resolve(...,
    overrides=...)`). Raises TrainError when `init` holds no committed checkpoint."""
    try:
        stored = checkpoints.read_config(checkpoints.resolve_model(init))["extra"].get("config", {})
    except checkpoints.CheckpointError as e:
        raise TrainError(f"--init {e}") from None
    return {k: stored[k] for k in ARCHITECTURE_FIELDS if k in stored}


# Fields that may change between a run and its resumption without changing what it computes.
def _as_today(stored: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config in today's terms: a renamed recipe gets its new name; a field added since
    takes the value that run had in effect (before `exempt_from_decay`, every parameter decayed, which is
    the same as today's default when weight_decay is 0); the flat augmentation keys of earlier releases go
    under `augment`; other new fields their default."""
    stored = dict(stored)
    flat = {k: stored.pop(k) for k in list(stored) if k in augment_defaults()}
    if flat:
        stored["augment"] = {**augment_defaults(), **flat, **stored.get("augment", {})}
    today = {**TrainConfig().to_dict(), **stored}
    today["recipe"] = RENAMED_RECIPES.get(today["recipe"], today["recipe"])
    if "exempt_from_decay" not in stored:
        today["exempt_from_decay"] = now["exempt_from_decay"] if not today["weight_decay"] else "none"
    return today


_RESUMABLE_CHANGES = {"workers", "device", "log_every", "checkpoint_every", "checkpoint_every_minutes",
                      "keep_checkpoints", "precision",
                      "cache_dir", "compile", "verify_data", "mlflow_log_model", "mixed_prep"}

# The modes an --init checkpoint of each mode may come from (others need --force-init).
_INIT_FROM = {"stage2": ("stage1",)}


def vivit_config(variant: str, **kwargs: Any) -> ViViTConfig:
    with torch.device("meta"):
        return vivit(variant, **kwargs).config


def start_model(c: TrainConfig, manifest: Manifest, *, out: str, data_url: str, data_digest: str,
                init: str | None, resume: str | None, force_init: bool = False,
                ) -> tuple[ViViT, dict[str, Any], dict[str, Any]]:
    """The model a run starts from: its own last checkpoint `resume` (refused when the config or the data
    changed in a way that changes what it computes), the --init run or checkpoint `init` (refused when its
    mode, architecture, classes or class names do not fit), `c.image_checkpoint`, or random weights.
    Returns the model, the resumed checkpoint's extra ({} for a new run) and the --init's extra ({})."""
    num_classes = manifest.num_classes
    if resume is not None:
        loaded, extra = checkpoints.load(resume)
        now = c.to_dict()
        stored = _as_today(extra.get("config", {}), now)
        changed = {k for k in set(stored) | set(now) if stored.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES}
        if changed:
            raise TrainError(f"{out} holds a run with a different config ({sorted(changed)} differ); "
                             "use another --out, or the same settings to resume it")
        trained_on = extra.get("data", {})
        if trained_on.get("digest") not in (None, data_digest):
            raise TrainError(f"{out} holds a run trained on other data ({trained_on.get('url')}, "
                             f"{trained_on.get('num_classes')} classes) than {data_url} "
                             f"({num_classes} classes): its shards or classes differ; use another --out, "
                             "or the data it was trained on to resume it")
        log.info("resuming from %s", resume)
        return loaded, extra, {}
    if c.mode == "stage2" and not init:
        raise TrainError("mode stage2 needs --init: the stage-1 run's output folder or checkpoint")
    if c.temporal_init == "stage1" and not init:
        raise TrainError("temporal_init=stage1 needs --init (a stage-1 checkpoint)")
    expected = vivit_config(c.variant, num_frames=c.num_frames, image_size=c.image_size,
                            num_classes=num_classes, drop_path=c.drop_path, dropout=c.dropout,
                            spatial_chunk=c.spatial_chunk, **c.model)
    if not init:
        model = ViViT(expected)
        if c.image_checkpoint:
            from sfa_vivit.models.importers import load_image_vit
            load_image_vit(model, c.image_checkpoint)
        elif c.freeze_spatial:
            log.warning("freeze_spatial without --init or image_checkpoint freezes a random spatial encoder")
        return model, {}, {}
    if c.image_checkpoint:
        log.warning("image_checkpoint=%s is not used: --init %s supplies every weight, the spatial "
                    "encoder included", c.image_checkpoint, init)
    try:
        url = checkpoints.resolve_model(init)
    except checkpoints.CheckpointError as e:
        raise TrainError(f"--init {e}") from None
    loaded, extra = checkpoints.load(url)
    check_init_mode(c.mode, url, extra, force=force_init)
    diff = architecture_differences(loaded.config, expected)
    if diff:
        raise TrainError(f"--init {url} is another architecture than this run asks for ("
                         f"{'; '.join(diff)}); set variant / model.* / image_size to match it")
    if loaded.config.num_classes != expected.num_classes and not c.reinit_head:
        raise TrainError(f"--init {url} predicts {loaded.config.num_classes} classes but {data_url} has "
                         f"{expected.num_classes}; set reinit_head=true to start a new head (cross-dataset init)")
    names = {"classes": extra.get("classes") or (extra.get("data") or {}).get("classes"),
             "heads": extra.get("heads") or (extra.get("data") or {}).get("heads")}
    other_names = any(theirs is not None and manifest.data.get(field) is not None
                      and theirs != manifest.data.get(field) for field, theirs in names.items())
    if other_names and not c.reinit_head:
        raise TrainError(f"--init {url} was trained on other class names than {data_url} has "
                         f"(the same count, another order or other names); its head would predict the wrong "
                         "classes: set reinit_head=true to start a new head")
    model = init_from(loaded, num_frames=c.num_frames, num_classes=expected.num_classes,
                      drop_path=expected.drop_path, dropout=expected.dropout, spatial_chunk=expected.spatial_chunk,
                      keep_temporal=c.temporal_init != "scratch")
    if other_names:                 # reinit_head: the same count of classes, other names: a new head
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    return model, {}, extra


def check_init_mode(run_mode: str, url: str, extra: dict[str, Any], *, force: bool = False) -> None:
    """Stage 2 starts from a stage-1 model: refuse another mode's checkpoint unless forced."""
    mode = extra.get("mode") or extra.get("config", {}).get("mode")
    wanted = _INIT_FROM.get(run_mode)
    if wanted and mode and mode not in wanted:
        message = (f"--init {url} is a {mode} checkpoint; mode {run_mode} starts from a {' or '.join(wanted)} "
                   "model")
        if not force:
            raise TrainError(message + " (pass --force-init to use it anyway)")
        log.warning("%s; used anyway (--force-init)", message)


def recipe_mismatches(manifest: dict[str, Any], recipe: str | None = None, sets: list[str] | None = None) -> list[str]:
    """What in prepared data does not fit a training recipe (default: the one named after its dataset) with
    `sets` applied: clips shorter than the baseline's and stage 2's frames (they would loop), frames smaller
    than its crops (upsampled), or far larger (storage and decoding spent on pixels the crop never uses)."""
    if recipe is None and manifest["dataset"] not in RECIPES:
        return []                           # a dataset without a recipe of its own: nothing to hold it to
    recipe = recipe or manifest["dataset"]
    # The mode that reads the longest span of a clip (a recipe may give each mode its own frames and stride).
    config = max((resolve(mode, recipe, sets=sets) for mode in ("baseline", "stage2", "stage1")),
                 key=lambda c: (c.num_frames - 1) * c.stride + 1)
    needed = (config.num_frames - 1) * config.stride + 1
    crop = config.image_size * config.augment["max_scale"]   # the short side a crop scales from, at most
    out = []
    for split, entry in manifest["splits"].items():
        frames, side = entry.get("frames"), entry.get("short_side")
        if frames and frames["min"] < needed:
            out.append(f"{split}: clips of {frames['min']}-{frames['max']} frames (median {frames['median']}) at "
                       f"{manifest['options']['fps']:g} fps, but the {recipe} recipe trains on "
                       f"{config.num_frames} frames{f' at stride {config.stride}' if config.stride > 1 else ''}: "
                       "shorter clips loop (raise --fps, or --set num_frames=...)")
        if side and side["min"] < config.image_size:
            out.append(f"{split}: frames with a short side of {side['min']} px, smaller than the recipe's "
                       f"{config.image_size} px crops (they are upsampled; raise --short-side)")
        elif side and side["min"] > 2 * crop:
            out.append(f"{split}: frames with a short side of {side['min']} px for {config.image_size} px crops "
                       f"(--short-side {round(crop)} keeps what the crops use at a fraction of the bytes)")
    return out
