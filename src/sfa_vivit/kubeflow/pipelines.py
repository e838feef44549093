"""The `sfa` pipeline (one dataset: prep -> stage 1 -> stage 2 -> evaluate -> memory benchmark ->
report, with an optional baseline branch) and `reproduce` (the paper's six datasets, each with its
recipe). Built per accelerator profile: the profile's resources, node selector, tolerations and
/dev/shm go on the training and evaluation steps; the memory benchmark runs on the same pool.
"""


import inspect
from typing import Any, Callable, List

from kfp import dsl

from sfa_vivit.data.prep import PrepOptions
from sfa_vivit.kubeflow import components as c
from sfa_vivit.kubeflow import profiles
from sfa_vivit.tools.membench import BENCH
from sfa_vivit.train.config import MODE_DEFAULTS, TrainConfig

# Data-prep defaults come from the library (as the CLI's do); prep_workers is the pipeline's own: the prep
# pods request 8 CPUs, where the library's 0 (one per CPU) would count the node's.
_PREP = PrepOptions()
# Each training step's frame count as its mode defines it (train/config.py), shown in the UI as its sets.
_FRAMES = {mode: [f"num_frames={MODE_DEFAULTS[mode]['num_frames']}"] for mode in ("stage1", "stage2", "baseline")}

# The paper's six datasets: each name is both `sfa data prep --dataset` and the training recipe.
REPRODUCE_DATASETS = ("kinetics400", "kinetics600", "mit", "epic-kitchens-100", "ssv2", "something-else")


def _light(task: Any, cpu: str = "2", memory: str = "8G") -> Any:
    """A step off the accelerator pool, with limits equal to its requests: a profile namespace's ResourceQuota
    on limits refuses a pod without them."""
    return task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


# A step that reads data from outside the pipeline, trains or measures is never answered from another run's
# cache: its output depends on more than its parameters (the bucket's contents, the MLflow server, the
# clock). Users who want reuse turn caching on at submission (`enable_caching`, which overrides this).
def _fresh(task: Any) -> Any:
    return task.set_caching_options(False)


# Preemption and transient failures: the step runs again, later each time; data prep skips finished shards
# and training resumes from its last committed checkpoint, so a retry repeats little work.
# backoff_max_duration becomes Argo's retryStrategy.backoff.maxDuration (KFP 2.17.0 argocompiler/container.go),
# which Argo counts from the start of the step's FIRST attempt and also sets as every attempt's execution
# deadline (argo-workflows v4.0.5 workflow/controller/operator.go): KFP's default of 3600 s kills a training
# step, and its retries, one hour after it first started. The window is 30 days, past any of our runs.
RETRY_WINDOW_S = 30 * 24 * 3600
RETRY = dict(num_retries=3, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration=f"{RETRY_WINDOW_S}s")
# Data-prep pieces that run at once (Argo's loop parallelism); each asks for 8 CPUs. Settable at compile time
# (`sfa pipeline compile --prep-parallelism`); `reproduce` multiplies it by the datasets it runs.
PREP_PARALLELISM = 8


def _retried(task: Any) -> Any:
    return _fresh(task).set_retry(**RETRY)


def build_sfa(profile: str = "cpu", target: str = "kubeflow", operator: str = "trainjob",
              prep_parallelism: int = PREP_PARALLELISM, queue: str = "") -> Callable:
    """The `sfa` pipeline for an accelerator profile (see profiles.PROFILES). operator: what runs a multi-node
    profile's training on Kubeflow, 'trainjob' (Kubeflow Trainer v2) or 'pytorchjob' (Training Operator v1).
    prep_parallelism: data-prep pieces that run at once. queue: the Kueue LocalQueue of multi-node jobs."""
    if prep_parallelism < 1:
        raise ValueError(f"--prep-parallelism={prep_parallelism} must be >= 1")
    prof = profiles.get(profile)
    if target == "vertex" and not prof.vertex:
        raise ValueError(f"profile {profile} has no Vertex AI equivalent (Vertex AI training offers TPU v2, v3 "
                         "and v5e); compile it for Kubeflow on GKE, or use tpu-v5e-8 on Vertex AI")
    # On Vertex AI with a TPU topology, the accelerated steps are custom jobs on the profile's machine.
    custom_jobs = target == "vertex" and prof.vertex_tpu_topology is not None

    def accelerated(task: Any, on: profiles.Profile = prof) -> Any:
        return _retried(task if custom_jobs else profiles.apply(task, on, target=target))

    # Evaluation and the benchmark run in one pod: on a multi-host TPU slice, whose hosts only run together,
    # that pod goes to a single-host slice of the same TPU instead.
    one_pod = profiles.get(prof.single_host) if prof.single_host else prof
    # Evaluation uses every GPU of its pod (one process each under torchrun, counts summed) with loader workers;
    # on TPU one process drives the host's chips. A Vertex custom job's steps keep the library's defaults.
    eval_procs = {} if custom_jobs else dict(nproc=one_pod.nproc, workers=profiles.loader_workers(one_pod))

    cluster = ""
    train_components = {"stage1": c.train_stage1, "stage2": c.train_stage2, "baseline": c.train_baseline}
    evaluate, memory_benchmark = c.evaluate, c.memory_benchmark
    if prof.nodes > 1:
        from sfa_vivit.kubeflow.trainjob import node_spec
        cluster = node_spec(prof, engine=operator, queue=queue).to_json()
    if target == "vertex" and prof.vertex_custom_job:
        train_components = {mode: profiles.vertex_custom_job(component, prof)
                            for mode, component in train_components.items()}
    if custom_jobs:
        evaluate, memory_benchmark = (profiles.vertex_custom_job(component, prof)
                                      for component in (c.evaluate, c.memory_benchmark))

    def trainer(task: Any) -> Any:
        """A training step: on the profile's node; on Kubeflow with nodes > 1 a small launcher pod that submits
        the multi-node TrainJob; on Vertex AI with nodes > 1 a custom job whose worker pools form one job."""
        if prof.nodes == 1:
            return accelerated(task)
        return _retried(_light(task, "1", "2G")) if target == "kubeflow" else _retried(task)

    @dsl.pipeline(name="sfa", description=f"SFA two-stage ViViT-FE training vs the conventional recipe "
                                          f"(accelerator profile {profile}).")
    def sfa(dataset: str = "kinetics400", annotations: str = "", videos: str = "", data_uri: str = "",
            prep_parts: int = 1, fps: float = _PREP.fps, short_side: int = _PREP.short_side,
            shard_size: int = _PREP.shard_size, jpeg_quality: int = _PREP.jpeg_quality, prep_workers: int = 4,
            max_reject_fraction: float = _PREP.max_reject_fraction,
            recipe: str = "kinetics400", sets: List[str] = [], stage1_sets: List[str] = _FRAMES["stage1"],
            stage2_sets: List[str] = _FRAMES["stage2"], baseline_sets: List[str] = _FRAMES["baseline"],
            run_baseline: bool = True, eval_views: str = "4x3", membench_variant: str = BENCH.variant,
            membench_frames: str = BENCH.frames, membench_image_size: int = BENCH.image_size,
            membench_batch_size: int = BENCH.batch_size, membench_budget_gib: float = BENCH.budget_gib,
            membench_model_sizes: dict = {}, tracking_uri: str = "",
            require_tracking: bool = False):
        """SFA (stage 1 -> stage 2) and, optionally, the conventional recipe on one dataset.

        Args:
            dataset: the dataset, as `sfa data prep --dataset` names it (kinetics400, kinetics600, mit,
                epic-kitchens-100, ssv2, something-else, synthetic).
            annotations: comma-separated annotation files as released (local paths or gs:// URLs).
            videos: the folder or bucket prefix holding the videos.
            data_uri: where the shards and manifest.json go (gs:// on a cluster).
            prep_parts: how many data-prep pieces run in parallel.
            fps: frames per second stored in the shards.
            short_side: the stored frames' short side in pixels.
            shard_size: samples per shard.
            jpeg_quality: JPEG quality of the stored frames.
            prep_workers: decoding processes per data-prep piece.
            max_reject_fraction: data prep fails, publishing nothing, past this fraction of rejected videos.
            recipe: the training recipe (supplementary Table 1), named after its dataset like `dataset`.
            sets: key=value overrides for every training step (e.g. variant=L, image_checkpoint=gs://...).
            stage1_sets: overrides for SFA stage 1 only.
            stage2_sets: overrides for SFA stage 2 only.
            baseline_sets: overrides for the conventional recipe only.
            run_baseline: also train the conventional recipe, for comparison.
            eval_views: clips x crops of the final evaluation (e.g. 4x3).
            membench_variant: ViViT variant of the memory benchmark (Ti, S, B, L, H, g).
            membench_frames: comma-separated frame counts the memory benchmark measures.
            membench_image_size: frame size of the memory benchmark.
            membench_batch_size: batch of the memory benchmark.
            membench_budget_gib: with > 0, the largest frame count whose step fits in this many GiB.
            membench_model_sizes: ViViTConfig overrides of the memory benchmark's model.
            tracking_uri: the MLflow server, or none to run untracked (`sfa pipeline submit` refuses it empty).
            require_tracking: fail at the first step when MLflow cannot be reached (else go on, untracked, and
                say so in the logs and the report).
        """
        tracking = _fresh(_light(c.start_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, pipeline_name="sfa",
                                           tracking_uri=tracking_uri, dataset=dataset,
                                           require_tracking=require_tracking), "1", "2G"))
        parent = tracking.output
        prep_args = dict(dataset=dataset, annotations=annotations, videos=videos, data_uri=data_uri, fps=fps,
                         short_side=short_side, shard_size=shard_size, jpeg_quality=jpeg_quality,
                         workers=prep_workers)
        parts = _light(c.shard_parts(parts=prep_parts, dataset=dataset, annotations=annotations, videos=videos,
                                     data_uri=data_uri, recipe=recipe), "1", "1G")
        with dsl.ParallelFor(parts.output, parallelism=prep_parallelism) as part:
            piece = _retried(_light(c.prepare_shards(part=part, parts=prep_parts, **prep_args), "8", "32G"))
        data = _retried(_light(c.prepare_data(max_reject_fraction=max_reject_fraction,
                                              parts_done=dsl.Collected(piece.output), **prep_args), "8", "32G")).output
        stage1 = trainer(train_components["stage1"](data=data, recipe=recipe,
                                                    sets=_concat(sets, stage1_sets, prof, "stage1"),
                                                    tracking_uri=tracking_uri, parent_run_id=parent, nproc=prof.nproc,
                                                    cluster=cluster))
        stage2 = trainer(train_components["stage2"](data=data, stage1=stage1.outputs["model"], recipe=recipe,
                                        sets=_concat(sets, stage2_sets, prof, "stage2"), tracking_uri=tracking_uri,
                                        parent_run_id=parent, nproc=prof.nproc, cluster=cluster))
        evaluation = accelerated(evaluate(data=data, model=stage2.outputs["model"], views=eval_views,
                                            name="evaluate-sfa", tracking_uri=tracking_uri, parent_run_id=parent,
                                            **eval_procs), one_pod).set_display_name("evaluate-sfa")
        membench = accelerated(memory_benchmark(
            variant=membench_variant, frames=membench_frames, regimes=BENCH.regimes,
            image_size=membench_image_size, batch_size=membench_batch_size, budget_gib=membench_budget_gib,
            model_sizes=membench_model_sizes, tracking_uri=tracking_uri, parent_run_id=parent),
            profiles.one_accelerator(one_pod)).after(evaluation)
        report_args = dict(stage1=stage1.outputs["run_metrics"], stage2=stage2.outputs["run_metrics"],
                           evaluation=evaluation.outputs["results"], membench=membench.outputs["results"],
                           tracking_uri=tracking_uri, parent_run_id=parent)
        with dsl.If(run_baseline == True, "baseline"):  # noqa: E712 - a pipeline condition, not a Python test
            baseline = trainer(train_components["baseline"](
                data=data, recipe=recipe, sets=_concat(sets, baseline_sets, prof, "baseline"),
                tracking_uri=tracking_uri, parent_run_id=parent, nproc=prof.nproc, cluster=cluster))
            baseline_eval = accelerated(evaluate(data=data, model=baseline.outputs["model"], views=eval_views,
                                                   name="evaluate-baseline", tracking_uri=tracking_uri,
                                                   parent_run_id=parent, **eval_procs),
                                        one_pod).set_display_name("evaluate-baseline")
            _fresh(_light(c.report(baseline=baseline.outputs["run_metrics"],
                                   baseline_evaluation=baseline_eval.outputs["results"], **report_args))
                   ).set_display_name("report")
        with dsl.Else("no-baseline"):
            _fresh(_light(c.report(**report_args))).set_display_name("report")

    return sfa


def _concat(a: Any, b: Any, prof: profiles.Profile, step: str) -> Any:
    """The profile's defaults (a checkpoint every `checkpoint_minutes`, so a preempted pod loses minutes, not
    an epoch), then two pipeline list parameters (resolved at run time by a tiny step, shown as `sets-STEP`),
    then the profile's device where it must be explicit (TPU)."""
    defaults = [f"checkpoint_every_minutes={prof.checkpoint_minutes}"] if prof.checkpoint_minutes else []
    fixed = [f"device={prof.device}"] if prof.device == "xla" else []
    return _light(join_sets(defaults=defaults, a=a, b=b, fixed=fixed), "1", "1G").set_display_name(
        f"sets-{step}").output


@dsl.component(base_image=c.IMAGE)
def join_sets(defaults: List[str], a: List[str], b: List[str], fixed: List[str]) -> List[str]:
    """The profile's defaults, then overrides for every step, then one step's, then what the profile requires
    (later wins).

    Args:
        defaults: the accelerator profile's defaults (a checkpoint every N minutes), overridable.
        a: `key=value` overrides of every training step (the pipeline's `sets`).
        b: this step's own overrides (`stage1_sets`, `stage2_sets` or `baseline_sets`).
        fixed: what the accelerator profile requires (TPU: device=xla).
    """
    return list(defaults) + list(a) + list(b) + list(fixed)


@dsl.component(base_image=c.IMAGE)
def dataset_sets(variant: str, image_checkpoint: str, sets: List[str]) -> List[str]:
    """One dataset's settings in `reproduce`: the variant, the image checkpoint (when given), then its own sets.

    Args:
        variant: ViViT variant of the dataset's runs.
        image_checkpoint: the image ViT its spatial encoders start from (empty: random init).
        sets: the dataset's own `key=value` overrides (later wins).
    """
    return [f"variant={variant}"] + ([f"image_checkpoint={image_checkpoint}"] if image_checkpoint else []) + list(sets)


def build_reproduce(profile: str = "tpu-v3-8", target: str = "kubeflow", operator: str = "trainjob",
                    prep_parallelism: int = PREP_PARALLELISM, queue: str = "") -> Callable:
    """The `reproduce` pipeline: the `sfa` pipeline once per dataset of the paper, with that
    dataset's recipe; a dataset whose `videos` parameter is empty is skipped."""
    inner = build_sfa(profile, target, operator, prep_parallelism, queue)
    params = []
    for name in REPRODUCE_DATASETS:
        key = name.replace("-", "_")
        params += [inspect.Parameter(f"{key}_annotations", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default="", annotation=str),
                   inspect.Parameter(f"{key}_videos", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default="", annotation=str),
                   inspect.Parameter(f"{key}_data_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default="", annotation=str),
                   inspect.Parameter(f"{key}_sets", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=[], annotation=List[str])]
    params += [inspect.Parameter("variant", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=TrainConfig.variant,
                                 annotation=str),
               inspect.Parameter("image_checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="",
                                 annotation=str),
               inspect.Parameter("prep_parts", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=16, annotation=int),
               inspect.Parameter("run_baseline", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=True, annotation=bool),
               inspect.Parameter("tracking_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="", annotation=str)]

    def reproduce(*args: Any) -> None:
        kw = dict(zip([p.name for p in params], args))   # KFP passes the parameters in signature order
        for name in REPRODUCE_DATASETS:
            key = name.replace("-", "_")
            with dsl.If(kw[f"{key}_videos"] != "", name):
                settings = _light(dataset_sets(variant=kw["variant"], image_checkpoint=kw["image_checkpoint"],
                                               sets=kw[f"{key}_sets"]), "1", "1G")
                settings.set_display_name(f"settings-{name}")
                inner(dataset=name, annotations=kw[f"{key}_annotations"],
                      videos=kw[f"{key}_videos"], data_uri=kw[f"{key}_data_uri"], prep_parts=kw["prep_parts"],
                      recipe=name, sets=settings.output, run_baseline=kw["run_baseline"],
                      tracking_uri=kw["tracking_uri"]).set_display_name(f"sfa-{name}")

    reproduce.__signature__ = inspect.Signature(params)
    reproduce.__annotations__ = {p.name: p.annotation for p in params}
    summary = ("The SFA paper's six datasets, each trained with its recipe (stage 1, stage 2, evaluation, "
               "memory benchmark, report; baseline optional). Leave a dataset's videos empty to skip it.")
    described = {"variant": "ViViT variant of every dataset's runs (Ti, S, B, L, H, g); its sets may override it.",
                 "image_checkpoint": "the image ViT every spatial encoder starts from (a Hugging Face folder, timm "
                                     "or .npz; gs:// on a cluster); empty: random init.",
                 "prep_parts": "how many data-prep pieces run in parallel per dataset.",
                 "run_baseline": "also train the conventional recipe, for comparison.",
                 "tracking_uri": "the MLflow server, or none to run untracked (`sfa pipeline submit` refuses it "
                                 "empty)."}
    for name in REPRODUCE_DATASETS:
        key = name.replace("-", "_")
        described.update({f"{key}_annotations": f"{name}: comma-separated annotation files as released.",
                          f"{key}_videos": f"{name}: the folder or bucket prefix of its videos (empty: skip {name}).",
                          f"{key}_data_uri": f"{name}: where its shards and manifest.json go (gs://).",
                          f"{key}_sets": f"{name}: `--set key=value` overrides of its runs (after variant and "
                                         "image_checkpoint)."})
    reproduce.__doc__ = summary + "\n\nArgs:\n" + "\n".join(f"    {p.name}: {described[p.name]}" for p in params)
    return dsl.pipeline(name="reproduce", description=summary)(reproduce)
