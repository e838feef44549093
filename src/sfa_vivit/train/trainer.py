"""One trainer for the conventional recipe, SFA stage 1, SFA stage 2 and the paper's ablations.

    setup    resolve the device and ranks, read the manifest, build or restore the model
             (image checkpoint, --init checkpoint, or the run's own last checkpoint), freeze what
             the config freezes, build the optimizer and the data
    train    for each epoch: steps (forward, soft-target loss, backward, clip, SGD step with the
             cosine schedule), then validation, a checkpoint and the epoch's metrics
    cleanup  final multi-view validation, the final model, metrics.json, MLflow

The modes differ only by config (what is frozen, what is initialised from where, whether the
adapter is on). Randomness is a function of (seed, step, rank) and data order of (seed, epoch,
batch), so a run resumed from any committed checkpoint ends with the same weights as one that was
never interrupted. Time is accounted the same way for every mode: `train_time_s` is the wall time
of the training steps (data loading included), not of validation or checkpoint writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sfa_vivit import checkpoints
from sfa_vivit.data.augment import mixup, one_hot
from sfa_vivit.data.reader import ClipDataset, load_manifest
from sfa_vivit.models.vivit import Encoder, ViViT, ViViTConfig, vivit
from sfa_vivit.storage import join, url_to_fs, write_bytes_atomic
from sfa_vivit.train import cache
from sfa_vivit.train.config import TrainConfig, augment_config, learning_rate, make_optimizer, parse_views
from sfa_vivit.train.evaluation import evaluate_model
from sfa_vivit.train.tracking import Tracker, default_tracking_uri

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the pod did not finish; Kubernetes/KFP retry it


class TrainError(ValueError):
    """The run cannot start: its inputs contradict each other (found before any training)."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was committed and the run stopped. Start it again to resume."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped after committing the last good state."""


def train(config: TrainConfig, data: str, out: str, init: str | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns its metrics (also written to `out`/metrics.json)."""
    return Trainer(config, data, out, init).fit()


@dataclasses.dataclass
class _Progress:
    """What a checkpoint must restore besides weights and optimizer buffers."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_elapsed_s: float = 0.0
    epoch_loss_sum: float = 0.0
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    mlflow_run_id: str | None = None


class Trainer:
    def __init__(self, config: TrainConfig, data: str, out: str, init: str | None = None):
        self.config, self.data_url, self.out, self.init = config, data, out.rstrip("/"), init
        self.progress = _Progress()
        self._stop_requested = False
        self._setup_distributed()
        self.manifest = load_manifest(data)
        self.num_classes = self.manifest.num_classes
        resume = self._latest_checkpoint()
        torch.manual_seed(config.seed)   # the same initial weights on every rank and every run
        self.model = self._build_model(resume)
        self._apply_switches()
        self.model.to(self.device)
        if config.compile:
            self.model.spatial.compile()
            self.model.temporal.compile()
        self.trainable = self.model.trainable_parameters()
        if not self.trainable:
            raise TrainError("nothing to train: every parameter is frozen (check freeze_spatial/freeze_temporal)")
        self.optimizer = make_optimizer(config, self.trainable)
        if resume is not None:
            self._restore(resume)
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._setup_data()

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        c = self.config
        kind = c.device
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if kind == "xla":
            try:
                import torch_xla.core.xla_model as xm  # noqa: F401
            except ImportError:
                raise TrainError("device=xla needs torch-xla: pip install 'torch_xla[tpu]' matching torch "
                                 f"{torch.__version__} (see the TPU container in containers/)") from None
            self.device = xm.xla_device()
        elif kind == "cuda":
            if not torch.cuda.is_available():
                raise TrainError("device=cuda but no CUDA device is visible")
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        if c.batch_size % self.world:
            raise TrainError(f"batch_size={c.batch_size} is not divisible by the {self.world} ranks")
        self.local_batch = c.batch_size // self.world
        bf16 = c.precision == "bf16" or (c.precision == "auto" and kind in ("cuda", "xla"))
        if bf16 and kind == "cpu" and c.precision == "bf16":
            log.warning("bf16 autocast on CPU is slow on most CPUs; fp32 is the default there")
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.is_main = self.rank == 0

    def _latest_checkpoint(self) -> str | None:
        fs, path = url_to_fs(join(self.out, CHECKPOINTS))
        if not fs.exists(path):
            return None
        steps = []
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and checkpoints.is_committed(join(self.out, CHECKPOINTS, name)):
                steps.append(name)
        return join(self.out, CHECKPOINTS, max(steps)) if steps else None

    def _expected_model(self) -> ViViTConfig:
        c = self.config
        return vivit_config(c.variant, num_frames=c.num_frames, image_size=c.image_size,
                            num_classes=self.num_classes, drop_path=c.drop_path, dropout=c.dropout,
                            spatial_chunk=c.spatial_chunk, **c.model)

    def _build_model(self, resume: str | None) -> ViViT:
        c = self.config
        expected = self._expected_model()
        if resume is not None:
            loaded, extra = checkpoints.load(resume)
            self._resume_extra = extra
            stored = extra.get("config", {})
            changed = {k for k in set(stored) | set(c.to_dict())
                       if stored.get(k) != c.to_dict().get(k) and k not in _RESUMABLE_CHANGES}
            if changed:
                raise TrainError(f"{self.out} holds a run with a different config ({sorted(changed)} differ); "
                                 "use another --out, or the same settings to resume it")
            log.info("resuming from %s", resume)
            return loaded
        if c.mode == "stage2" and not self.init:
            raise TrainError("mode stage2 needs --init: the stage-1 run's output folder or checkpoint")
        if c.temporal_init == "stage1" and not self.init:
            raise TrainError("temporal_init=stage1 needs --init (a stage-1 checkpoint)")
        if not self.init:
            model = ViViT(expected)
            if c.image_checkpoint:
                checkpoints.load_image_vit(model, c.image_checkpoint)
            elif c.freeze_spatial:
                log.warning("freeze_spatial without --init or image_checkpoint freezes a random spatial encoder")
            return model
        if c.image_checkpoint:
            log.warning("image_checkpoint=%s is not used: --init %s supplies every weight, the spatial "
                        "encoder included", c.image_checkpoint, self.init)
        return self._model_from_init(expected)

    def _model_from_init(self, expected: ViViTConfig) -> ViViT:
        c = self.config
        url = resolve_init(self.init)
        loaded, extra = checkpoints.load(url)
        self.init_extra = extra
        got = loaded.config
        sizes = ("width", "spatial_depth", "temporal_depth", "heads", "mlp_dim", "patch", "tubelet", "in_channels",
                 "classifier", "temporal_heads", "temporal_mlp_dim")
        diff = [f"{k}: checkpoint {getattr(got, k)!r}, run {getattr(expected, k)!r}" for k in sizes
                if getattr(got, k) != getattr(expected, k)]
        if diff:
            raise TrainError(f"--init {url} is another architecture than this run asks for ({'; '.join(diff)}); "
                             f"set variant / model.* to match it")
        if got.image_size != expected.image_size:
            raise TrainError(f"--init {url} was trained at image_size={got.image_size}, this run uses "
                             f"{expected.image_size}")
        same_classes = got.num_classes == expected.num_classes
        if not same_classes and not c.reinit_head:
            raise TrainError(f"--init {url} predicts {got.num_classes} classes but {self.data_url} has "
                             f"{expected.num_classes}; set reinit_head=true to start a new head (cross-dataset init)")
        # Rebuild with this run's regularisation and frames; keep every weight that still fits.
        config = dataclasses.replace(got, num_classes=expected.num_classes, drop_path=expected.drop_path,
                                     dropout=expected.dropout, spatial_chunk=expected.spatial_chunk,
                                     adapter=got.adapter)
        model = ViViT(config)
        state = {k: v for k, v in loaded.state_dict().items() if same_classes or not k.startswith("head.")}
        model.load_state_dict(state, strict=same_classes)
        if config.num_frames != c.num_frames:
            model.resize_temporal(c.num_frames)
        if c.temporal_init == "scratch":
            # Table 1 rows I-III: spatial from the checkpoint, temporal encoder and head from scratch.
            model.temporal = Encoder(model.config, model.config.num_tubelets, model.config.temporal_depth,
                                     model.config.temporal_heads or model.config.heads,
                                     model.config.temporal_mlp_dim or model.config.mlp_dim)
            torch.nn.init.zeros_(model.head.weight)
            torch.nn.init.zeros_(model.head.bias)
        return model

    def _apply_switches(self) -> None:
        c, model = self.config, self.model
        if c.adapter and model.adapter is None:
            model.add_adapter(c.adapter_dim, residual=model.config.adapter_residual,
                              zero_init=model.config.adapter_zero_init)
        elif not c.adapter and model.adapter is not None:
            raise TrainError("the checkpoint has an adapter but adapter=false; set adapter=true")
        if c.freeze_spatial:
            model.freeze_spatial()
        if c.freeze_temporal:
            model.freeze_temporal()
        model.config.spatial_chunk = c.spatial_chunk

    def _setup_data(self) -> None:
        c = self.config
        self.augment = augment_config(c)
        n_train = self.manifest.split(c.train_split)["num_samples"]
        self.steps_per_epoch = c.steps_per_epoch or max(1, n_train // c.batch_size)
        self.total_steps = self.steps_per_epoch * c.epochs
        self.train_data = ClipDataset(self.manifest, c.train_split, mode="train", num_frames=c.num_frames,
                                      stride=c.stride, image_size=c.image_size, augment=self.augment, seed=c.seed,
                                      batch_size=self.local_batch, num_batches=self.steps_per_epoch)
        self.has_eval = c.eval_split in self.manifest.data["splits"]
        if not self.has_eval:
            log.warning("%s has no %r split: no validation metrics", self.data_url, c.eval_split)
        self.cache_report: cache.CacheReport | None = None
        self.cached_train: cache.CachedSplit | None = None
        self.cached_eval: dict[str, cache.CachedSplit] = {}

    def _eval_dataset(self, views: str) -> ClipDataset:
        c = self.config
        clips, crops = parse_views(views)
        return ClipDataset(self.manifest, c.eval_split, mode="eval", num_frames=c.num_frames, stride=c.stride,
                           image_size=c.image_size, augment=self.augment, num_clips=clips, num_crops=crops)

    def _prepare_cache(self) -> None:
        """Build (or reuse, or finish building) the frozen-feature cache and load it."""
        c = self.config
        url = c.cache_dir or join(self.out, "feature_cache")
        views = list(dict.fromkeys([c.eval_views, c.final_eval_views])) if self.has_eval else []
        eval_sets = {v: self._eval_dataset(v) for v in views}
        self.cache_report = cache.build(self.model, url, train=self.train_data, views=c.cache_views,
                                        eval_sets=eval_sets, dtype=c.cache_dtype, device=self.device,
                                        autocast=self.autocast, batch_size=self.local_batch, rank=self.rank,
                                        world=self.world, progress=self.is_main)
        r = self.cache_report
        self.cached_train = cache.CachedSplit(url, r.key, c.train_split, None, len(self.train_data.shards),
                                              self.rank, self.world)
        self.cached_eval = {v: cache.CachedSplit(url, r.key, d.split_name, v, len(d.shards), self.rank, self.world)
                            for v, d in eval_sets.items()}
        if self.is_main:
            log.info("feature cache %s: %d clips x %d views, %.1f MB (%.1f KB per clip), built in %.1f s "
                     "(%d files now)", url, r.clips, r.train_views, r.size_bytes / 1e6, r.bytes_per_clip / 1e3,
                     r.train_build_time_s + r.eval_build_time_s, r.built_now)

    def _epoch_batches(self, epoch: int, skip: int):
        c = self.config
        if self.cached_train is not None:
            return self.cached_train.train_batches(epoch=epoch, seed=c.seed, batch_size=c.batch_size,
                                                   num_batches=self.steps_per_epoch, skip_batches=skip)
        self.train_data.set_epoch(epoch, skip_batches=skip)
        return torch.utils.data.DataLoader(self.train_data, batch_size=self.local_batch, num_workers=c.workers,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def _restore(self, url: str) -> None:
        extra = self._resume_extra            # weights and extra were read in _build_model
        self.progress = _Progress(**extra["trainer"])
        state = checkpoints.load_state(url)
        optim = extra["optimizer"]
        for i, group in enumerate(optim["param_groups"]):
            self.optimizer.param_groups[i]["lr"] = group["lr"]
        params = dict(self.model.named_parameters())
        for key, tensor in state.items():   # optimizer.<parameter name>.<buffer>: independent of order
            name, buffer = key[len("optimizer."):].rsplit(".", 1)
            self.optimizer.state[params[name]][buffer] = tensor.to(self.device)
        saved = extra.get("world", {})
        if saved and (saved.get("world_size"), saved.get("workers")) != (self.world, self.config.workers):
            log.warning("resuming with %d ranks x %d workers, the run was at %d x %d: the data order from here "
                        "differs from an uninterrupted run", self.world, self.config.workers,
                        saved.get("world_size"), saved.get("workers"))

    def _save_checkpoint(self) -> str | None:
        url = join(self.out, CHECKPOINTS, f"step-{self.progress.step:08d}")
        if self.is_main:
            state = {f"optimizer.{name}.{buffer}": value for name, p in self.model.named_parameters()
                     for buffer, value in self.optimizer.state.get(p, {}).items() if torch.is_tensor(value)}
            extra = {"trainer": dataclasses.asdict(self.progress), "config": self.config.to_dict(),
                     "optimizer": {"param_groups": [{"lr": g["lr"]} for g in self.optimizer.param_groups]},
                     "world": {"world_size": self.world, "workers": self.config.workers}}
            checkpoints.save(self.model, url, extra=extra, state=state)
            self._prune_checkpoints()
        if self.world > 1:
            dist.barrier()
        return url

    def _prune_checkpoints(self) -> None:
        fs, path = url_to_fs(join(self.out, CHECKPOINTS))
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
        committed = [n for n in names if n.startswith("step-") and checkpoints.is_committed(join(self.out, CHECKPOINTS, n))]
        for name in committed[: -self.config.keep_checkpoints]:
            folder = join(path, name)
            fs.rm(join(folder, checkpoints.MARKER_FILE))   # uncommit first: never a half-deleted "valid" one
            fs.rm(folder, recursive=True)

    # ------------------------------------------------------------------------------------------
    # Train
    # ------------------------------------------------------------------------------------------
    def fit(self, *, stop_after_steps: int | None = None, checkpoint_on_stop: bool = True) -> dict[str, Any]:
        """Train to the end (or resume to it). stop_after_steps: leave after that many steps of this
        call, as a preemption would (with a checkpoint unless checkpoint_on_stop=False, which is a
        hard kill). Raises Preempted on SIGTERM, NonFiniteLoss on a NaN/inf loss."""
        c, p = self.config, self.progress
        self.tracker = self._tracker()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        steps_this_call = 0
        try:
            if c.cache_views and self.cached_train is None:
                self._prepare_cache()
            while p.epoch < c.epochs:
                loader = self._epoch_batches(p.epoch, p.step_in_epoch)
                start = time.perf_counter()
                session_start_elapsed = p.epoch_elapsed_s
                for batch in loader:
                    loss = self._step(batch)
                    p.epoch_loss_sum += loss
                    p.epoch_elapsed_s = session_start_elapsed + (time.perf_counter() - start)
                    steps_this_call += 1
                    if p.step % c.log_every == 0 and self.is_main:
                        log.info("epoch %d/%d step %d/%d loss %.4f lr %.4g", p.epoch + 1, c.epochs,
                                 p.step_in_epoch, self.steps_per_epoch, loss, self.optimizer.param_groups[0]["lr"])
                    if self._should_stop():
                        self._save_checkpoint()
                        self.tracker.finish("KILLED")
                        raise Preempted(f"SIGTERM at step {p.step}: checkpoint committed; run again to resume")
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        if checkpoint_on_stop:
                            self._save_checkpoint()
                        return {"status": "stopped", "step": p.step}
                    if c.checkpoint_every and p.step % c.checkpoint_every == 0 and p.step_in_epoch < self.steps_per_epoch:
                        self._save_checkpoint()
                self._end_epoch()
            return self._finish()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _step(self, batch: dict[str, Any]) -> float:
        c, p = self.config, self.progress
        # Every random draw of a step (dropout, drop-path, mixup) is a function of (seed, step, rank).
        step_seed = _seed(c.seed, p.step, self.rank)
        torch.manual_seed(step_seed)
        # Videos, or cached spatial features (mixup then mixes features: linear, like the first layer).
        name = "features" if "features" in batch else "video"
        inputs = batch[name].to(self.device, non_blocking=True)
        targets = self._targets(batch["label"])
        if c.mixup_alpha > 0:
            inputs, targets = mixup(inputs, targets, c.mixup_alpha, torch.Generator().manual_seed(step_seed))
        lr = self._lr(p.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            out = self.ddp_model(**{name: inputs})
        loss = self._loss(out, targets)
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            url = self._save_checkpoint()
            raise NonFiniteLoss(f"loss is {loss.item()} at step {p.step} (epoch {p.epoch + 1}, batch "
                                f"{p.step_in_epoch + 1}); stopped before applying it. Last good state: {url}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, c.grad_clip)
        self.optimizer.step()
        if self.device.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.mark_step()   # run the step's lazily built graph on the TPU
        p.step += 1
        p.step_in_epoch += 1
        return loss.item()

    def _targets(self, labels: Any) -> torch.Tensor:
        """Soft targets (B, total classes), heads concatenated in order, label-smoothed."""
        smooth = self.config.label_smoothing
        if isinstance(self.num_classes, dict):
            parts = [one_hot(labels[h], k, smooth) for h, k in self.num_classes.items()]
            return torch.cat(parts, dim=-1).to(self.device)
        return one_hot(labels, self.num_classes, smooth).to(self.device)

    def _loss(self, out: Any, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.cat(list(out.values()), dim=-1) if isinstance(out, dict) else out
        sizes = list(self.num_classes.values()) if isinstance(self.num_classes, dict) else [self.num_classes]
        loss = 0.0
        for lg, tg in zip(logits.float().split(sizes, dim=-1), targets.split(sizes, dim=-1)):
            loss = loss + (-(tg * F.log_softmax(lg, dim=-1)).sum(-1)).mean()
        return loss

    def _lr(self, step: int) -> float:
        """Linear warm-up over warmup_epochs, then cosine to zero (per step)."""
        peak = learning_rate(self.config)
        warmup = self.config.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _end_epoch(self) -> None:
        c, p = self.config, self.progress
        epoch_time = p.epoch_elapsed_s
        p.train_time_s += epoch_time
        clips = self.steps_per_epoch * c.batch_size
        record: dict[str, Any] = {"epoch": p.epoch + 1, "loss": p.epoch_loss_sum / max(1, p.step_in_epoch),
                                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": round(epoch_time, 3),
                                  "clips_per_s": round(clips / epoch_time, 3) if epoch_time else None,
                                  "peak_memory_bytes": peak_memory_bytes(self.device)}
        if self.has_eval and c.eval_every and ((p.epoch + 1) % c.eval_every == 0 or p.epoch + 1 == c.epochs):
            record.update(self._evaluate(c.eval_views))
        p.history.append(record)
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_elapsed_s = 0.0
        p.epoch_loss_sum = 0.0
        if self.is_main:
            top1 = f" top1 {record['top1']:.2f}" if record.get("top1") is not None else ""
            log.info("epoch %d/%d done: loss %.4f, %.1f s, %.2f clips/s%s", p.epoch, c.epochs, record["loss"],
                     epoch_time, record["clips_per_s"] or 0, top1)
            self.tracker.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))
                                      and k != "epoch"}, step=p.epoch)
        self._save_checkpoint()

    def _evaluate(self, views: str) -> dict[str, Any]:
        c = self.config
        clips, crops = parse_views(views)
        batch = max(1, self.local_batch // (clips * crops))
        if views in self.cached_eval:
            loader = self.cached_eval[views].eval_batches(batch)
        else:
            loader = torch.utils.data.DataLoader(self._eval_dataset(views), batch_size=batch, num_workers=c.workers)
        return evaluate_model(self.model, loader, device=self.device, num_classes=self.num_classes,
                              autocast=self.autocast)

    # ------------------------------------------------------------------------------------------
    # Cleanup
    # ------------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        c, p = self.config, self.progress
        final = self._evaluate(c.final_eval_views) if self.has_eval else {}
        top1s = [(h["epoch"], h["top1"]) for h in p.history if h.get("top1") is not None]
        best = max((t for _, t in top1s), default=None)
        npp = next((e for e, t in top1s if best is not None and t >= best - 1.0), None)
        model = self.model
        # The cache's training views are training work: their build time counts (summed over files,
        # so over ranks too: an upper bound on the wall time with several ranks).
        cache_time = self.cache_report.train_build_time_s if self.cache_report else 0.0
        metrics = {
            "mode": c.mode, "recipe": c.recipe, "num_frames": c.num_frames, "epochs": c.epochs,
            "steps": p.step, "batch_size": c.batch_size, "world_size": self.world,
            "train_time_s": round(p.train_time_s + cache_time, 3),
            "steps_time_s": round(p.train_time_s, 3),
            "cache": dataclasses.asdict(self.cache_report) if self.cache_report else None,
            "epoch_time_s": [h["epoch_time_s"] for h in p.history],
            "clips_per_s": [h["clips_per_s"] for h in p.history],
            "top1": [h.get("top1") for h in p.history], "top5": [h.get("top5") for h in p.history],
            "final": {**final, "views": c.final_eval_views},
            "npp_epoch": npp,
            "peak_memory_bytes": max((h["peak_memory_bytes"] for h in p.history), default=peak_memory_bytes(self.device)),
            "trainable_parameters": model.num_parameters(trainable=True),
            "total_parameters": model.num_parameters(),
            "history": p.history,
            "weights_sha256": weights_digest(model),
        }
        if self.world > 1:
            digests = [None] * self.world
            dist.all_gather_object(digests, metrics["weights_sha256"])
            metrics["ranks_identical"] = len(set(digests)) == 1
        if self.is_main:
            self.tracker.log_metrics({"train_time_s": metrics["train_time_s"],
                                      **{f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))}},
                                     step=p.epoch)
            self.tracker.finish("FINISHED")
            metrics["mlflow"] = self.tracker.report()
            if metrics["mlflow"]["unlogged"]:
                log.warning("MLflow: %d records could not be logged (kept in metrics.json and %s)",
                            len(metrics["mlflow"]["unlogged"]), metrics["mlflow"]["spool"])
            checkpoints.save(model, join(self.out, FINAL_MODEL),
                             extra={"config": c.to_dict(), "mode": c.mode, "mlflow_run_id": self.tracker.run_id,
                                    "final": final, "train_time_s": metrics["train_time_s"],
                                    "classes": self.manifest.data.get("classes"),
                                    "heads": self.manifest.data.get("heads")})
            write_bytes_atomic(join(self.out, "config.json"), json.dumps(c.to_dict(), indent=1).encode())
            write_bytes_atomic(join(self.out, "metrics.json"), json.dumps(metrics, indent=1).encode())
            log.info("done: %s, train_time_s %.1f, final top1 %s -> %s", c.mode, metrics["train_time_s"],
                     final.get("top1"), join(self.out, "metrics.json"))
        if self.world > 1:
            dist.barrier()
        return metrics

    # ------------------------------------------------------------------------------------------
    # Side systems
    # ------------------------------------------------------------------------------------------
    def _tracker(self) -> Tracker:
        c, p = self.config, self.progress
        tags = {"sfa.mode": c.mode, "sfa.recipe": c.recipe, "sfa.data": self.data_url, "sfa.out": self.out}
        stage1_run = getattr(self, "init_extra", {}).get("mlflow_run_id")
        if stage1_run:
            tags["sfa.stage1_run_id"] = stage1_run
        spool = join(self.out, "mlflow_unlogged.jsonl") if "://" not in self.out else None
        tracker = Tracker(default_tracking_uri(self.out), c.mlflow_experiment, f"{c.mode}-{c.num_frames}f",
                          enabled=self.is_main, run_id=p.mlflow_run_id, tags=tags, spool=spool)
        if self.is_main and p.mlflow_run_id is None:
            tracker.log_params({**c.to_dict(), "lr": learning_rate(c), "steps_per_epoch": self.steps_per_epoch,
                                "world_size": self.world, "data": self.data_url, "init": self.init})
        p.mlflow_run_id = tracker.run_id
        return tracker

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: checkpointing at the end of this step, then stopping")
        self._stop_requested = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# Fields that may change between a run and its resumption without changing what it computes.
_RESUMABLE_CHANGES = {"workers", "device", "log_every", "checkpoint_every", "keep_checkpoints", "precision",
                      "cache_dir", "compile"}


def vivit_config(variant: str, **kwargs: Any) -> ViViTConfig:
    with torch.device("meta"):
        return vivit(variant, **kwargs).config


def resolve_init(url: str) -> str:
    """--init may name a committed checkpoint or a run's output folder (its final model)."""
    if checkpoints.is_committed(url):
        return url
    if checkpoints.is_committed(join(url, FINAL_MODEL)):
        return join(url, FINAL_MODEL)
    raise TrainError(f"--init {url}: no committed checkpoint there or at {join(url, FINAL_MODEL)}")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def weights_digest(model: torch.nn.Module) -> str:
    return cache.state_digest([model])


def _seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
