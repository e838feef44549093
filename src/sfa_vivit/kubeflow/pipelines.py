"""The `sfa` pipeline (one dataset: prep -> stage 1 -> stage 2 -> evaluate -> memory benchmark ->
report, with an optional baseline branch) and `reproduce` (the paper's six datasets, each with its
recipe). Built per accelerator profile: the profile's resources, node selector, tolerations and
/dev/shm go on the training and evaluation steps; the memory benchmark runs on the same pool.
"""


import inspect
from typing import Any, Callable, List

from kfp import dsl

from sfa_vivit.core import options
from sfa_vivit.data.prep import PrepOptions
from sfa_vivit.kubeflow import components as c
from sfa_vivit.kubeflow import profiles
from sfa_vivit.tools.membench import BenchOptions
from sfa_vivit.train.config import MODE_DEFAULTS, TrainConfig

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


def sfa_parameters() -> list[tuple[inspect.Parameter, str]]:
    """The `sfa` pipeline's parameters in the order the Kubeflow UI shows them, each with its description. The
    data-prep and memory-benchmark options, their names, defaults and texts, come from their declarations
    (PrepOptions, BenchOptions)."""
    def param(name: str, default: Any, annotation: Any, text: str) -> tuple[inspect.Parameter, str]:
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                 annotation=annotation), text

    a = c.ARGUMENTS
    return [
        param("dataset", "kinetics400", str, a["dataset"]),
        param("annotations", "", str, a["annotations"]),
        param("videos", "", str, a["videos"]),
        param("data_uri", "", str, a["data_uri"]),
        param("prep_parts", 1, int, a["parts"]),
        *[param(o.pipeline, o.pipeline_default, o.type, f"data prep: {o.help}.")
          for o in options.exposed(PrepOptions)],
        param("recipe", "kinetics400", str, "the training recipe (supplementary Table 1), named after its dataset "
                                            "like `dataset`."),
        param("sets", [], List[str], "key=value overrides for every training step (e.g. variant=L, "
                                     "image_checkpoint=gs://...)."),
        param("stage1_sets", _FRAMES["stage1"], List[str], "overrides for SFA stage 1 only."),
        param("stage2_sets", _FRAMES["stage2"], List[str], "overrides for SFA stage 2 only."),
        param("baseline_sets", _FRAMES["baseline"], List[str], "overrides for the conventional recipe only."),
        param("run_baseline", True, bool, "also train the conventional recipe, for comparison."),
        param("eval_views", "4x3", str, "clips x crops of the final evaluation (e.g. 4x3)."),
        *[param(o.pipeline, o.pipeline_default, o.type, f"memory benchmark: {o.help}.")
          for o in options.exposed(BenchOptions)],
        param("membench_model_sizes", {}, dict, f"memory benchmark: {a['model_sizes']}"),
        param("tracking_uri", "", str, "the MLflow server, or none to run untracked (`sfa pipeline submit` refuses "
                                       "it empty)."),
        param("require_tracking", False, bool, "fail at the first step when MLflow cannot be reached (else go on, "
                                               "untracked, and say so in the logs and the report)."),
    ]


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

    params = sfa_parameters()

    def sfa(*args: Any) -> None:
        kw = dict(zip([p.name for p, _ in params], args))    # KFP passes the parameters in signature order
        tracking = _fresh(_light(c.start_tracking(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, pipeline_name="sfa",
                                           tracking_uri=kw["tracking_uri"], dataset=kw["dataset"],
                                           require_tracking=kw["require_tracking"]), "1", "2G"))
        parent = tracking.output
        source = {name: kw[name] for name in ("dataset", "annotations", "videos", "data_uri")}
        prep_args = dict(**source, **{o.name: kw[o.pipeline] for o in options.exposed(PrepOptions)})
        parts = _light(c.shard_parts(parts=kw["prep_parts"], recipe=kw["recipe"], **source), "1", "1G")
        with dsl.ParallelFor(parts.output, parallelism=prep_parallelism) as part:
            piece = _retried(_light(c.prepare_shards(part=part, parts=kw["prep_parts"], **prep_args), "8", "32G"))
        data = _retried(_light(c.prepare_data(parts_done=dsl.Collected(piece.output), **prep_args), "8",
                               "32G")).output
        stage1 = trainer(train_components["stage1"](data=data, recipe=kw["recipe"],
                                                    sets=_concat(kw["sets"], kw["stage1_sets"], prof, "stage1"),
                                                    tracking_uri=kw["tracking_uri"], parent_run_id=parent,
                                                    nproc=prof.nproc, cluster=cluster))
        stage2 = trainer(train_components["stage2"](data=data, stage1=stage1.outputs["model"], recipe=kw["recipe"],
                                        sets=_concat(kw["sets"], kw["stage2_sets"], prof, "stage2"),
                                        tracking_uri=kw["tracking_uri"], parent_run_id=parent, nproc=prof.nproc,
                                        cluster=cluster))
        evaluation = accelerated(evaluate(data=data, model=stage2.outputs["model"], views=kw["eval_views"],
                                            name="evaluate-sfa", tracking_uri=kw["tracking_uri"],
                                            parent_run_id=parent, **eval_procs), one_pod).set_display_name(
                                                "evaluate-sfa")
        membench = accelerated(memory_benchmark(
            **{o.name: kw[o.pipeline] for o in options.exposed(BenchOptions)},
            model_sizes=kw["membench_model_sizes"], tracking_uri=kw["tracking_uri"], parent_run_id=parent),
            profiles.one_accelerator(one_pod)).after(evaluation)
        report_args = dict(stage1=stage1.outputs["run_metrics"], stage2=stage2.outputs["run_metrics"],
                           evaluation=evaluation.outputs["results"], membench=membench.outputs["results"],
                           tracking_uri=kw["tracking_uri"], parent_run_id=parent)
        with dsl.If(kw["run_baseline"] == True, "baseline"):  # noqa: E712 - a pipeline condition, not a Python test
            baseline = trainer(train_components["baseline"](
                data=data, recipe=kw["recipe"], sets=_concat(kw["sets"], kw["baseline_sets"], prof, "baseline"),
                tracking_uri=kw["tracking_uri"], parent_run_id=parent, nproc=prof.nproc, cluster=cluster))
            baseline_eval = accelerated(evaluate(data=data, model=baseline.outputs["model"], views=kw["eval_views"],
                                                   name="evaluate-baseline", tracking_uri=kw["tracking_uri"],
                                                   parent_run_id=parent, **eval_procs),
                                        one_pod).set_display_name("evaluate-baseline")
            _fresh(_light(c.report(baseline=baseline.outputs["run_metrics"],
                                   baseline_evaluation=baseline_eval.outputs["results"], **report_args))
                   ).set_display_name("report")
        with dsl.Else("no-baseline"):
            _fresh(_light(c.report(**report_args))).set_display_name("report")

    sfa.__signature__ = inspect.Signature([p for p, _ in params])
    sfa.__annotations__ = {p.name: p.annotation for p, _ in params}
    sfa.__doc__ = ("SFA (stage 1 -> stage 2) and, optionally, the conventional recipe on one dataset.\n\nArgs:\n"
                   + "\n".join(f"    {p.name}: {text}" for p, text in params))
    return dsl.pipeline(name="sfa", description=f"SFA two-stage ViViT-FE training vs the conventional recipe "
                                                f"(accelerator profile {profile}).")(sfa)


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
                 **{p.name: text for p, text in sfa_parameters()
                    if p.name in ("prep_parts", "run_baseline", "tracking_uri")}}
    for name in REPRODUCE_DATASETS:
        key = name.replace("-", "_")
        described.update({f"{key}_annotations": f"{name}: comma-separated annotation files as released.",
                          f"{key}_videos": f"{name}: the folder or bucket prefix of its videos (empty: skip {name}).",
                          f"{key}_data_uri": f"{name}: where its shards and manifest.json go (gs://).",
                          f"{key}_sets": f"{name}: `--set key=value` overrides of its runs (after variant and "
                                         "image_checkpoint)."})
    reproduce.__doc__ = summary + "\n\nArgs:\n" + "\n".join(f"    {p.name}: {described[p.name]}" for p in params)
    return dsl.pipeline(name="reproduce", description=summary)(reproduce)
