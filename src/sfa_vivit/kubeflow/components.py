"""Kubeflow Pipelines v2 lightweight components: typed signatures, one library call each.

Every body imports `sfa_vivit.kubeflow.steps` (installed in IMAGE) and makes one call; the logic
lives in the library, where it is tested. Compiled YAML for each component is checked in under
`components/` (load it with `kfp.components.load_component_from_file`); `sfa pipeline compile`
rewrites it and a test fails when it is stale.
"""


import linecache
import re
from typing import Any, Callable, List

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,  # noqa: F401 - used by the components' source templates (`defined`)
    Metrics,
    Model,
    Output,
)

from sfa_vivit import __version__
from sfa_vivit.core import options
from sfa_vivit.data.prep import PrepOptions
from sfa_vivit.tools.membench import BenchOptions

# One image per flavour (containers/Dockerfile.{cpu,cuda,tpu}), tagged with the package version. The
# components are written against the cuda flavour of the default registry; `sfa pipeline compile` and
# `submit` put the profile's flavour from the user's registry (or one --image) on every executor.
REGISTRY = "ghcr.io/sfa-vivit/sfa-vivit"
FLAVOURS = ("cpu", "cuda", "tpu")


def image_for(flavour: str, registry: str = REGISTRY, tag: str | None = None) -> str:
    """`registry:<tag>-<flavour>`, the tag being the package version unless given (containers/cloudbuild.yaml
    pushes `<version>-<flavour>` and `<version>-<commit>-<flavour>`)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"image flavour {flavour!r} is not one of {list(FLAVOURS)}")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}", tag):
        raise ValueError(f"image tag {tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 101)")
    return f"{registry.rstrip('/')}:{tag or __version__}-{flavour}"


IMAGE = image_for("cuda")

# What each input and output of a component means, shown in the Kubeflow UI (one text per name, for
# every component that has it; `described` appends them to the docstring as the `Args:` KFP reads). The
# data-prep and memory-benchmark options' texts are their declarations' (PrepOptions, BenchOptions).
ARGUMENTS = {
    **{name: f"{text}." for name, text in options.help_texts(PrepOptions).items()},
    **{name: f"{text}." for name, text in options.help_texts(BenchOptions).items()},
    "dataset": "the dataset, as `sfa data prep --dataset` names it (kinetics400, kinetics600, mit, "
               "epic-kitchens-100, ssv2, something-else, synthetic).",
    "annotations": "comma-separated annotation files as released (local paths or gs:// URLs).",
    "videos": "the folder or bucket prefix holding the videos.",
    "data_uri": "where the shards and manifest.json go (gs:// on a cluster).",
    "part": "which piece of the data-prep fan-out this is (0-based).",
    "parts": "how many data-prep pieces run in parallel.",
    "parts_done": "the fan-out's sample counts (also orders this step after it).",
    "data": "the prepared dataset (shards + manifest.json).",
    "stage1": "the SFA stage-1 model (for the report: its run's metrics.json).",
    "stage2": "the SFA stage-2 model (for the report: its run's metrics.json).",
    "run_metrics": "the run's metrics.json (figures per epoch); its checkpoints stay at its run URI, beside the "
                   "model, and are not an artifact.",
    "recipe": "the training recipe (supplementary Table 1), named after its dataset.",
    "sets": "key=value overrides of the recipe (e.g. variant=L, image_checkpoint=gs://..., epochs=30).",
    "nproc": "processes on the node (one per GPU; torchrun when > 1).",
    "cluster": "a multi-node job (JSON, from a profile with nodes > 1): this step then submits a Kubeflow "
               "Trainer TrainJob with it and follows it; empty: train in this step's pod.",
    "model": "the trained model (or, as an input, the model to evaluate).",
    "metrics": "headline figures.",
    "views": "clips x crops per video (e.g. 4x3).",
    "name": "the MLflow child run's name.",
    "classification": "the confusion matrix, when the classes fit the UI.",
    "results": "the full results (metrics.json).",
    "model_sizes": "ViViTConfig overrides of the measured model.",
    "table": "the results as a Markdown table.",
    "plot": "peak memory against frames.",
    "evaluation": "SFA's evaluation results.",
    "membench": "the memory benchmark's results.",
    "baseline": "the conventional recipe's run's metrics.json (optional).",
    "baseline_evaluation": "the conventional recipe's evaluation results (optional).",
    "page": "the HTML report.",
    "tracking_uri": "the MLflow server (empty: MLFLOW_TRACKING_URI of the pod).",
    "parent_run_id": "the pipeline run's MLflow parent run (empty: untracked).",
}


# A component's own text where a name means something else there.
OWN_ARGUMENTS = {"evaluate": {"workers": "data loader processes per evaluation process."}}


def described(func):
    """`func` with an `Args:` section listing its parameters from ARGUMENTS (KFP turns it into input and
    output descriptions)."""
    import inspect
    texts = {**ARGUMENTS, **OWN_ARGUMENTS.get(func.__name__, {})}
    names = [n for n in inspect.signature(func).parameters if n in texts]
    func.__doc__ = (inspect.cleandoc(func.__doc__ or "") + "\n\nArgs:\n"
                    + "\n".join(f"    {n}: {texts[n]}" for n in names) + "\n")
    return func


def defined(source: str) -> Callable[..., Any]:
    """The function `source` defines, after `{prep}`/`{bench}` (the options' parameters) and `{prep_dict}`/
    `{bench_dict}` (a dict of them) are filled in from the options' declarations. KFP compiles a lightweight
    component from its function's source, so the source is registered where `inspect.getsource` finds it."""
    text = source.strip("\n").format(
        prep=options.component_parameters(PrepOptions), prep_dict=options.component_dict(PrepOptions),
        bench=options.component_parameters(BenchOptions), bench_dict=options.component_dict(BenchOptions)) + "\n"
    name = re.match(r"def (\w+)\(", text).group(1)
    filename = f"<sfa_vivit.kubeflow.components.{name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(text, filename, "exec"), globals(), namespace)
    func = namespace[name]
    func.__module__ = __name__
    return func


@dsl.component(base_image=IMAGE)
def start_tracking(kfp_run_id: str, pipeline_name: str, tracking_uri: str, dataset: str = "",
                   require_tracking: bool = False) -> str:
    """Find or create the MLflow parent run of this pipeline run and dataset (tagged with both), so that
    each dataset of a `reproduce` run has its own.

    Args:
        kfp_run_id: the KFP run's id (the pipeline passes its job id placeholder).
        pipeline_name: the pipeline's name, for the run's name and tags.
        tracking_uri: the MLflow server (empty: MLFLOW_TRACKING_URI, else a SQLite file in the working folder).
        dataset: the dataset this branch trains on.
        require_tracking: fail here when MLflow cannot be reached (else: go on untracked, loudly).

    Returns its id, or '' when MLflow is unreachable (the pipeline then runs untracked; the report says so)."""
    from sfa_vivit.kubeflow import steps
    return steps.start_tracking(kfp_run_id, pipeline_name, tracking_uri, dataset=dataset, require=require_tracking)


@dsl.component(base_image=IMAGE)
@described
def shard_parts(parts: int, dataset: str, annotations: str, videos: str, data_uri: str, recipe: str) -> List[int]:
    """The first data step: check the run's data and recipe parameters (a one-line error naming the first that
    cannot work), then the items of the data-prep fan-out: 0 .. parts-1."""
    from sfa_vivit.kubeflow import steps
    return steps.shard_parts(parts, dataset, annotations, videos, data_uri, recipe)


prepare_shards = dsl.component(base_image=IMAGE)(described(defined('''
def prepare_shards(dataset: str, annotations: str, videos: str, data_uri: str, part: int, parts: int,
                   {prep}) -> int:
    """One piece of data prep: decode the videos of shards part, part+parts, ... into WebDataset
    shards at data_uri (resumable per shard). Returns the number of samples written."""
    from sfa_vivit.kubeflow import steps
    return steps.prepare_part(dataset, annotations, videos, data_uri, part, parts, {prep_dict})
''')))


prepare_data = dsl.component(base_image=IMAGE)(described(defined('''
def prepare_data(dataset: str, annotations: str, videos: str, data_uri: str, {prep}, parts_done: List[int],
                 data: Output[Dataset]):
    """Annotations + videos -> shards + manifest at data_uri (finishing any shard the fan-out left;
    parts_done: the fan-out's sample counts, which also order this step after it); the Dataset
    artifact holds the manifest. Fails, publishing nothing, when more than max_reject_fraction of
    the videos are unusable."""
    from sfa_vivit.kubeflow import steps
    steps.prepare_data(dataset, annotations, videos, data_uri, {prep_dict}, data, parts_done)
''')))


@dsl.component(base_image=IMAGE)
@described
def train_stage1(data: Input[Dataset], recipe: str, sets: List[str], tracking_uri: str, parent_run_id: str,
                 nproc: int, cluster: str, model: Output[Model], metrics: Output[Metrics],
                 run_metrics: Output[Artifact]):
    """SFA stage 1: the full ViViT-FE at few frames (8 by default). Resumes from its own checkpoints
    when the pod is retried."""
    from sfa_vivit.kubeflow import steps
    steps.train("stage1", data, model, metrics, recipe=recipe, sets=sets, tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, nproc=nproc, cluster=cluster, run_metrics=run_metrics)


@dsl.component(base_image=IMAGE)
@described
def train_stage2(data: Input[Dataset], stage1: Input[Model], recipe: str, sets: List[str], tracking_uri: str,
                 parent_run_id: str, nproc: int, cluster: str, model: Output[Model], metrics: Output[Metrics],
                 run_metrics: Output[Artifact]):
    """SFA stage 2: spatial encoder frozen, adapter on, temporal encoder from stage 1, many frames."""
    from sfa_vivit.kubeflow import steps
    steps.train("stage2", data, model, metrics, recipe=recipe, sets=sets, init=stage1, tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, nproc=nproc, cluster=cluster, run_metrics=run_metrics)


@dsl.component(base_image=IMAGE)
@described
def train_baseline(data: Input[Dataset], recipe: str, sets: List[str], tracking_uri: str, parent_run_id: str,
                   nproc: int, cluster: str, model: Output[Model], metrics: Output[Metrics],
                 run_metrics: Output[Artifact]):
    """The conventional recipe: the full ViViT-FE trained at the final frame count."""
    from sfa_vivit.kubeflow import steps
    steps.train("baseline", data, model, metrics, recipe=recipe, sets=sets, tracking_uri=tracking_uri,
                parent_run_id=parent_run_id, nproc=nproc, cluster=cluster, run_metrics=run_metrics)


@dsl.component(base_image=IMAGE)
@described
def evaluate(data: Input[Dataset], model: Input[Model], views: str, name: str, tracking_uri: str,
             parent_run_id: str, metrics: Output[Metrics], classification: Output[ClassificationMetrics],
             results: Output[Artifact], nproc: int = 1, workers: int = 2):
    """Multi-view evaluation (views CLIPSxCROPS): top-1/top-5, the confusion matrix, and metrics.json
    with per-class accuracy (EPIC: verb, noun, action); one process per GPU of the node."""
    from sfa_vivit.kubeflow import steps
    steps.evaluate(model, data, views=views, metrics=metrics, classification=classification, results=results,
                   tracking_uri=tracking_uri, parent_run_id=parent_run_id, name=name, nproc=nproc, workers=workers)


memory_benchmark = dsl.component(base_image=IMAGE)(described(defined('''
def memory_benchmark({bench}, model_sizes: dict, tracking_uri: str, parent_run_id: str, table: Output[Markdown],
                     plot: Output[HTML], results: Output[Artifact]):
    """Step time and peak memory of full training vs SFA stage 2 (and from the feature cache) per
    frame count, each in a fresh process; with budget_gib > 0 the largest frame count that fits."""
    from sfa_vivit.kubeflow import steps as step_functions      # `steps` is the option of that name
    step_functions.memory_benchmark(options={bench_dict}, table=table, plot=plot, results=results,
                                    model_sizes=model_sizes, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
''')))


@dsl.component(base_image=IMAGE)
@described
def report(stage1: Input[Artifact], stage2: Input[Artifact], evaluation: Input[Artifact], membench: Input[Artifact],
           tracking_uri: str, parent_run_id: str, page: Output[HTML], baseline: Input[Artifact] = None,
           baseline_evaluation: Input[Artifact] = None):
    """One HTML page: accuracy and training time of SFA vs the baseline, curves, memory vs frames."""
    from sfa_vivit.kubeflow import steps
    steps.report(stage1=stage1, stage2=stage2, evaluation=evaluation, membench=membench, out=page, baseline=baseline,
                 baseline_evaluation=baseline_evaluation, tracking_uri=tracking_uri, parent_run_id=parent_run_id)


COMPONENTS = {c.name: c for c in (start_tracking, shard_parts, prepare_shards, prepare_data, train_stage1,
                                  train_stage2, train_baseline, evaluate, memory_benchmark, report)}
