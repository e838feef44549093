"""MLflow tracking that never stops a training run.

Every call goes through `Tracker`, which turns a failure (server down, network partition, bad
credentials) into a recorded error: the metric, param or tag is kept in memory and appended to a
local JSONL file, and sent again, in order, once the server answers. HTTP retries are capped (2
retries, 10 s timeout, unless MLFLOW_HTTP_REQUEST_* say otherwise) and a failed server is not
called again for `retry_interval_s`, so an outage costs seconds, not an hour of retries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any

log = logging.getLogger(__name__)

# Bounded retries unless the user chose otherwise (MLflow's default retries for minutes).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# No download bars from logging a model (a log or a pod shows every redraw as a line).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """Where a run is tracked: the MLflow URI (None: `default_tracking_uri` of the run's outputs; `none`:
    not tracked, by choice) and the parent run it belongs to (a pipeline run's), if any."""
    uri: str | None = None
    parent_run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.uri != UNTRACKED

    def resolve_uri(self, out: str) -> str:
        return self.uri or default_tracking_uri(out)


# The tracking URI that turns tracking off, said explicitly (a pipeline's `tracking_uri=none`).
UNTRACKED = "none"


def default_tracking_uri(out: str) -> str:
    """MLFLOW_TRACKING_URI if set, else `mlflow.db` (SQLite) in the folder that holds the run folder `out`:
    runs/stage1 and runs/stage2 share runs/mlflow.db, so one experiment's runs are in one store (in the
    working folder when the outputs are remote)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = "://" not in out or out.startswith("file://")
    folder = os.path.dirname(os.path.abspath(out.removeprefix("file://").rstrip("/"))) if local else os.getcwd()
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment in a SQLite store keeps its artifacts: `mlartifacts/` beside the database file,
    not `./mlruns` of whatever folder the process happens to run in. None (the server decides) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A run's data as MLflow records an input: the prepared shards' manifest (its URI and digest)."""
    name: str           # the dataset (kinetics400, synthetic, ...)
    uri: str            # the prep output folder
    digest: str         # of the manifest's content: the same digest, the same shards
    context: str = "training"
    clips: int | None = None

    def as_input(self) -> Any:
        from mlflow.entities import Dataset as MlflowDataset
        from mlflow.entities import DatasetInput, InputTag
        profile = json.dumps({"clips": self.clips}) if self.clips is not None else None
        return DatasetInput(MlflowDataset(name=self.name, digest=self.digest[:36], source_type="sfa-vivit-shards",
                                          source=json.dumps({"uri": self.uri}), profile=profile),
                            tags=[InputTag("mlflow.data.context", self.context)])


class Tracker:
    """One MLflow run. Methods never raise; `report()` says what could not be logged."""

    def __init__(self, uri: str, experiment: str, run_name: str, *, enabled: bool = True,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 spool: str | None = None, retry_interval_s: float = 60.0, description: str = "",
                 dataset: Dataset | None = None, follows: str | None = None):
        """A new run named `run_name` (a child of `parent_run_id` when given), or the existing `run_id`.
        `description`: what the run is, shown by MLflow's UI; `dataset`: the data it trained or evaluated on,
        logged as the run's input; `follows`: the run this one continues (a stage 2's stage 1): with no
        `parent_run_id`, the new run is nested under it when it is in the same store and experiment."""
        self.uri, self.experiment, self.run_name, self.parent_run_id = uri, experiment, run_name, parent_run_id
        self.follows = follows
        self.enabled, self.run_id, self.tags = enabled, run_id, dict(tags or {})
        if description:
            self.tags["mlflow.note.content"] = description
        self.dataset = dataset
        self.spool, self.retry_interval_s = spool, retry_interval_s
        self.client = None
        self.errors: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self._down_since: float | None = None
        if enabled:
            self._connect()

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> bool:
        try:
            from mlflow.tracking import MlflowClient
            client = MlflowClient(tracking_uri=self.uri)
            if self.run_id is None:
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.uri))
                parent_id = self.parent_run_id or self._followed(client, exp_id)
                parent = {"mlflow.parentRunId": parent_id} if parent_id else {}
                tags = {**self.tags, **parent}
                self.run_id = client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
                if self.dataset is not None:
                    client.log_inputs(self.run_id, datasets=[self.dataset.as_input()])
            else:
                client.get_run(self.run_id)
            self.client = client
            self._down_since = None
            return True
        except Exception as e:  # noqa: BLE001 - any tracking failure is non-fatal by design
            self._failed("connect", e)
            return False

    def _followed(self, client: Any, experiment_id: str) -> str | None:
        """`follows` when that run is in this store and experiment (so MLflow's UI shows this run under it)."""
        if not self.follows:
            return None
        try:
            return self.follows if client.get_run(self.follows).info.experiment_id == experiment_id else None
        except Exception:  # noqa: BLE001 - another store's run (or none): the tag still names it
            return None

    def _failed(self, what: str, error: Exception) -> None:
        message = f"{what}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if not self.errors or self.errors[-1] != message:
            log.warning("MLflow unavailable (%s); training goes on, metrics are kept locally", message)
        self.errors.append(message)
        self._down_since = time.monotonic()

    def _available(self) -> bool:
        if not self.enabled:
            return False
        if self._down_since is not None and time.monotonic() - self._down_since < self.retry_interval_s:
            return False
        return self.client is not None or self._connect()

    # -- logging ------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._submit({"kind": "params", "params": _flatten(params)})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._submit({"kind": "metrics", "metrics": clean, "step": step, "timestamp": int(time.time() * 1000)})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (the report, config.json, metrics.json, plots)."""
        self._submit({"kind": "artifact", "path": os.path.abspath(local_path), "artifact_path": artifact_path})

    def log_model(self, checkpoint: str, config: Any) -> None:
        """The checkpoint folder as an MLflow model (`sfa_vivit.models.mlflow_model`, logged from code: nothing is
        pickled) with the signature of `config` (a ViViTConfig): float32 (-1, T, C, H, W) in, logits out.
        A failure is reported like any other tracking failure and never stops the run."""
        if not self.enabled or not self._available():
            return
        try:
            import mlflow
            import numpy as np
            from mlflow.models import ModelSignature
            from mlflow.types import Schema, TensorSpec

            from sfa_vivit import __version__
            from sfa_vivit.models import mlflow_model
            heads = config.num_classes if isinstance(config.num_classes, dict) else {"logits": config.num_classes}
            signature = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config.num_frames, config.in_channels,
                                                                 config.image_size, config.image_size), "videos")]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n), name) for name, n in heads.items()]))
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
                # The signature says what goes in; an example video would add megabytes to every run.
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                mlflow.pyfunc.log_model(name="model", python_model=mlflow_model.__file__,
                                        artifacts={"checkpoint": os.path.abspath(checkpoint)}, signature=signature,
                                        pip_requirements=[f"sfa-vivit=={__version__}"])
        except Exception as e:  # noqa: BLE001 - the model stays in the run folder either way
            self._failed("log model", e)

    def finish(self, status: str = "FINISHED") -> None:
        self._submit({"kind": "end", "status": status})

    def _submit(self, item: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.pending.append(item)
        if self._available():
            self._flush()
        elif self.spool:
            self._spool(item)

    def _flush(self) -> None:
        from mlflow.entities import Metric, Param
        while self.pending:
            item = self.pending[0]
            try:
                if item["kind"] == "params":
                    params = [Param(k, v) for k, v in item["params"].items()]
                    for i in range(0, len(params), 100):
                        self.client.log_batch(self.run_id, params=params[i:i + 100])
                elif item["kind"] == "metrics":
                    self.client.log_batch(self.run_id, metrics=[
                        Metric(k, v, item["timestamp"], item["step"]) for k, v in item["metrics"].items()])
                elif item["kind"] == "artifact":
                    self.client.log_artifact(self.run_id, item["path"], item["artifact_path"])
                else:
                    self.client.set_terminated(self.run_id, status=item["status"])
            except Exception as e:  # noqa: BLE001
                self._failed(f"log {item['kind']}", e)
                if self.spool:
                    for queued in self.pending:
                        self._spool(queued)
                return
            self.pending.pop(0)

    def _spool(self, item: dict[str, Any]) -> None:
        if item.get("_spooled"):
            return
        item["_spooled"] = True
        try:
            with open(self.spool, "a") as f:
                f.write(json.dumps({k: v for k, v in item.items() if k != "_spooled"}) + "\n")
        except OSError as e:
            log.warning("cannot write the local MLflow spool %s: %s", self.spool, e)

    def report(self) -> dict[str, Any]:
        """What reached MLflow and what did not (for metrics.json and the final log line)."""
        if self.enabled and self.pending and self._down_since is not None:
            self._down_since = None      # one last attempt at the end of the run
            if self._available():
                self._flush()
        unlogged = list(self.pending)
        return {"tracking_uri": self.uri, "run_id": self.run_id, "enabled": self.enabled,
                "errors": self.errors[:10], "num_errors": len(self.errors),
                "unlogged": [{k: v for k, v in i.items() if k != "_spooled"} for i in unlogged],
                "spool": self.spool if unlogged else None}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]   # MLflow's limit on a param value
    return out


def run_description(c: Any, init: str | None, dataset: str, clips: int, stage1_run_id: str | None = None) -> str:
    """What a training run is, in a sentence (MLflow's run description). `c`: its TrainConfig."""
    model = f"ViViT-{c.variant} FE"
    origin = (f"from {init}" if init else
              f"from the image checkpoint {c.image_checkpoint}" if c.image_checkpoint else "from scratch")
    where = f"{clips} {dataset} training clips of {c.num_frames} frames, {c.epochs} epochs"
    if c.mode == "stage1":
        return f"SFA stage 1: the whole {model} trained on {where}, {origin}."
    if c.mode == "stage2":
        cached = f", from a cache of {c.cache_views} frozen-feature views per clip" if c.cache_views else ""
        return (f"SFA stage 2: spatial encoder frozen, {'adapter and ' if c.adapter else ''}temporal encoder "
                f"trained on {where}{cached}; {origin}" + (f" (stage 1: MLflow run {stage1_run_id})."
                                                          if stage1_run_id else "."))
    return f"The conventional recipe ({c.mode}): the whole {model} trained on {where}, {origin}."


def run_tracker(c: Any, target: TrackingTarget, *, out: str, data: Dataset, init: str | None,
                stage1_run_id: str | None, run_id: str | None, enabled: bool) -> Tracker:
    """The MLflow run of a training run (`c`: its TrainConfig): named `<mode>-<frames>f`, described, tagged with
    its mode, recipe, data and outputs, its data logged as an input; a stage 2 names its stage 1 and, outside a
    pipeline, sits under it. `run_id`: the run to continue (a resumed run); `enabled`: false on ranks but 0."""
    tags = {"sfa.mode": c.mode, "sfa.recipe": c.recipe, "sfa.data": data.uri, "sfa.out": out,
            **({"sfa.stage1_run_id": stage1_run_id} if stage1_run_id else {})}
    return Tracker(target.resolve_uri(out), c.mlflow_experiment, f"{c.mode}-{c.num_frames}f",
                   enabled=enabled and target.enabled, run_id=run_id, parent_run_id=target.parent_run_id, tags=tags,
                   spool=os.path.join(out, "mlflow_unlogged.jsonl") if "://" not in out else None,
                   follows=stage1_run_id, description=run_description(c, init, data.name, data.clips or 0,
                                                                      stage1_run_id), dataset=data)
