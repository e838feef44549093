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

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import torch

from sfa_vivit.core import runtime
from sfa_vivit.core.progress import LOG_INTERVAL_S, clock
from sfa_vivit.core.storage import join, json_bytes, write_bytes_atomic
from sfa_vivit.data.augment import mixup
from sfa_vivit.data.manifest import data_digest, load_manifest
from sfa_vivit.models import checkpoints
from sfa_vivit.models.vivit import ViViT
from sfa_vivit.train import cache
from sfa_vivit.train.config import TrainConfig
from sfa_vivit.train.evaluation import evaluate_model
from sfa_vivit.train.loss import LossWatch, soft_target_loss, soft_targets
from sfa_vivit.train.optim import learning_rate, learning_rate_at, make_optimizer
from sfa_vivit.train.run_data import RunData, check_shards_exist, verify_data
from sfa_vivit.train.start import TrainError, banner, check_runtime, lease_output, ready_model, start_model
from sfa_vivit.train.stopping import PREEMPTED_EXIT_CODE, Preempted, StopSignals
from sfa_vivit.train.tracking import Dataset, Tracker, TrackingTarget, run_tracker

log = logging.getLogger(__name__)

__all__ = ["train", "Trainer", "TrainError", "Preempted", "NonFiniteLoss", "PREEMPTED_EXIT_CODE"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped after committing the last good state."""


def train(config: TrainConfig, data: str, out: str, init: str | None = None, *,
          tracking: TrackingTarget = TrackingTarget(), force_init: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; returns its metrics (also written to `out`/metrics.json).
    force_init: accept an --init checkpoint of another mode than the one this mode starts from."""
    return Trainer(config, data, out, init, tracking=tracking, force_init=force_init).fit()


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
    def __init__(self, config: TrainConfig, data: str, out: str, init: str | None = None, *,
                 tracking: TrackingTarget = TrackingTarget(), force_init: bool = False):
        self.config, self.data_url, self.out, self.init = config, data, out.rstrip("/"), init
        self.tracking, self.force_init = tracking, force_init
        self.stops = StopSignals()
        try:
            self.runtime = runtime.start(config.device, config.precision)
        except runtime.RuntimeSetupError as e:
            raise TrainError(str(e)) from None
        self.device, self.rank, self.world = self.runtime.device, self.runtime.rank, self.runtime.world
        self.is_main, self.autocast = self.runtime.is_main, self.runtime.autocast
        check_runtime(config, self.runtime, self.out)
        self.local_batch = config.batch_size // self.world
        self.lease = lease_output(config, self.runtime, self.out)
        try:
            self._setup(config, data)
        except BaseException:
            self.release(refused=True)
            raise

    def release(self, *, refused: bool = False) -> None:
        """Give up the output's lease (fit() does at its end; a Trainer not fitted should call it). refused:
        the run never started; the output folder goes too if the lease made it and it is empty."""
        if self.lease is not None:
            self.lease.release(remove_empty_folder=refused)

    def _setup(self, config: TrainConfig, data: str) -> None:
        self.manifest = load_manifest(data)
        self.num_classes = self.manifest.num_classes
        # What the run trains on: the classes and the training split's shards (the validation split may be
        # prepared or repaired later without making the run another run).
        self.data_digest = data_digest(self.manifest, [config.train_split])
        resume = checkpoints.latest_step(self.out)
        torch.manual_seed(config.seed)   # the same initial weights on every rank and every run
        self.model, saved, self.init_extra = start_model(
            config, self.manifest, out=self.out, data_url=self.data_url, data_digest=self.data_digest,
            init=self.init, resume=resume, force_init=self.force_init)
        self.trainable = ready_model(self.model, config, self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.progress = _Progress()
        self.losses = LossWatch(self.runtime)
        if resume is not None:
            self._restore(resume, saved)
        self.ddp_model = self.model
        if self.world > 1 and self.runtime.kind != "xla":     # on XLA, SPMD reduces the gradients
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        check_shards_exist(config, self.manifest, self.data_url)
        self.data = RunData(config, self.manifest, self.runtime)
        self.steps_per_epoch = self.data.steps_per_epoch
        if config.verify_data:
            verify_data(config, self.manifest, self.runtime, self.data_url)
        if self.is_main:
            log.info("%d rank(s) x %d clips = global batch %d; learning rate %.4g (base_lr %g x %s batch scaling to "
                     "%d / %d): the same global batches and rate on any number of ranks", self.world,
                     self.local_batch, config.batch_size, learning_rate(config), config.base_lr, config.lr_scaling,
                     config.batch_size, config.reference_batch_size)

    def _prepare_cache(self) -> None:
        """Build (or reuse, or finish building) the frozen-feature cache; train from it from now on."""
        url = self.config.cache_dir or join(self.out, "feature_cache")
        try:
            self.data.build_cache(self.model, url, should_stop=lambda: bool(self.stops))
        except cache.BuildStopped as e:
            self.tracker.finish("KILLED")
            raise self.stops.preempted(f"during the feature-cache build at {url}: {e}",
                                       "run the same command again to finish it") from None

    def _restore(self, url: str, extra: dict[str, Any]) -> None:
        """Optimizer buffers, learning rates and progress from the checkpoint whose weights are loaded."""
        self.progress = _Progress(**extra["trainer"])
        checkpoints.restore_optimizer(self.model, self.optimizer, checkpoints.load_state(url), extra["optimizer"])
        saved = extra.get("world", {}).get("world_size")
        if saved and saved != self.world:
            # The global batches do not depend on the number of ranks (ClipDataset): the run goes on with
            # the same data; only per-rank random draws (dropout, drop-path, mixup pairs) differ.
            log.info("resuming on %d ranks; the run was on %d", self.world, saved)

    def _save_checkpoint(self) -> str:
        """Commit the current state (after checking that no loss since the last read was non-finite)."""
        self._read_losses()
        url = checkpoints.step_url(self.out, self.progress.step)
        if self.is_main:
            state, optimizer = checkpoints.optimizer_state(self.model, self.optimizer)
            extra = {"trainer": dataclasses.asdict(self.progress), "config": self.config.to_dict(),
                     "optimizer": optimizer, "world": {"world_size": self.world, "workers": self.config.workers},
                     "data": self._trained_on()}
            checkpoints.save(self.model, url, extra=extra, state=state)
            checkpoints.prune_steps(self.out, self.config.keep_checkpoints)
        self.runtime.barrier()
        self.stops.committed_at = time.monotonic()
        return url

    def fit(self, *, stop_after_steps: int | None = None, checkpoint_on_stop: bool = True) -> dict[str, Any]:
        """Train to the end (or resume to it). stop_after_steps: leave after that many steps of this
        call, as a preemption would (with a checkpoint unless checkpoint_on_stop=False, which is a
        hard kill). Raises Preempted on SIGTERM, NonFiniteLoss on a NaN/inf loss."""
        c, p = self.config, self.progress
        self.tracker = self._tracker()
        if self.is_main:
            clips = self.manifest.split(c.train_split)["num_samples"]
            for line in banner(c, self.model, data_url=self.data_url, clips=clips, steps_per_epoch=self.steps_per_epoch,
                               rt=self.runtime, out=self.out, step=p.step, tracking_uri=self.tracker.uri):
                log.info("%s", line)
            import yaml  # the resolved config, to read back with `sfa train --config`
            write_bytes_atomic(join(self.out, "config.yaml"), yaml.safe_dump(c.to_dict(), sort_keys=False).encode())
        steps_this_call = 0
        try:
            self.stops.__enter__()
            if c.cache_views and self.data.cached_train is None:
                self._prepare_cache()
            call_start = time.perf_counter()
            self.stops.said_line()      # the banner (and a cache build) just spoke
            while p.epoch < c.epochs:
                loader = self.runtime.feed(self.data.epoch_batches(p.epoch, p.step_in_epoch))
                start = time.perf_counter()
                session_start_elapsed = p.epoch_elapsed_s
                for batch in self.stops.batches(loader, self._stop):
                    self._step(batch)
                    p.epoch_elapsed_s = session_start_elapsed + (time.perf_counter() - start)
                    steps_this_call += 1
                    flags = self.stops.flags(self.runtime, c.checkpoint_every_minutes, LOG_INTERVAL_S)
                    loss_due = p.step % c.log_every == 0
                    if loss_due or flags.line:
                        self._say_step(steps_this_call / max(time.perf_counter() - call_start, 1e-9), loss=loss_due)
                    if flags.stop:
                        self._stop()
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        if checkpoint_on_stop:
                            self._save_checkpoint()
                        return {"status": "stopped", "step": p.step}
                    if ((flags.checkpoint or (c.checkpoint_every and p.step % c.checkpoint_every == 0))
                            and p.step_in_epoch < self.steps_per_epoch):
                        self._save_checkpoint()
                self.runtime.synchronize()
                p.epoch_elapsed_s = session_start_elapsed + (time.perf_counter() - start)
                self._end_epoch()
                self.stops.said_line()  # the epoch's line (and its validation)
            return self._finish()
        finally:
            self.stops.__exit__()
            self.release()

    def _say_step(self, rate: float, loss: bool) -> None:
        """A progress line: epoch, step, rate and time left, every `log_every` steps with the loss and learning
        rate (read from the device, and logged to MLflow), and in between whenever LOG_INTERVAL_S passed
        without a line (without the loss: where the losses are read stays a function of the step, so the
        epoch's loss does not depend on the machine's speed)."""
        c, p = self.config, self.progress
        value = self._read_losses() if loss else None      # the one host sync of a lazy device's steps
        self.stops.said_line()
        if not self.is_main:
            return
        left = clock((c.epochs * self.steps_per_epoch - p.step) / rate)
        where = f"epoch {p.epoch + 1}/{c.epochs} step {p.step_in_epoch}/{self.steps_per_epoch}"
        if not loss:
            log.info("%s (%.2f steps/s, about %s of training left)", where, rate, left)
            return
        lr = self.optimizer.param_groups[0]["lr"]
        log.info("%s loss %.4f lr %.4g (%.2f steps/s, about %s of training left)", where, value, lr, rate, left)
        self.tracker.log_metrics({"train_loss": value, "lr": lr}, step=p.step)

    def _stop(self) -> None:
        """Commit a checkpoint at the current step and raise Preempted (exit 143 after SIGTERM, 130 after Ctrl-C)."""
        url = self._save_checkpoint()
        self.tracker.finish("KILLED")
        raise self.stops.preempted(f"at step {self.progress.step}: checkpoint committed at {url}",
                                   "run the same command again to resume from it")

    def _step(self, batch: dict[str, Any]) -> float:
        c, p = self.config, self.progress
        # Every random draw of a step (dropout, drop-path, mixup) is a function of (seed, step, rank).
        # Under SPMD the hosts run one program: the same draws on every host (XLA's own RNG varies per row).
        step_seed = _seed(c.seed, p.step, 0 if self.runtime.kind == "xla" else self.rank)
        self.runtime.seed(step_seed)
        # Videos, or cached spatial features (mixup then mixes features: linear, like the first layer),
        # already on the device (`Runtime.feed`).
        name = "features" if "features" in batch else "video"
        inputs = batch[name]
        targets = soft_targets(batch["label"], self.num_classes, c.label_smoothing)
        if c.mixup_alpha > 0:
            inputs, targets = mixup(inputs, targets, c.mixup_alpha, torch.Generator().manual_seed(step_seed))
        lr = learning_rate_at(c, p.step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            out = self.ddp_model(**{name: inputs})
        loss = soft_target_loss(out, targets, self.num_classes)
        if not self.runtime.lazy:
            # Reading the loss costs nothing here: check it before applying it.
            finite = self.runtime.all_reduce(torch.isfinite(loss.detach()).float(), "min")
            if finite.item() < 1:
                url = self._save_checkpoint()
                raise NonFiniteLoss(f"loss is {loss.item()} at step {p.step} (epoch {p.epoch + 1}, batch "
                                    f"{p.step_in_epoch + 1}); stopped before applying it. Last good state: {url}")
        self.losses.add(loss, p.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, c.grad_clip)
        self.optimizer.step()
        self.runtime.step()
        p.step += 1
        p.step_in_epoch += 1

    def _read_losses(self) -> float | None:
        """Read the losses of the steps since the last read (one host sync on a lazy device): add them to
        the epoch's sum and return the last one. Raises NonFiniteLoss when one was not finite on any rank:
        nothing after the last committed checkpoint is kept."""
        p = self.progress
        read, bad = self.losses.read_all(self.runtime)
        if bad:
            last = checkpoints.latest_step(self.out) or "none (no checkpoint yet)"
            raise NonFiniteLoss(f"loss is not finite ({read.last if read else 'on another rank'}) at a step "
                                f"between {read.first_step if read else p.step} and {p.step - 1} (read every "
                                f"log_every={self.config.log_every} steps on this device); nothing after it was "
                                f"committed. Last good state: {last}")
        if read is None:
            return None
        p.epoch_loss_sum += read.total
        return read.last

    def _end_epoch(self) -> None:
        c, p = self.config, self.progress
        self._read_losses()
        epoch_time = p.epoch_elapsed_s
        p.train_time_s += epoch_time
        clips = self.steps_per_epoch * c.batch_size
        record: dict[str, Any] = {"epoch": p.epoch + 1, "loss": p.epoch_loss_sum / max(1, p.step_in_epoch),
                                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": round(epoch_time, 3),
                                  "clips_per_s": round(clips / epoch_time, 3) if epoch_time else None,
                                  "peak_memory_bytes": self.runtime.peak_memory_bytes()}
        if self.data.has_eval and c.eval_every and ((p.epoch + 1) % c.eval_every == 0 or p.epoch + 1 == c.epochs):
            record.update(self._evaluate(c.eval_views))
        if self.runtime.kind == "xla":       # flat after the first epoch when no step makes a new graph
            record["xla_compilations"] = self.runtime.compilations()
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
        return evaluate_model(self.model, self.data.eval_batches(views), self.runtime, num_classes=self.num_classes,
                              batch_size=self.data.eval_batch_size(views))

    def _finish(self) -> dict[str, Any]:
        c, p = self.config, self.progress
        final = self._evaluate(c.final_eval_views) if self.data.has_eval else {}
        metrics = run_metrics(c, p, self.model, rt=self.runtime, cache_report=self.data.cache_report, final=final)
        if self.is_main:
            self.tracker.log_metrics({"train_time_s": metrics["train_time_s"],
                                      **{f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))}},
                                     step=p.epoch)
            self.tracker.finish("FINISHED")
            metrics["mlflow"] = self.tracker.report()
            if metrics["mlflow"]["unlogged"]:
                log.warning("MLflow: %d records could not be logged (kept in metrics.json and %s)",
                            len(metrics["mlflow"]["unlogged"]), metrics["mlflow"]["spool"])
            self._publish(metrics, final)
            top1 = final.get("top1")
            log.info("done: %s in %.1f s of training (%d steps); final top-1 %s (%s views); model %s, metrics %s",
                     c.mode, metrics["train_time_s"], p.step, f"{top1:.2f}%" if top1 is not None else "n/a",
                     c.final_eval_views, join(self.out, checkpoints.FINAL_MODEL), join(self.out, "metrics.json"))
        self.runtime.barrier()
        return metrics

    def _tracker(self) -> Tracker:
        c, p = self.config, self.progress
        tracker = run_tracker(c, self.tracking, out=self.out, data=Dataset(
            self.manifest.dataset, self.data_url, self.data_digest, "training",
            sum(self.manifest.sample_counts(c.train_split).values())), init=self.init,
            stage1_run_id=self.init_extra.get("mlflow_run_id"), run_id=p.mlflow_run_id, enabled=self.is_main)
        if tracker.enabled and p.mlflow_run_id is None:
            tracker.log_params({**c.to_dict(), "lr": learning_rate(c), "steps_per_epoch": self.steps_per_epoch,
                                "world_size": self.world, "data": self.data_url, "init": self.init})
        p.mlflow_run_id = tracker.run_id
        return tracker

    def _publish(self, metrics: dict[str, Any], final: dict[str, Any]) -> None:
        """The final model (with what it is), config.json and metrics.json in the run folder; the same in MLflow."""
        c = self.config
        checkpoints.save(self.model, join(self.out, checkpoints.FINAL_MODEL),
                         extra={"config": c.to_dict(), "mode": c.mode, "mlflow_run_id": self.tracker.run_id,
                                "final": final, "train_time_s": metrics["train_time_s"],
                                "classes": self.manifest.data.get("classes"),
                                "heads": self.manifest.data.get("heads"), "data": self._trained_on()})
        write_bytes_atomic(join(self.out, "config.json"), json.dumps(c.to_dict(), indent=1).encode())
        write_bytes_atomic(join(self.out, "metrics.json"), json_bytes(metrics))
        if "://" not in self.out:        # the run's config, figures and model beside its metrics in MLflow
            for name in ("config.json", "metrics.json"):
                self.tracker.log_artifact(join(self.out, name))
            if c.mlflow_log_model:
                self.tracker.log_model(join(self.out, checkpoints.FINAL_MODEL), self.model.config)

    def _trained_on(self) -> dict[str, Any]:
        return {"url": self.data_url, "digest": self.data_digest, "num_classes": self.num_classes}


def run_metrics(c: TrainConfig, p: _Progress, model: ViViT, *, rt: runtime.Runtime,
                cache_report: cache.CacheReport | None, final: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json says of a finished run (collective: every rank calls it)."""
    top1s = [(h["epoch"], h["top1"]) for h in p.history if h.get("top1") is not None]
    best = max((t for _, t in top1s), default=None)
    # The cache's training views are training work: their build time counts (summed over files,
    # so over ranks too: an upper bound on the wall time with several ranks).
    cache_time = cache_report.train_build_time_s if cache_report else 0.0
    metrics = {
        "mode": c.mode, "recipe": c.recipe, "num_frames": c.num_frames, "epochs": c.epochs,
        "steps": p.step, "batch_size": c.batch_size, "world_size": rt.world,
        "train_time_s": round(p.train_time_s + cache_time, 3),
        "steps_time_s": round(p.train_time_s, 3),
        "cache": dataclasses.asdict(cache_report) if cache_report else None,
        "epoch_time_s": [h["epoch_time_s"] for h in p.history],
        "clips_per_s": [h["clips_per_s"] for h in p.history],
        "top1": [h.get("top1") for h in p.history], "top5": [h.get("top5") for h in p.history],
        "final": {**final, "views": c.final_eval_views},
        "npp_epoch": next((e for e, t in top1s if best is not None and t >= best - 1.0), None),
        "peak_memory_bytes": max((h["peak_memory_bytes"] for h in p.history), default=rt.peak_memory_bytes()),
        "trainable_parameters": model.num_parameters(trainable=True),
        "total_parameters": model.num_parameters(),
        "history": p.history,
        "weights_sha256": weights_digest(model),
    }
    if rt.world > 1 or rt.devices > 1:
        digests = rt.all_gather_object(metrics["weights_sha256"])
        metrics["ranks_identical"] = len(set(digests)) == 1 and rt.replicas_identical(model.state_dict().values())
    metrics["runtime"] = {"device": rt.kind, "devices": rt.devices, "ranks": rt.world,
                          "xla_compilations": rt.compilations(), **runtime.versions()}
    return metrics


def weights_digest(model: torch.nn.Module) -> str:
    return cache.state_digest([model])


def _seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


# Moved in 0.1.x (the old names work until 0.2, with a DeprecationWarning).
_MOVED = {"init_architecture": "sfa_vivit.train.start", "vivit_config": "sfa_vivit.train.start",
          "ARCHITECTURE_FIELDS": "sfa_vivit.train.start", "soft_targets": "sfa_vivit.train.loss",
          "soft_target_loss": "sfa_vivit.train.loss"}


def __getattr__(name: str) -> Any:
    from sfa_vivit._moved import moved_attribute
    return moved_attribute(__name__, name, _MOVED)
