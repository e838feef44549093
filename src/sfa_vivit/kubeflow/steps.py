"""The pipeline steps as library functions: each Kubeflow component body is one call to one of these.

They translate between KFP artifacts (objects with `.path`, `.uri`, `.metadata`, and for metrics
`log_metric`) and the library, and link every step to the pipeline run's MLflow parent run.
Artifacts on gs:// are written through their URI (fsspec), so a retried training pod resumes from
the checkpoints its previous attempt committed; local artifacts through their path.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "sfa-vivit"
PARENT_TAG = "sfa.kfp_run_id"


def artifact_url(artifact: Any) -> str:
    """Where a step reads or writes an artifact: its gs:// URI on a cluster, its local path otherwise."""
    uri = getattr(artifact, "uri", "") or ""
    return uri if uri.startswith(("gs://", "s3://")) else artifact.path


# ----------------------------------------------------------------------------------------------
# MLflow: one parent run per pipeline run, one child run per step
# ----------------------------------------------------------------------------------------------

class TrackingUnavailable(RuntimeError):
    """require_tracking is on and the MLflow server cannot be reached."""


def start_tracking(kfp_run_id: str, pipeline: str, tracking_uri: str = "", experiment: str = EXPERIMENT,
                   dataset: str = "", require: bool = False) -> str:
    """The MLflow parent run of pipeline run `kfp_run_id` and `dataset` (found by tag, else created); ''
    when MLflow cannot be reached: the pipeline then goes on untracked, with a warning here and on its
    report, or, with `require`, fails here (TrackingUnavailable) before any other step."""
    key = f"{kfp_run_id}/{dataset}" if dataset else kfp_run_id
    from sfa_vivit.train.tracking import UNTRACKED, Tracker, default_tracking_uri
    if tracking_uri == UNTRACKED:
        if require:
            raise TrackingUnavailable("tracking_uri=none turns tracking off, and require_tracking is on")
        log.info("tracking_uri=none: this pipeline run is not tracked, by choice")
        return ""
    uri = tracking_uri or default_tracking_uri(os.getcwd())
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            from sfa_vivit.train.tracking import artifact_location
            client.create_experiment(experiment, artifact_location=artifact_location(uri))
        else:
            found = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{key}'", max_results=1)
            if found:
                return found[0].info.run_id
    except Exception as e:  # noqa: BLE001 - tracking stops the pipeline only when required
        return _untracked(uri, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", require)
    tracker = Tracker(uri, experiment, f"{pipeline} {dataset} {kfp_run_id}".replace("  ", " "),
                      tags={PARENT_TAG: key, "sfa.pipeline": pipeline, "sfa.dataset": dataset},
                      description=f"Pipeline run {kfp_run_id} ({pipeline}{' on ' + dataset if dataset else ''}): "
                                  "its steps are the child runs (SFA's two stages, the baseline, evaluations, the "
                                  "memory benchmark, the report); this run carries the headline figures.")
    if not tracker.run_id:
        return _untracked(uri, "; ".join(tracker.errors) or "no run created", require)
    return tracker.run_id


def _untracked(uri: str, reason: str, require: bool) -> str:
    if require:
        raise TrackingUnavailable(f"MLflow at {uri} cannot be reached ({reason}) and require_tracking is on")
    log.warning("MLflow at %s cannot be reached (%s): this pipeline run is NOT tracked; its figures stay in the "
                "step artifacts and the report (set require_tracking=true to fail instead)", uri, reason)
    return ""


def _child_run(name: str, tracking_uri: str, parent_run_id: str, metrics: dict[str, Any], tags: dict[str, str],
               artifacts: list[tuple[str, str]] = (), description: str = "") -> None:
    """A finished child run of the pipeline's parent: `metrics` and (local path, file name) `artifacts`."""
    import shutil
    import tempfile

    from sfa_vivit.train.tracking import Tracker, TrackingTarget
    target = TrackingTarget(tracking_uri or None, parent_run_id or None)
    if not target.enabled:
        return
    tracker = Tracker(target.resolve_uri(os.getcwd()), EXPERIMENT, name, parent_run_id=target.parent_run_id, tags=tags,
                      description=description)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for path, file_name in artifacts:       # under the name a browser opens (KFP names it "page")
            named = os.path.join(tmp, file_name)
            shutil.copyfile(path, named)
            tracker.log_artifact(named)
        tracker.finish()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class PipelineInputError(ValueError):
    """A pipeline parameter that cannot work, found by the first data step before any other work."""


def shard_parts(parts: int, dataset: str = "", annotations: str = "", videos: str = "", data_uri: str = "",
                recipe: str = "") -> list[int]:
    """Check the run's data and recipe parameters (PipelineInputError naming the first one that cannot
    work), then the ParallelFor items of the data-prep fan-out: 0 .. parts-1."""
    from sfa_vivit.data.prep.annotations import DATASETS
    from sfa_vivit.train.config import resolve
    if dataset not in DATASETS:
        raise PipelineInputError(f"dataset={dataset!r} is not one of {list(DATASETS)}")
    for name, value, what in (("annotations", annotations, f"the comma-separated annotation files of {dataset}"),
                              ("videos", videos, "the folder or gs:// prefix of the videos"),
                              ("data_uri", data_uri, "where the shards go, e.g. gs://BUCKET/shards/" + dataset)):
        if not value.strip():
            raise PipelineInputError(f"{name} is empty: give {what}")
    try:
        resolve("stage1", recipe or dataset)
    except ValueError as e:
        raise PipelineInputError(f"recipe: {e}") from None
    if parts < 1:
        raise PipelineInputError(f"prep_parts={parts} must be >= 1")
    return list(range(parts))


def _prep_options(options: dict[str, Any]):
    from sfa_vivit.data.prep import PrepOptions
    return PrepOptions(**options)


def prepare_part(dataset: str, annotations: str, videos: str, data_uri: str, part: int, parts: int,
                 options: dict[str, Any]) -> int:
    """One piece of the fan-out: shards part, part+parts, ... at `data_uri`. Returns its sample count."""
    from sfa_vivit.data.prep import prepare
    result = prepare(dataset, _split_list(annotations), videos, data_uri, options=_prep_options(options),
                     shard_range=(part, parts))
    return int(result["num_samples"])


def prepare_data(dataset: str, annotations: str, videos: str, data_uri: str, options: dict[str, Any],
                 out: Any, parts_done: list[int] | None = None) -> dict[str, Any]:
    """Finish the shards at `data_uri` (those the fan-out left), publish the manifest there, and put a
    copy whose shard paths are absolute into the Dataset artifact `out`."""
    from sfa_vivit.core.storage import join, write_bytes_atomic
    from sfa_vivit.data.manifest import MANIFEST_FILE
    from sfa_vivit.data.prep import prepare
    if parts_done:
        log.info("data prep fan-out: %d parts wrote %d samples", len(parts_done), sum(parts_done))
    _lease_key(artifact_url(out))     # this run's task: a retry shares it, another run (same data_uri) does not
    manifest = prepare(dataset, _split_list(annotations), videos, data_uri, options=_prep_options(options))
    pointer = json.loads(json.dumps(manifest))
    for split in pointer["splits"].values():
        for shard in split["shards"]:
            shard["path"] = join(data_uri, shard["path"])
    write_bytes_atomic(join(artifact_url(out), MANIFEST_FILE), json.dumps(pointer, indent=1).encode())
    out.metadata.update({"dataset": dataset, "data_uri": data_uri, "rejected": len(manifest["rejected"]),
                         **{f"{s}_samples": v["num_samples"] for s, v in manifest["splits"].items()}})
    return manifest


# The metadata store takes messages up to 4 MB (gRPC's default): a confusion matrix goes to the UI only
# well below that (about 350 classes); the full matrix is always in the results artifact.
MAX_UI_MATRIX_BYTES = 1_000_000


def _lease_key(artifact: str) -> None:
    """The key of this step's leases (sfa_vivit.core.lease): the URI of one of its output artifacts, which names the
    pipeline run and the task, so every attempt of this step shares it (a pod retried by Argo takes over the lease
    its failed attempt left, at once) and no other run or step has it."""
    os.environ["SFA_LEASE_KEY"] = f"kfp-step:{artifact}"


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------
# Training, evaluation, memory benchmark
# ----------------------------------------------------------------------------------------------

def run_folder(model: Any) -> str:
    """Where a training step's run lives (checkpoints with optimizer state, the feature cache, metrics.json):
    beside its Model artifact, under the same task of the pipeline root, not an artifact itself. KFP's launcher
    downloads every input artifact before a step starts; consumers get the final model and the run's figures
    as small artifacts, and whoever needs the rest (a retried step) reads it at this URI."""
    url = artifact_url(model).rstrip("/")
    return url.rsplit("/", 1)[0] + "/run" if "/" in url else "run"


def _publishes() -> bool:
    """Whether this machine publishes the step's outputs: every step but the other nodes of a Vertex AI custom
    job (CLUSTER_SPEC task type workerpool1), which run the same step beside the chief."""
    text = os.environ.get("CLUSTER_SPEC")
    if not text:
        return True
    try:
        return json.loads(text)["task"]["type"] == "workerpool0"
    except (ValueError, KeyError, TypeError):
        return True


def train(mode: str, data: Any, model: Any, metrics: Any, *, recipe: str, sets: list[str], init: Any = None,
          tracking_uri: str = "", parent_run_id: str = "", nproc: int = 1, cluster: str = "",
          run_metrics: Any = None) -> dict[str, Any]:
    """Train `mode` on the Dataset artifact in the step's run folder (`run_folder`), then publish the final
    model (weights, config, card) as the Model artifact and the run's metrics.json as `run_metrics`; log the
    figures to the Metrics artifact and to an MLflow child run. nproc > 1: torchrun with that many processes
    (GPUs). cluster (a trainjob.NodeSpec as JSON): submit a multi-node Kubeflow Trainer job instead and
    follow it."""
    from sfa_vivit.core.storage import join, open_url
    from sfa_vivit.models import checkpoints
    from sfa_vivit.train.launch import run, spec_of
    from sfa_vivit.train.start import run_config
    from sfa_vivit.train.tracking import TrackingTarget
    init_url = artifact_url(init) if init is not None else None
    # Stage 2 takes stage 1's architecture; bad settings fail here, before any work.
    config = run_config(mode, recipe, init=init_url, sets=sets)
    tracking = TrackingTarget(tracking_uri or None, parent_run_id or None)
    _lease_key(artifact_url(model))
    out = run_folder(model)
    if cluster:
        from sfa_vivit.kubeflow import trainjob
        spec = trainjob.NodeSpec.from_json(cluster)
        spec_json = spec_of(config, artifact_url(data), out, init_url, tracking=tracking)
        if os.environ.get("CLUSTER_SPEC"):     # one machine of a Vertex AI custom job: this node of the job
            result = trainjob.train_this_node(spec, spec_json, out)
        else:                                   # Kubeflow: submit the TrainJob from this (launcher) pod
            result = trainjob.train_on_nodes(mode, spec, spec_json, out)
    else:
        result = run(config, artifact_url(data), out, init=init_url, tracking=tracking, nproc=nproc)
    if _publishes():
        checkpoints.copy_committed(out, artifact_url(model))
    if run_metrics is not None:
        with open_url(join(out, "metrics.json"), "rb") as f:
            figures_json = f.read()
        os.makedirs(run_metrics.path, exist_ok=True)
        with open(os.path.join(run_metrics.path, "metrics.json"), "wb") as f:
            f.write(figures_json)
    final = result.get("final", {})
    figures = {"train_time_s": result["train_time_s"], "top1": final.get("top1"), "top5": final.get("top5"),
               "num_frames": result["num_frames"], "epochs": result["epochs"],
               "trainable_parameters": result["trainable_parameters"], "peak_memory_bytes": result["peak_memory_bytes"]}
    for key, value in figures.items():
        if value is not None:
            metrics.log_metric(key, value)
    model.metadata.update({"mode": mode, "recipe": recipe, "num_frames": result["num_frames"],
                           "framework": "pytorch", "mlflow_run_id": (result.get("mlflow") or {}).get("run_id"),
                           "run": out})
    return result


def evaluate(model: Any, data: Any, *, views: str, metrics: Any, classification: Any, results: Any,
             tracking_uri: str = "", parent_run_id: str = "", name: str = "evaluate", nproc: int = 1,
             workers: int = 2) -> dict[str, Any]:
    """Multi-view evaluation of the Model artifact: Metrics, ClassificationMetrics (confusion
    matrix) and the full metrics.json in `results`. nproc > 1: that many processes under torchrun (one per
    GPU; each reads its share of the shards, the counts are summed), each with `workers` loader processes."""
    from sfa_vivit.tools.evaluate import evaluate as evaluate_checkpoint
    if nproc > 1:
        import subprocess
        import sys

        from sfa_vivit.core.storage import join, open_url
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m",
                        "sfa_vivit.cli", "evaluate", "--checkpoint", artifact_url(model), "--data", artifact_url(data),
                        "--views", views, "--out", artifact_url(results), "--workers", str(workers)], check=True)
        with open_url(join(artifact_url(results), "metrics.json"), "rb") as f:
            result = json.load(f)
    else:
        result = evaluate_checkpoint(artifact_url(model), artifact_url(data), views=views, out=artifact_url(results),
                                     workers=workers)
    for key in ("top1", "top5", "num_examples"):
        if result.get(key) is not None:
            metrics.log_metric(key, result[key])
    if isinstance(result.get("confusion"), list) and result.get("classes"):
        size = len(json.dumps([result["classes"], result["confusion"]]))
        if size <= MAX_UI_MATRIX_BYTES:
            classification.log_confusion_matrix(list(result["classes"]), result["confusion"])
        else:
            log.warning("the %d-class confusion matrix (%.1f MB) is too large for the Kubeflow UI's metadata; it is "
                        "in the results artifact (metrics.json)", len(result["classes"]), size / 1e6)
    _child_run(name, tracking_uri, parent_run_id, {k: result.get(k) for k in ("top1", "top5")},
               {"sfa.step": name, "sfa.views": views},
               description=f"Top-1 and top-5 of {artifact_url(model)} on the {result.get('num_examples', '?')} "
                           f"validation clips, {views} views (clips x crops) each.")
    return result


def memory_benchmark(*, options: dict[str, Any], table: Any, plot: Any, results: Any, tracking_uri: str = "",
                     parent_run_id: str = "", model_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """`sfa membench` as a step (`options`: BenchOptions' fields): JSON in `results`, the Markdown table, and an
    HTML page with the plot."""
    import base64
    from pathlib import Path

    from sfa_vivit.tools.membench import BenchOptions, markdown, run
    folder = Path(results.path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "membench.json"
    bench = BenchOptions(**options)
    result = run(bench, out=str(out), device="auto",
                 model={k: int(v) for k, v in (model_sizes or {}).items()})  # JSON: floats
    Path(table.path).write_text(markdown(result))
    png = base64.b64encode(out.with_suffix(".png").read_bytes()).decode()
    Path(plot.path).write_text(f"<html><body><h3>Peak memory per training step</h3>"
                               f"<img src='data:image/png;base64,{png}'/><pre>{markdown(result)}</pre></body></html>")
    slopes = {f"{m}_mib_per_frame": v / 2**20 for m, v in result["per_frame_bytes"].items() if v is not None}
    _child_run("memory-benchmark", tracking_uri, parent_run_id, slopes, {"sfa.step": "memory-benchmark"},
               description=f"Peak training memory and step time of ViViT-{bench.variant} per frame count "
                           f"({bench.frames}): the whole model against SFA's stage 2, with and without its "
                           "feature cache.")
    return result


def report(*, stage1: Any, stage2: Any, evaluation: Any, membench: Any, out: Any, baseline: Any = None,
           baseline_evaluation: Any = None, tracking_uri: str = "", parent_run_id: str = "") -> str:
    """One HTML page: SFA vs baseline accuracy and time, training curves, memory vs frames."""
    from sfa_vivit.kubeflow.report import write_report
    where = f"MLflow: parent run {parent_run_id} at {tracking_uri or 'MLFLOW_TRACKING_URI'}" if parent_run_id else ""
    html_path, summary = write_report(
        stage1=artifact_url(stage1), stage2=artifact_url(stage2), evaluation=artifact_url(evaluation),
        membench=os.path.join(membench.path, "membench.json"), out=out.path,
        baseline=artifact_url(baseline) if baseline is not None else None,
        baseline_evaluation=artifact_url(baseline_evaluation) if baseline_evaluation is not None else None,
        tracking=where)
    if not parent_run_id:
        log.warning("this pipeline run is not tracked in MLflow (the report says so)")
    _child_run("report", tracking_uri, parent_run_id, summary, {"sfa.step": "report"},
               artifacts=[(html_path, "report.html")],
               description="SFA against the conventional recipe: top-1, training time and memory side by side; "
                           "the page is this run's artifact report.html.")
    _finish_parent(tracking_uri, parent_run_id, summary)
    return html_path


def _finish_parent(tracking_uri: str, parent_run_id: str, summary: dict[str, Any]) -> None:
    """The report is the pipeline's last step: the parent run gets the headline figures and ends FINISHED
    (a run that fails earlier leaves it RUNNING, as MLflow shows an unfinished run)."""
    if not parent_run_id:
        return
    from sfa_vivit.train.tracking import Tracker, TrackingTarget
    uri = TrackingTarget(tracking_uri or None).resolve_uri(os.getcwd())
    parent = Tracker(uri, EXPERIMENT, "", run_id=parent_run_id)
    parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
    parent.finish("FINISHED")
