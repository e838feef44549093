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
import signal
import time
from typing import Any

import torch
import torch.nn.functional as F

from sfa_vivit import checkpoints, runtime
from sfa_vivit.data.augment import mixup, one_hot
from sfa_vivit.data.manifest import data_digest, load_manifest, verify_shards
from sfa_vivit.lease import Lease, LeaseHeld, lease_key
from sfa_vivit.models.vivit import ViViT, ViViTConfig, architecture_differences, init_from, set_training_switches, vivit
from sfa_vivit.progress import clock
from sfa_vivit.storage import join, json_bytes, write_bytes_atomic
from sfa_vivit.train import cache
from sfa_vivit.train.config import RENAMED_RECIPES, TrainConfig, learning_rate, learning_rate_at, make_optimizer
from sfa_vivit.train.evaluation import evaluate_model
from sfa_vivit.train.run_data import RunData
from sfa_vivit.train.tracking import Dataset, Tracker, TrackingTarget

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the pod did not finish; Kubernetes/KFP retry it


class TrainError(ValueError):
    """The run cannot start: its inputs contradict each other (found before any training)."""


class Preempted(RuntimeError):
    """SIGTERM (or Ctrl-C) arrived; a checkpoint was committed and the run stopped. Start it again to resume.
    `exit_code`: 143 after SIGTERM (Kubernetes and KFP retry the pod), 130 after Ctrl-C."""

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code


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
        self._stop_signal: int | None = None
        self._stop_said = False
        self._committed_at = time.monotonic()   # the last checkpoint commit (or the start)
        try:
            self.runtime = runtime.start(config.device, config.precision)
        except runtime.RuntimeSetupError as e:
            raise TrainError(str(e)) from None
        self.device, self.rank, self.world = self.runtime.device, self.runtime.rank, self.runtime.world
        self.is_main, self.autocast = self.runtime.is_main, self.runtime.autocast
        if config.batch_size % self.runtime.batch_multiple:
            raise TrainError(f"batch_size={config.batch_size} is not divisible by the job's "
                             f"{self.runtime.batch_multiple} devices ({self.runtime.describe()})")
        if self.runtime.spmd_hosts and config.cache_views:
            raise TrainError("cache_views on a multi-host TPU slice: the feature cache is built per host, which one "
                             "SPMD program over every host cannot do; train stage 2 from videos there, or on one host")
        if config.compile and self.runtime.kind == "xla":
            raise TrainError("compile=true is for CPU and CUDA (torch.compile); on XLA every step is compiled "
                             "as one graph already")
        self.local_batch = config.batch_size // self.world
        inside = checkpoints.committed_ancestor(self.out)
        if inside is not None:
            raise TrainError(f"--out {self.out} is {'a' if inside.rstrip('/') == self.out.rstrip('/') else 'inside a'} "
                             f"committed checkpoint ({inside}); a run writes a run folder of its own: use another "
                             "--out (and pass the checkpoint as --init to start from it)")
        self.lease, failure = None, None
        if self.is_main:
            try:
                self.lease = Lease(self.out, f"sfa train ({config.mode})", key=lease_key()).acquire()
            except (LeaseHeld, OSError) as e:
                failure = e
        # Every rank learns whether rank 0 holds the output, so none goes on alone into a collective.
        if self.world > 1 and not self.runtime.spmd_hosts:
            held = self.runtime.all_reduce(torch.tensor([0.0 if failure else 1.0]), "min")
            if not failure and not self.is_main and held.item() < 1:
                raise TrainError(f"rank 0 could not take the lease on {self.out}; see its error")
        if failure is not None:
            raise failure
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
        self.model, saved, self.init_extra = self._build_model(resume)
        try:    # the paper's Table 1 switches
            set_training_switches(self.model, adapter=config.adapter, adapter_dim=config.adapter_dim,
                                  freeze_spatial=config.freeze_spatial, freeze_temporal=config.freeze_temporal,
                                  spatial_chunk=config.spatial_chunk)
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.model.to(self.device)
        if config.compile:
            self.model.spatial.compile()
            self.model.temporal.compile()
        self.trainable = self.model.trainable_parameters()
        if not self.trainable:
            raise TrainError("nothing to train: every parameter is frozen (check freeze_spatial/freeze_temporal)")
        self.optimizer = make_optimizer(config, self.model)
        self.progress = _Progress()
        self.losses = _LossWatch(self.runtime)
        if resume is not None:
            self._restore(resume, saved)
        self.ddp_model = self.model
        if self.world > 1 and self.runtime.kind != "xla":     # on XLA, SPMD reduces the gradients
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._check_shards_exist()
        self.data = RunData(config, self.manifest, self.runtime)
        self.steps_per_epoch = self.data.steps_per_epoch
        if config.verify_data:
            self._verify_data()
        if self.is_main:
            log.info("%d rank(s) x %d clips = global batch %d; learning rate %.4g (base_lr %g x %s batch scaling to "
                     "%d / %d): the same global batches and rate on any number of ranks", self.world,
                     self.local_batch, config.batch_size, learning_rate(config), config.base_lr, config.lr_scaling,
                     config.batch_size, config.reference_batch_size)

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------
    def _build_model(self, resume: str | None) -> tuple[ViViT, dict[str, Any], dict[str, Any]]:
        """The model, the resumed checkpoint's extra ({} for a new run) and the --init's extra ({})."""
        c = self.config
        if resume is not None:
            loaded, extra = checkpoints.load(resume)
            now = c.to_dict()
            stored = _as_today(extra.get("config", {}), now)
            changed = {k for k in set(stored) | set(now) if stored.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES}
            if changed:
                raise TrainError(f"{self.out} holds a run with a different config ({sorted(changed)} differ); "
                                 "use another --out, or the same settings to resume it")
            trained_on = extra.get("data", {})
            if trained_on.get("digest") not in (None, self.data_digest):
                raise TrainError(f"{self.out} holds a run trained on other data ({trained_on.get('url')}, "
                                 f"{trained_on.get('num_classes')} classes) than {self.data_url} "
                                 f"({self.num_classes} classes): its shards or classes differ; use another --out, "
                                 "or the data it was trained on to resume it")
            log.info("resuming from %s", resume)
            return loaded, extra, {}
        if c.mode == "stage2" and not self.init:
            raise TrainError("mode stage2 needs --init: the stage-1 run's output folder or checkpoint")
        if c.temporal_init == "stage1" and not self.init:
            raise TrainError("temporal_init=stage1 needs --init (a stage-1 checkpoint)")
        expected = vivit_config(c.variant, num_frames=c.num_frames, image_size=c.image_size,
                                num_classes=self.num_classes, drop_path=c.drop_path, dropout=c.dropout,
                                spatial_chunk=c.spatial_chunk, **c.model)
        if not self.init:
            model = ViViT(expected)
            if c.image_checkpoint:
                from sfa_vivit.importers import load_image_vit
                load_image_vit(model, c.image_checkpoint)
            elif c.freeze_spatial:
                log.warning("freeze_spatial without --init or image_checkpoint freezes a random spatial encoder")
            return model, {}, {}
        if c.image_checkpoint:
            log.warning("image_checkpoint=%s is not used: --init %s supplies every weight, the spatial "
                        "encoder included", c.image_checkpoint, self.init)
        try:
            url = checkpoints.resolve_model(self.init)
        except checkpoints.CheckpointError as e:
            raise TrainError(f"--init {e}") from None
        loaded, extra = checkpoints.load(url)
        self._check_init_mode(url, extra)
        diff = architecture_differences(loaded.config, expected)
        if diff:
            raise TrainError(f"--init {url} is another architecture than this run asks for ("
                             f"{'; '.join(diff)}); set variant / model.* / image_size to match it")
        if loaded.config.num_classes != expected.num_classes and not c.reinit_head:
            raise TrainError(f"--init {url} predicts {loaded.config.num_classes} classes but {self.data_url} has "
                             f"{expected.num_classes}; set reinit_head=true to start a new head (cross-dataset init)")
        names = {"classes": extra.get("classes") or (extra.get("data") or {}).get("classes"),
                 "heads": extra.get("heads") or (extra.get("data") or {}).get("heads")}
        other_names = any(theirs is not None and self.manifest.data.get(field) is not None
                          and theirs != self.manifest.data.get(field) for field, theirs in names.items())
        if other_names and not c.reinit_head:
            raise TrainError(f"--init {url} was trained on other class names than {self.data_url} has "
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

    def _check_shards_exist(self) -> None:
        """Every shard the manifest lists for the splits this run reads is there, before the first step
        (a missing one would otherwise surface at the end of an epoch). One listing per folder."""
        c = self.config
        splits = [s for s in dict.fromkeys([c.train_split, c.eval_split]) if s in self.manifest.data["splits"]]
        urls = [u for s in splits for u in self.manifest.shard_urls(s)]
        from sfa_vivit.storage import url_to_fs
        listed: dict[str, set[str]] = {}
        missing = []
        for u in urls:
            folder, name = u.rsplit("/", 1) if "/" in u else (".", u)
            if folder not in listed:
                fs, path = url_to_fs(folder)
                try:
                    listed[folder] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
                except FileNotFoundError:
                    listed[folder] = set()
            if name not in listed[folder]:
                missing.append(u)
        rates = {s: (self.manifest.split(s).get("options") or self.manifest.data.get("options", {})).get("fps")
                 for s in splits}
        if len(set(rates.values())) > 1 and not c.mixed_prep:
            raise TrainError(f"{self.data_url}: the splits this run reads were prepared at other frame rates "
                             f"({', '.join(f'{s} {fps} fps' for s, fps in rates.items())}): training and validation "
                             "would span other lengths of time. Prepare them with the same --fps, or set "
                             "mixed_prep=true to accept it")
        if missing:
            raise TrainError(f"{len(missing)} of the {len(urls)} shards {self.data_url}/manifest.json lists for "
                             f"{'/'.join(splits)} are missing (first: {missing[0]}); run `sfa data prep` again to "
                             "write them, or `sfa data verify` to list every damaged or missing shard")

    def _check_init_mode(self, url: str, extra: dict[str, Any]) -> None:
        """Stage 2 starts from a stage-1 model: refuse another mode's checkpoint unless forced."""
        c = self.config
        mode = extra.get("mode") or extra.get("config", {}).get("mode")
        wanted = _INIT_FROM.get(c.mode)
        if wanted and mode and mode not in wanted:
            message = (f"--init {url} is a {mode} checkpoint; mode {c.mode} starts from a {' or '.join(wanted)} "
                       "model")
            if not self.force_init:
                raise TrainError(message + " (pass --force-init to use it anyway)")
            log.warning("%s; used anyway (--force-init)", message)

    def _verify_data(self) -> None:
        """verify_data: every shard of the splits this run reads matches its sha256 (ranks share the work)."""
        c = self.config
        splits = [s for s in (c.train_split, c.eval_split) if s in self.manifest.data["splits"]]
        if self.is_main:
            log.info("verify_data: checking the sha256 of every shard of %s in %s", splits, self.data_url)
        bad = verify_shards(self.manifest, splits, rank=self.rank, world=self.world)
        total = self.runtime.all_reduce(torch.tensor([float(len(bad))]), "sum")
        if total.item() > 0:
            named = f": {', '.join(bad[:5])}" if bad else ""
            raise TrainError(f"verify_data: {int(total.item())} shard(s) of {self.data_url} do not match their "
                             f"sha256{named}; run prep again to rewrite them")

    def _prepare_cache(self) -> None:
        """Build (or reuse, or finish building) the frozen-feature cache; train from it from now on."""
        url = self.config.cache_dir or join(self.out, "feature_cache")
        try:
            r = self.data.build_cache(self.model, url, should_stop=lambda: bool(self._stop_signal))
        except cache.BuildStopped as e:
            self.tracker.finish("KILLED")
            what = "interrupted (Ctrl-C)" if self._stop_signal == signal.SIGINT else "SIGTERM"
            raise Preempted(f"{what} during the feature-cache build at {url}: {e}; run the same command again to "
                            "finish it", 130 if self._stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE) from None
        if self.is_main:
            log.info("feature cache %s: %d clips x %d views, %.1f MB (%.1f KB per clip), built in %.1f s "
                     "(%d files now)", url, r.clips, r.train_views, r.size_bytes / 1e6, r.bytes_per_clip / 1e3,
                     r.train_build_time_s + r.eval_build_time_s, r.built_now)

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
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
        self._committed_at = time.monotonic()
        return url

    # ------------------------------------------------------------------------------------------
    # Train
    # ------------------------------------------------------------------------------------------
    def fit(self, *, stop_after_steps: int | None = None, checkpoint_on_stop: bool = True) -> dict[str, Any]:
        """Train to the end (or resume to it). stop_after_steps: leave after that many steps of this
        call, as a preemption would (with a checkpoint unless checkpoint_on_stop=False, which is a
        hard kill). Raises Preempted on SIGTERM, NonFiniteLoss on a NaN/inf loss."""
        c, p = self.config, self.progress
        self.tracker = self._tracker()
        if self.is_main:
            self._banner()
            import yaml  # the resolved config, to read back with `sfa train --config`
            write_bytes_atomic(join(self.out, "config.yaml"), yaml.safe_dump(c.to_dict(), sort_keys=False).encode())
        previous = ({s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                    if _main_thread() else {})
        steps_this_call = 0
        try:
            if c.cache_views and self.data.cached_train is None:
                self._prepare_cache()
            call_start = time.perf_counter()
            while p.epoch < c.epochs:
                loader = self.runtime.feed(self.data.epoch_batches(p.epoch, p.step_in_epoch))
                start = time.perf_counter()
                session_start_elapsed = p.epoch_elapsed_s
                for batch in self._batches(loader):
                    self._step(batch)
                    p.epoch_elapsed_s = session_start_elapsed + (time.perf_counter() - start)
                    steps_this_call += 1
                    if p.step % c.log_every == 0:
                        loss = self._read_losses()      # the one host sync of a lazy device's steps
                        if self.is_main:
                            lr = self.optimizer.param_groups[0]["lr"]
                            rate = steps_this_call / max(time.perf_counter() - call_start, 1e-9)
                            left = (c.epochs * self.steps_per_epoch - p.step) / rate
                            log.info("epoch %d/%d step %d/%d loss %.4f lr %.4g (%.2f steps/s, about %s of "
                                     "training left)", p.epoch + 1, c.epochs, p.step_in_epoch, self.steps_per_epoch,
                                     loss, lr, rate, clock(left))
                            self.tracker.log_metrics({"train_loss": loss, "lr": lr}, step=p.step)
                    stop, due = self._step_flags()
                    if stop:
                        self._stop()
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        if checkpoint_on_stop:
                            self._save_checkpoint()
                        return {"status": "stopped", "step": p.step}
                    if ((due or (c.checkpoint_every and p.step % c.checkpoint_every == 0))
                            and p.step_in_epoch < self.steps_per_epoch):
                        self._save_checkpoint()
                self.runtime.synchronize()
                p.epoch_elapsed_s = session_start_elapsed + (time.perf_counter() - start)
                self._end_epoch()
            return self._finish()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.release()

    def _batches(self, loader: Any) -> Any:
        """The loader's batches; when a stop signal has arrived and the loader fails (its workers, signalled
        with the whole process group, are gone), the run stops here, between steps, with a checkpoint."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError:
                if not self._stop_signal:
                    raise
                return self._stop()
            yield batch

    def _stop(self) -> None:
        """Commit a checkpoint at the current step and raise Preempted (exit 143 after SIGTERM, 130 after Ctrl-C)."""
        p = self.progress
        url = self._save_checkpoint()
        self.tracker.finish("KILLED")
        what = "interrupted (Ctrl-C)" if self._stop_signal == signal.SIGINT else "SIGTERM"
        raise Preempted(f"{what} at step {p.step}: checkpoint committed at {url}; run the same command again to "
                        "resume from it", 130 if self._stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE)

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
        read = self.losses.read()
        bad = self.runtime.all_reduce(torch.tensor([0.0 if read is None else float(read.bad)]), "max")
        if bad.item() > 0:
            last = checkpoints.latest_step(self.out)
            first = read.first_step if read is not None else p.step
            raise NonFiniteLoss(f"loss is not finite ({read.last if read else 'on another rank'}) at a step "
                                f"between {first} and {p.step - 1} (read every log_every={self.config.log_every} "
                                "steps on this device); nothing after it was committed. Last good state: "
                                f"{last or 'none (no checkpoint yet)'}")
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

    # ------------------------------------------------------------------------------------------
    # Cleanup
    # ------------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        c, p = self.config, self.progress
        final = self._evaluate(c.final_eval_views) if self.data.has_eval else {}
        metrics = run_metrics(c, p, self.model, world=self.world, cache_report=self.data.cache_report, final=final,
                              peak_memory=self.runtime.peak_memory_bytes())
        model = self.model
        if self.world > 1 or self.runtime.devices > 1:
            digests = self.runtime.all_gather_object(metrics["weights_sha256"])
            metrics["ranks_identical"] = (len(set(digests)) == 1
                                          and self.runtime.replicas_identical(model.state_dict().values()))
        metrics["runtime"] = {"device": self.runtime.kind, "devices": self.runtime.devices, "ranks": self.world,
                              "xla_compilations": self.runtime.compilations(), **runtime.versions()}
        if self.is_main:
            self.tracker.log_metrics({"train_time_s": metrics["train_time_s"],
                                      **{f"final_{k}": v for k, v in final.items() if isinstance(v, (int, float))}},
                                     step=p.epoch)
            self.tracker.finish("FINISHED")
            metrics["mlflow"] = self.tracker.report()
            if metrics["mlflow"]["unlogged"]:
                log.warning("MLflow: %d records could not be logged (kept in metrics.json and %s)",
                            len(metrics["mlflow"]["unlogged"]), metrics["mlflow"]["spool"])
            checkpoints.save(model, join(self.out, checkpoints.FINAL_MODEL),
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
                    self.tracker.log_model(join(self.out, checkpoints.FINAL_MODEL), model.config)
            top1 = final.get("top1")
            log.info("done: %s in %.1f s of training (%d steps); final top-1 %s (%s views); model %s, metrics %s",
                     c.mode, metrics["train_time_s"], p.step, f"{top1:.2f}%" if top1 is not None else "n/a",
                     c.final_eval_views, join(self.out, checkpoints.FINAL_MODEL), join(self.out, "metrics.json"))
        self.runtime.barrier()
        return metrics

    # ------------------------------------------------------------------------------------------
    # Side systems
    # ------------------------------------------------------------------------------------------
    def _tracker(self) -> Tracker:
        c, p = self.config, self.progress
        tags = {"sfa.mode": c.mode, "sfa.recipe": c.recipe, "sfa.data": self.data_url, "sfa.out": self.out}
        if self.init_extra.get("mlflow_run_id"):
            tags["sfa.stage1_run_id"] = self.init_extra["mlflow_run_id"]
        spool = join(self.out, "mlflow_unlogged.jsonl") if "://" not in self.out else None
        clips = sum(self.manifest.sample_counts(c.train_split).values())
        dataset = Dataset(self.manifest.dataset, self.data_url, self.data_digest, "training", clips)
        tracker = Tracker(self.tracking.resolve_uri(self.out), c.mlflow_experiment, f"{c.mode}-{c.num_frames}f",
                          enabled=self.is_main and self.tracking.enabled, run_id=p.mlflow_run_id,
                          parent_run_id=self.tracking.parent_run_id, tags=tags, spool=spool,
                          description=self._description(clips), dataset=dataset,
                          follows=self.init_extra.get("mlflow_run_id"))
        if tracker.enabled and p.mlflow_run_id is None:
            tracker.log_params({**c.to_dict(), "lr": learning_rate(c), "steps_per_epoch": self.steps_per_epoch,
                                "world_size": self.world, "data": self.data_url, "init": self.init})
        p.mlflow_run_id = tracker.run_id
        return tracker

    def _description(self, clips: int) -> str:
        """What this run is, in a sentence (MLflow's run description)."""
        c = self.config
        model = f"ViViT-{c.variant} FE"
        origin = (f"from {self.init}" if self.init else
                  f"from the image checkpoint {c.image_checkpoint}" if c.image_checkpoint else "from scratch")
        where = f"{clips} {self.manifest.dataset} training clips of {c.num_frames} frames, {c.epochs} epochs"
        if c.mode == "stage1":
            return f"SFA stage 1: the whole {model} trained on {where}, {origin}."
        if c.mode == "stage2":
            stage1 = self.init_extra.get("mlflow_run_id")
            cached = f", from a cache of {c.cache_views} frozen-feature views per clip" if c.cache_views else ""
            return (f"SFA stage 2: spatial encoder frozen, {'adapter and ' if c.adapter else ''}temporal encoder "
                    f"trained on {where}{cached}; {origin}" + (f" (stage 1: MLflow run {stage1})." if stage1 else "."))
        return f"The conventional recipe ({c.mode}): the whole {model} trained on {where}, {origin}."

    def _banner(self) -> None:
        """What this run is about to do, before the first step."""
        c, p, m = self.config, self.progress, self.model
        bf16 = self.runtime.bf16
        lines = [
            f"sfa train: {c.mode} ({c.recipe} recipe) on {self.data_url}",
            f"  model      ViViT-{c.variant} FE, {c.num_frames} frames at {c.image_size} px; "
            f"{m.num_parameters(trainable=True) / 1e6:.2f}M of {m.num_parameters() / 1e6:.2f}M parameters trained",
            f"  data       {self.manifest.split(c.train_split)['num_samples']} training clips, {self.steps_per_epoch} "
            f"steps per epoch of {c.batch_size} clips, {c.epochs} epochs",
            f"  compute    {self.runtime.describe()}, {'bf16 autocast' if bf16 else 'fp32'}",
            f"  outputs    {self.out} (checkpoints every "
            f"{f'{c.checkpoint_every} steps' if c.checkpoint_every else 'epoch'}"
            f"{f' and {c.checkpoint_every_minutes:g} min' if c.checkpoint_every_minutes else ''}; "
            f"{f'resuming at step {p.step}' if p.step else 'a new run'})",
            f"  tracking   MLflow {self.tracker.uri} (experiment {c.mlflow_experiment})",
        ]
        for line in lines:
            log.info("%s", line)

    def _trained_on(self) -> dict[str, Any]:
        return {"url": self.data_url, "digest": self.data_digest, "num_classes": self.num_classes}

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: finish this step, commit a checkpoint, stop. A second Ctrl-C stops at once."""
        # No logging here: a handler runs between two bytecodes of the main thread, maybe inside a log handler's
        # write, and a re-entered write fails. The step loop says it (_should_stop), at the end of this step.
        self._stop_signal = self._stop_signal or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _step_flags(self) -> tuple[bool, bool]:
        """(stop, checkpoint due) at the end of a step, the same on every rank (one collective for both): stop
        when any rank got a signal; a checkpoint is due when `checkpoint_every_minutes` have passed on any
        rank since the last commit (a preemption then loses minutes, not an epoch)."""
        if self._stop_signal and not self._stop_said:
            self._stop_said = True
            log.warning("%s: checkpointing at the end of this step, then stopping%s",
                        "Ctrl-C" if self._stop_signal == signal.SIGINT else "SIGTERM",
                        " (Ctrl-C again to stop without it)" if self._stop_signal == signal.SIGINT else "")
        minutes = self.config.checkpoint_every_minutes
        due = bool(minutes) and time.monotonic() - self._committed_at >= minutes * 60
        flags = self.runtime.all_reduce(torch.tensor([1.0 if self._stop_signal else 0.0, 1.0 if due else 0.0]), "max")
        stop, due = flags.tolist()           # one host sync for both
        return bool(stop), bool(due)


@dataclasses.dataclass
class _LossRead:
    total: float          # the sum of the losses read
    last: float           # the last step's loss
    bad: bool             # one of them was not finite
    first_step: int       # the step of the first of them


class _LossWatch:
    """The training losses kept on the device between reads, so that a step never waits for the host.
    A read leaves zeroed sums behind that the device has computed (buffers, like the sums of any step,
    not constants of the next step's graph), so every step after the first has the same graph."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.sum: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None
        self.first_step: int | None = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.sum is None:
            self.sum, self.bad = torch.zeros_like(loss), torch.zeros_like(loss)
        if self.first_step is None:
            self.first_step = step
        self.sum = self.sum + loss
        self.bad = torch.maximum(self.bad, (~torch.isfinite(loss)).float())
        self.last = loss

    def read(self) -> _LossRead | None:
        """The losses since the last read (None when there were none); empties the watch."""
        if self.first_step is None:
            return None
        total, last, bad = torch.stack([self.sum, self.last, self.bad]).cpu().tolist()
        read = _LossRead(total, last, bad > 0, self.first_step)
        self.sum, self.bad = torch.zeros_like(self.sum), torch.zeros_like(self.bad)
        self.rt.step()
        self.first_step = None
        return read


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
    the same as today's default when weight_decay is 0); other new fields their default."""
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


def run_metrics(c: TrainConfig, p: _Progress, model: ViViT, *, world: int, cache_report: cache.CacheReport | None,
                final: dict[str, Any], peak_memory: int) -> dict[str, Any]:
    """What metrics.json says of a finished run."""
    top1s = [(h["epoch"], h["top1"]) for h in p.history if h.get("top1") is not None]
    best = max((t for _, t in top1s), default=None)
    # The cache's training views are training work: their build time counts (summed over files,
    # so over ranks too: an upper bound on the wall time with several ranks).
    cache_time = cache_report.train_build_time_s if cache_report else 0.0
    return {
        "mode": c.mode, "recipe": c.recipe, "num_frames": c.num_frames, "epochs": c.epochs,
        "steps": p.step, "batch_size": c.batch_size, "world_size": world,
        "train_time_s": round(p.train_time_s + cache_time, 3),
        "steps_time_s": round(p.train_time_s, 3),
        "cache": dataclasses.asdict(cache_report) if cache_report else None,
        "epoch_time_s": [h["epoch_time_s"] for h in p.history],
        "clips_per_s": [h["clips_per_s"] for h in p.history],
        "top1": [h.get("top1") for h in p.history], "top5": [h.get("top5") for h in p.history],
        "final": {**final, "views": c.final_eval_views},
        "npp_epoch": next((e for e, t in top1s if best is not None and t >= best - 1.0), None),
        "peak_memory_bytes": max((h["peak_memory_bytes"] for h in p.history), default=peak_memory),
        "trainable_parameters": model.num_parameters(trainable=True),
        "total_parameters": model.num_parameters(),
        "history": p.history,
        "weights_sha256": weights_digest(model),
    }


def soft_targets(labels: Any, num_classes: int | dict[str, int], smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets (B, total classes), several heads concatenated in order."""
    if isinstance(num_classes, dict):
        return torch.cat([one_hot(labels[h], k, smoothing) for h, k in num_classes.items()], dim=-1)
    return one_hot(labels, num_classes, smoothing)


def soft_target_loss(out: Any, targets: torch.Tensor, num_classes: int | dict[str, int]) -> torch.Tensor:
    """Cross-entropy against soft targets, summed over heads (fp32 whatever the autocast)."""
    logits = torch.cat(list(out.values()), dim=-1) if isinstance(out, dict) else out
    sizes = list(num_classes.values()) if isinstance(num_classes, dict) else [num_classes]
    loss = 0.0
    for lg, tg in zip(logits.float().split(sizes, dim=-1), targets.split(sizes, dim=-1)):
        loss = loss + (-(tg * F.log_softmax(lg, dim=-1)).sum(-1)).mean()
    return loss


def weights_digest(model: torch.nn.Module) -> str:
    return cache.state_digest([model])


def _seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
