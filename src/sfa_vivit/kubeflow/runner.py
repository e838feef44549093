"""`sfa pipeline compile|run|submit|schedule`.

compile   components/*.yaml, pipelines/*.yaml and k8s/profiles.yaml from the code (checked in; a test
          fails when they are stale)
run       the `sfa` pipeline locally through kfp.local's SubprocessRunner on synthetic data generated
          on the fly, MLflow in a SQLite file, artifacts under ./runs/<run-id>/
submit    a compiled pipeline to a KFP endpoint (kfp.Client) or to Vertex AI Pipelines
schedule  recurring runs of the pipeline, one per dataset
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPILED_PIPELINES = {  # file name -> (builder, profile)
    "sfa-cpu.yaml": ("sfa", "cpu"),
    "sfa-gpu-t4.yaml": ("sfa", "gpu-t4"),
    "sfa-gpu-a100.yaml": ("sfa", "gpu-a100"),
    "sfa-gpu-h100.yaml": ("sfa", "gpu-h100"),
    "sfa-gpu-a100-x4.yaml": ("sfa", "gpu-a100-x4"),
    "sfa-tpu-v3-8.yaml": ("sfa", "tpu-v3-8"),
    "sfa-tpu-v3-64.yaml": ("sfa", "tpu-v3-64"),
    "reproduce-gpu-a100.yaml": ("reproduce", "gpu-a100"),
    "reproduce-tpu-v3-8.yaml": ("reproduce", "tpu-v3-8"),
}


class PipelineError(RuntimeError):
    """A submission or scheduling problem, said in one line."""


def _builder(name: str):
    from sfa_vivit.kubeflow import pipelines
    return {"sfa": pipelines.build_sfa, "reproduce": pipelines.build_reproduce}[name]


def compile_pipeline(name: str, profile: str, out: str, target: str = "kubeflow", *, image: str | None = None,
                     registry: str | None = None, operator: str = "trainjob",
                     prep_parallelism: int | None = None, queue: str = "", tag: str | None = None) -> str:
    """Compile pipeline `name` for `profile` into `out`. Every executor runs `image` when given, else the
    profile's flavour (cpu, cuda, tpu) of `registry` (default: the project's) with `tag` (default: the
    package version; `image` may pin a digest: REGISTRY/NAME@sha256:...). operator: what runs a
    multi-node profile's training on Kubeflow ('trainjob': Kubeflow Trainer v2; 'pytorchjob': v1).
    prep_parallelism: data-prep pieces that run at once (default pipelines.PREP_PARALLELISM). queue: the Kueue
    LocalQueue a multi-node profile's jobs go to (gang scheduling), none by default."""
    from kfp import compiler

    from sfa_vivit.kubeflow import pipelines, profiles
    from sfa_vivit.kubeflow.components import REGISTRY, image_for
    parallelism = pipelines.PREP_PARALLELISM if prep_parallelism is None else prep_parallelism
    compiler.Compiler().compile(_builder(name)(profile, target, operator, parallelism, queue), out)
    set_image(out, image or image_for(profiles.get(profile).image_flavour, registry or REGISTRY, tag))
    return out


GCPC_IMAGE = "google-cloud-pipeline-components"   # in the name of the launcher image Vertex custom jobs start


def _yaml_loader():
    """libyaml's safe loader where PyYAML has it (10x faster on a 0.5 MB compiled pipeline), else PyYAML's."""
    import yaml
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def set_custom_job_identity(package: str, service_account: str | None, network: str | None,
                            out: str | None = None) -> str:
    """Write `package` (a Vertex compile) to `out` with every custom job (the steps with worker pools) running
    as `service_account` on VPC `network` (projects/NUMBER/global/networks/NAME). Without them a custom job runs
    as the Vertex AI Custom Code Service Agent, not the run's service account, and reaches no private address
    (an internal MLflow). Returns the path written."""
    import yaml
    with open(package) as f:
        docs = list(yaml.load_all(f, Loader=_yaml_loader()))
    for component in docs[0].get("components", {}).values():
        params = component.get("inputDefinitions", {}).get("parameters", {})
        if "worker_pool_specs" not in params:
            continue
        for key, value in (("service_account", service_account), ("network", network)):
            if value and key in params:
                params[key]["defaultValue"] = value
    out = out or package
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=True)
    return out


def set_image(package: str, image: str, out: str | None = None) -> str:
    """Write `package` (compiled pipeline YAML) to `out` (default: in place) with every step running `image`
    (a Vertex custom job's machines too; its launcher keeps its own image). Returns the path written."""
    import yaml
    if not image or any(c.isspace() for c in image):
        raise PipelineError(f"--image {image!r} is not an image reference")
    with open(package) as f:
        docs = list(yaml.load_all(f, Loader=_yaml_loader()))
    for executor in docs[0].get("deploymentSpec", {}).get("executors", {}).values():
        # A Vertex custom job's executor is Google Cloud Pipeline Components' launcher, in its own image
        # (our images do not carry it); the job's machines run our image, set in its worker pools below.
        if "container" in executor and GCPC_IMAGE not in executor["container"].get("image", ""):
            executor["container"]["image"] = image
    for component in docs[0].get("components", {}).values():     # Vertex custom jobs (multi-node, TPU v5e)
        pools = component.get("inputDefinitions", {}).get("parameters", {}).get("worker_pool_specs", {})
        for pool in pools.get("defaultValue") or []:
            pool["container_spec"]["image_uri"] = image
    out = out or package
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=True)
    return out


def compile_all(root: str | Path) -> list[str]:
    """Write every checked-in compiled file under `root` (the repository); returns their paths."""
    import yaml
    from kfp import compiler

    from sfa_vivit.kubeflow import profiles
    from sfa_vivit.kubeflow.components import COMPONENTS
    root = Path(root)
    written = []
    for name, component in COMPONENTS.items():
        path = root / "components" / f"{name.replace('-', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(component, str(path))
        written.append(str(path))
    for file, (name, profile) in COMPILED_PIPELINES.items():
        path = root / "pipelines" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(compile_pipeline(name, profile, str(path)))
    path = root / "k8s" / "profiles.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Generated by `sfa pipeline compile` from sfa_vivit/kubeflow/profiles.py; do not edit.\n"
                    + yaml.safe_dump(profiles.as_config_map(), sort_keys=True))
    written.append(str(path))
    path = root / "k8s" / "kueue.yaml"
    path.write_text(KUEUE_HEADER + yaml.safe_dump_all(profiles.kueue_manifests(), sort_keys=False))
    written.append(str(path))
    return written


KUEUE_HEADER = """\
# Generated by `sfa pipeline compile` from sfa_vivit/kubeflow/profiles.py (kueue_manifests); do not edit here.
# Gang scheduling for multi-node training: a pipeline compiled with `--queue sfa-vivit` labels its TrainJobs
# (or PyTorchJobs) for this LocalQueue, and Kueue admits a job only when the ClusterQueue has quota for all of
# its nodes; otherwise the job waits, suspended, holding nothing (two jobs never each hold half the nodes).
#   Needs Kueue v0.15 or newer (API v1beta2; checked against v0.19.2) with the `trainer.kubeflow.org/trainjob`
#   integration (on in Kueue's default configuration; for `--operator pytorchjob` enable `kubeflow.org/pytorchjob`).
#   kubectl apply -n kubeflow -f k8s/kueue.yaml       # -n: where the runs' pods run (a profile namespace in
#                                                     # multi-user Kubeflow); the flavors and ClusterQueue are
#                                                     # cluster-wide
# Each flavor's quota holds exactly one job of the largest profile on those nodes: raise nominalQuota to what
# your node pools hold (nodes x allocatable) to admit more at once. `sfa cluster doctor` checks that a
# pipeline's queue exists and can admit its job.
"""


# ----------------------------------------------------------------------------------------------
# Local run
# ----------------------------------------------------------------------------------------------

def local_image_vit(size: str = "default") -> dict[str, Any]:
    """ImageViTOptions fields of the local run's image checkpoint (the spatial init of stage 1 and the
    baseline, as the paper's ImageNet ViT): the library's defaults, or a few steps for the tests."""
    if size == "tiny":
        return dict(difficulty="easy", videos=6, val_videos=2, frames_per_video=2, steps=3, batch_size=4,
                    warmup_steps=1)
    return dict(difficulty="textures", task="object_cell")


def local_arguments(size: str = "default") -> tuple[dict[str, Any], dict[str, Any]]:
    """(synthetic data options, pipeline arguments) of the local run. 'default' is the main job
    (minutes on 2 cores); 'tiny' is for the tests."""
    if size == "tiny":
        from sfa_vivit.train.config import tiny_sets
        model = [*tiny_sets(), "epochs=2"]
        return (dict(num_train=24, num_val=8, num_frames=16, size=32, fps=16, difficulty="easy"),
                dict(sets=model, stage1_sets=["num_frames=4"], stage2_sets=["num_frames=8", "cache_views=2"],
                     baseline_sets=["num_frames=8"], eval_views="1x1", short_side=32, shard_size=6, prep_parts=2,
                     membench_variant="Ti", membench_frames="4,8", membench_image_size=32,
                     membench_model_sizes={"spatial_depth": 1, "temporal_depth": 1}, fps=16.0, prep_workers=1))
    return (dict(num_train=960, num_val=600, num_frames=16, size=32, fps=16, difficulty="textures-solo"),
            dict(sets=["image_size=32", "epochs=20", "optimizer=adamw", "base_lr=0.004", "weight_decay=0.05"],
                 stage1_sets=["num_frames=8"], stage2_sets=["num_frames=16", "cache_views=2", "epochs=40"],
                 baseline_sets=["num_frames=16", "epochs=30"], eval_views="1x1",
                 short_side=32, shard_size=64, prep_parts=2, membench_variant="Ti", membench_frames="8,16,32",
                 membench_image_size=64, membench_model_sizes={"width": 96, "spatial_depth": 4, "temporal_depth": 2,
                                                                 "heads": 4, "mlp_dim": 192, "patch": 8},
                 fps=16.0, prep_workers=1))


def cache_dir() -> Path:
    """Where the local run keeps what it makes once: $SFA_CACHE_DIR, else ~/.cache/sfa-vivit."""
    return Path(os.environ.get("SFA_CACHE_DIR") or Path.home() / ".cache" / "sfa-vivit")


def local_inputs(size: str = "default") -> tuple[dict[str, Any], dict[str, Any], dict[str, str], Path]:
    """(data options, pipeline arguments, synthetic data paths, image ViT folder) of the local run: the videos, the
    image ViT and the shards (the pipeline's `data_uri`) made once per fingerprint of their options and code, in the
    cache folder ($SFA_CACHE_DIR, else ~/.cache/sfa-vivit), so a second run goes straight to training."""
    from sfa_vivit.data.prep import synth
    from sfa_vivit.tools import synth_vit as image_vit
    data_options, arguments = local_arguments(size)
    cache = cache_dir()
    raw = cache / f"synth-{_fingerprint(data_options, synth.__file__)}"
    if (raw / "paths.json").exists():
        paths = json.loads((raw / "paths.json").read_text())
        log.info("synthetic data: cached at %s (made by an earlier run with these options)", raw)
    else:
        log.info("synthetic data: %d + %d videos of %d frames -> %s (made once; later runs reuse it)",
                 data_options["num_train"], data_options["num_val"], data_options["num_frames"], raw)
        paths = _made_once(raw, lambda folder: synth.generate(folder, synth.SynthOptions(**data_options)))
    # The image checkpoint is an input of the pipeline, as a real dataset's ImageNet ViT would be.
    vit_options = image_vit.ImageViTOptions(**local_image_vit(size))
    # Only the settings that shape the model shape its image checkpoint (the optimizer's are the video runs')
    shape = [s for s in arguments["sets"] if s.split("=")[0].startswith("model.") or
             s.split("=")[0] in ("image_size", "variant")]
    vit_key = _fingerprint([dataclasses.asdict(vit_options), shape], image_vit.__file__)
    vit_dir = cache / f"image-vit-{vit_key}"
    if not (vit_dir / image_vit.REPORT).exists():
        log.info("pretraining the synthetic image ViT (the stand-in for the paper's ImageNet checkpoint): %d steps, "
                 "about 4 min on 2 free cores; made once, later runs reuse it from %s", vit_options.steps, vit_dir)
    vit = image_vit.pretrain(str(vit_dir), vit_options, sets=shape, progress=True)
    log.info("image ViT -> %s (held-out accuracy %.1f%%, %.0f s to train)", vit_dir, vit["val_accuracy"], vit["time_s"])
    # The shards too: the pipeline's prep writes them here, so a later run's prep finds every shard done (its
    # sidecar) and skips it, in seconds instead of a minute. What prep writes depends on the videos, the options
    # that shape a shard and prep's code (the parts and workers only share out the work).
    from sfa_vivit.data.prep import annotations, shards, video
    prep = {k: arguments[k] for k in ("fps", "short_side", "shard_size") if k in arguments}
    prep_key = _fingerprint([raw.name, prep], shards.__file__, video.__file__, annotations.__file__)
    arguments["data_uri"] = str(cache / f"shards-{prep_key}")
    return data_options, arguments, paths, vit_dir


def run_local(runs: str = "runs", run_id: str | None = None, size: str = "default",
              run_baseline: bool = True) -> dict[str, Any]:
    """Run the `sfa` pipeline here (kfp.local SubprocessRunner, this Python environment) on synthetic
    data; returns where the report, artifacts and MLflow store are, and the report's summary."""
    from kfp import local

    from sfa_vivit.kubeflow import local_log
    from sfa_vivit.kubeflow.pipelines import build_sfa
    run_id = run_id or time.strftime("sfa-%Y%m%d-%H%M%S")
    root = Path(runs).resolve() / run_id
    root.mkdir(parents=True, exist_ok=True)
    data_options, arguments, paths, vit_dir = local_inputs(size)
    shards_lock = _shards_lock(Path(arguments["data_uri"]))
    if shards_lock is None:         # another local run is using the cached shards now: this one makes its own
        log.info("data shards: %s is in use by another run; this run makes its own in %s", arguments["data_uri"],
                 root / "data")
        arguments["data_uri"] = str(root / "data")
    else:
        log.info("data shards -> %s (%s)", arguments["data_uri"],
                 "made by an earlier run: this run's prep finds them done"
                 if (Path(arguments["data_uri"]) / "manifest.json").exists()
                 else "made by this run's prep; later runs reuse them")
    # Stage 1 and the baseline start from it; stage 2 starts from stage 1 (given it, it would warn that it is unused)
    for name in ("stage1_sets", "baseline_sets"):
        arguments[name] = [*arguments[name], f"image_checkpoint={vit_dir}"]
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments.update(dataset="synthetic", annotations=f"{paths['train']},{paths['validation']}",
                     videos=paths["videos"], recipe="synthetic",
                     run_baseline=run_baseline, tracking_uri=tracking_uri)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "artifacts"),
               raise_on_error=True)
    pipeline = build_sfa("cpu")
    total = local_log.task_count(pipeline.pipeline_spec, arguments["prep_parts"], run_baseline)
    history = cache_dir() / f"local-run-times-{size}{'' if run_baseline else '-no-baseline'}.json"
    log_path = root / "pipeline.log"
    log.info("running the pipeline: %d tasks; the terminal shows each task and our lines, the whole log "
             "(KFP's executor input and output, library warnings) goes to %s", total, log_path)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        tasks = local_log.TaskLog(log_file, sys.stdout, total, local_log.load_history(history))
        printer = builtins.print      # kfp.local indents print() per task and, with tasks in parallel threads,
        try:                          # can leave it indented for good
            with contextlib.redirect_stdout(tasks):
                pipeline(**arguments)
        except RuntimeError as e:
            raise PipelineError(f"{' '.join(local_log.plain(str(e)).split())}; the whole log: {log_path}") from None
        finally:
            builtins.print = printer
            if shards_lock is not None:
                shards_lock.close()     # the cached shards are free for the next run
    local_log.save_history(history, tasks.durations)
    seconds = time.perf_counter() - start
    pages = sorted(glob.glob(str(root / "artifacts" / "**" / "report*" / "page"), recursive=True))
    if not pages:
        raise PipelineError(f"the pipeline finished but wrote no report under {root / 'artifacts'}")
    # KFP names an HTML artifact after its output ("page", no extension): browsers would show its source.
    report = root / "report.html"
    shutil.copyfile(pages[-1], report)
    summary = {"run_id": run_id, "root": str(root), "report": str(report), "tracking_uri": tracking_uri,
               "pipeline_seconds": round(seconds, 1), "arguments": arguments,
               "validation_clips": data_options["num_val"]}
    summary.update(_report_summary(tracking_uri))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _fingerprint(options: Any, *sources: str) -> str:
    """A short hash of `options` and the source files of the code that turns them into files."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:12]


def _shards_lock(folder: Path) -> Any | None:
    """An open file holding an exclusive lock beside the cached shards `folder` for as long as this process keeps
    it (the local run keeps it to its end), or None when another local run holds it: two runs' data prep in one
    folder would meet at its lease, and the second would stop."""
    import fcntl
    folder.parent.mkdir(parents=True, exist_ok=True)
    handle = open(folder.parent / f"{folder.name}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _made_once(folder: Path, make: Any) -> dict[str, str]:
    """`make(tmp)` into a temporary sibling of `folder`, then renamed into place (a run killed half-way leaves
    no half-made cache; two runs making it at once keep the first). Returns the paths `make` returned, rebased
    onto `folder`, also saved as folder/paths.json."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    made = make(str(tmp))
    paths = {k: str(folder / os.path.relpath(v, tmp)) for k, v in made.items()}
    (tmp / "paths.json").write_text(json.dumps(paths))
    try:
        os.rename(tmp, folder)
    except OSError:                  # another run made it meanwhile: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((folder / "paths.json").read_text())
    return paths


def _report_summary(tracking_uri: str) -> dict[str, Any]:
    """The report step's MLflow metrics (SFA vs baseline time and top-1)."""
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name("sfa-vivit")
        runs = client.search_runs([exp.experiment_id], "tags.`sfa.step` = 'report'", max_results=1)
        return {"figures": dict(runs[0].data.metrics)} if runs else {}
    except Exception as e:  # noqa: BLE001 - the summary is a convenience
        return {"figures_error": str(e)}


# ----------------------------------------------------------------------------------------------
# Cluster
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KfpAuth:
    """How to reach a KFP API behind authentication, as kfp.Client does: a bearer token (`--token`, else the
    file KF_PIPELINES_SA_TOKEN_PATH names), session cookies of a signed-in browser (`--cookies`, for Dex or
    oauth2-proxy in front of Kubeflow), or a Google ID token for the OAuth client of Identity-Aware Proxy
    (`--iap-client-id`, for the service account GOOGLE_APPLICATION_CREDENTIALS names)."""
    token: str | None = None
    cookies: str | None = None
    iap_client_id: str | None = None

    def bearer(self) -> str | None:
        if self.token:
            return self.token
        if self.iap_client_id:
            try:
                import google.auth.transport.requests
                from google.oauth2 import id_token
                return id_token.fetch_id_token(google.auth.transport.requests.Request(), self.iap_client_id)
            except Exception as e:  # noqa: BLE001 - said in one line with what to do
                raise PipelineError(f"cannot get a Google ID token for IAP client {self.iap_client_id} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}): set "
                                    "GOOGLE_APPLICATION_CREDENTIALS to a service account key, or pass --token "
                                    "\"$(gcloud auth print-identity-token --audiences=CLIENT_ID "
                                    "--impersonate-service-account=SA)\"") from None
        path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
        if path:
            try:
                return Path(path).read_text().strip() or None
            except OSError as e:
                raise PipelineError(f"KF_PIPELINES_SA_TOKEN_PATH={path}: cannot read the token ({e.strerror})") \
                    from None
        return None

    def headers(self, bearer: str | None) -> dict[str, str]:
        return {**({"Authorization": f"Bearer {bearer}"} if bearer else {}),
                **({"Cookie": self.cookies} if self.cookies else {})}


def _kfp_client(host: str, namespace: str | None, auth: KfpAuth) -> Any:
    """kfp.Client for `host` with the same credentials the health check used."""
    import kfp
    bearer = auth.bearer()
    _check_endpoint(host, headers=auth.headers(bearer))
    return kfp.Client(host=host, **({"namespace": namespace} if namespace else {}),
                      **({"existing_token": bearer} if bearer else {}), **({"cookies": auth.cookies} if auth.cookies
                                                                             else {}))


def _check_endpoint(host: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> None:
    import requests
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        response = requests.get(url, timeout=timeout, headers=headers or {})
    except requests.RequestException as e:
        reason = type(e).__name__ + (f": {e.args[0]}" if e.args and isinstance(e.args[0], str) else "")
        raise PipelineError(f"KFP endpoint {host} is unreachable ({reason.splitlines()[0][:160]})") from None
    if response.status_code in (401, 403):
        said = "with the credentials given" if headers else "without credentials"
        raise PipelineError(f"{host} refused the request {said} ({url}: HTTP {response.status_code}): give --token "
                            "(or KF_PIPELINES_SA_TOKEN_PATH), --cookies of a signed-in session, or --iap-client-id")
    if response.status_code >= 500 or response.status_code == 404:
        raise PipelineError(f"{host} does not answer as a KFP endpoint ({url}: HTTP {response.status_code})")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        kind = response.headers.get("content-type", "unknown content").split(";")[0]
        raise PipelineError(f"{host} does not answer as a KFP endpoint: {url} returned {kind}, not KFP's JSON "
                            f"(HTTP {response.status_code}; a sign-in page of a proxy in front of Kubeflow? use the "
                            "pipeline API's own URL, or sign in and pass a token)")


def _require_root(root: str | None) -> None:
    if not root:
        # KFP's default root (MinIO in standalone KFP) hands a step local paths it uploads only when the step
        # ends: checkpoints written there die with a preempted pod, and its retry starts from step 0.
        raise PipelineError("--pipeline-root gs://BUCKET/PATH is required: training writes its checkpoints to its "
                            "output's URI as it goes, so that a retried step resumes from the last one")
    if not root.startswith("gs://"):
        raise PipelineError(f"pipeline root {root} must be a gs:// URL on a cluster")


def _check_bucket(root: str | None) -> None:
    _require_root(root)
    from sfa_vivit.core.storage import url_to_fs
    bucket = root[len("gs://"):].split("/", 1)[0]
    try:
        fs, _ = url_to_fs(root)
        exists = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - any failure is the same answer for the user
        raise PipelineError(f"cannot read bucket gs://{bucket} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    if not exists:
        raise PipelineError(f"bucket gs://{bucket} does not exist (pipeline root {root})")


def pipeline_inputs(package: str) -> dict[str, Any]:
    """The parameters a compiled pipeline takes: name → default (None when it has none)."""
    import yaml
    if not os.path.exists(package):
        raise PipelineError(f"{package}: no such compiled pipeline (run `sfa pipeline compile`)")
    with open(package) as f:
        spec = next(yaml.load_all(f, Loader=_yaml_loader()))     # the PipelineSpec; a platform spec may follow
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: p.get("defaultValue") for name, p in params.items()}


def check_parameters(package: str, params: dict[str, Any]) -> None:
    """Raise PipelineError naming every parameter the compiled pipeline does not take."""
    known = pipeline_inputs(package)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise PipelineError(f"{package} has no parameter(s) {unknown}; it takes {sorted(known)}")


def check_tracking(package: str, params: dict[str, Any], *, vertex: bool = False) -> None:
    """Raise PipelineError unless the run says where it is tracked: a compiled pipeline with a `tracking_uri`
    input needs it set (here or compiled in), to a server or to `none`. Left empty, steps would fall back to a
    SQLite file inside each pod, which vanishes with it: tracking silently absent. On Vertex AI the steps run
    outside any Kubernetes cluster, so an in-cluster Service name cannot resolve there."""
    from sfa_vivit.train.tracking import UNTRACKED
    known = pipeline_inputs(package)
    if "tracking_uri" not in known:
        return
    uri = str(params.get("tracking_uri", known["tracking_uri"]) or "")
    if not uri:
        raise PipelineError("tracking_uri is not set: give the MLflow server (--param tracking_uri="
                            "http://mlflow.sfa-vivit.svc.cluster.local:5000 for k8s/mlflow.yaml) or tracking_uri=none "
                            "to run untracked; left empty, each step would track into a file inside its pod")
    if uri == UNTRACKED:
        return
    from urllib.parse import urlparse
    host = urlparse(uri).hostname or ""
    if vertex and (host.endswith((".svc", ".cluster.local")) or ".svc." in host or (host and "." not in host
                                                                                   and host != "localhost")):
        raise PipelineError(f"tracking_uri={uri}: Vertex AI runs its steps outside your cluster, where the Service "
                            f"name {host} does not resolve; give an address reachable from the VPC network you pass "
                            "with --network (an internal load balancer in front of MLflow), or tracking_uri=none")


def check_images(package: str) -> None:
    """Raise PipelineError when a step would pull an image of the project's default registry, which
    publishes none: every pod would stop in ImagePullBackOff. Images come from `--registry` at compile time or
    `--image` at submission, after building and pushing them (containers/README.md)."""
    import yaml

    from sfa_vivit.kubeflow.components import REGISTRY
    with open(package) as f:
        spec = next(yaml.load_all(f, Loader=_yaml_loader()))
    images = {e["container"]["image"] for e in spec.get("deploymentSpec", {}).get("executors", {}).values()
              if "container" in e}
    images |= {pool["container_spec"]["image_uri"] for c in spec.get("components", {}).values()
               for pool in c.get("inputDefinitions", {}).get("parameters", {}).get("worker_pool_specs", {})
               .get("defaultValue") or []}
    default = sorted(i for i in images if i.startswith(f"{REGISTRY}:"))
    if default:
        raise PipelineError(f"{package} runs {default[0]}, from the project's default registry, where no image is "
                            "published: build and push the images (containers/README.md), then compile with "
                            "--registry REGISTRY/NAME or submit with --image IMAGE")


def submit(package: str, *, host: str | None = None, vertex: str | None = None, pipeline_root: str | None = None,
           params: dict[str, Any] | None = None, run_name: str | None = None, experiment: str = "sfa-vivit",
           service_account: str | None = None, namespace: str | None = None, image: str | None = None,
           network: str | None = None, auth: KfpAuth = KfpAuth()) -> str:
    """Submit a compiled pipeline; returns the run's id (KFP) or resource name (Vertex). Every parameter is
    checked against the compiled pipeline's inputs before any request; `image` replaces every step's image
    (in a copy of the package). On Vertex, the custom jobs run as `service_account` on `network` too."""
    check_parameters(package, params or {})
    check_tracking(package, params or {}, vertex=bool(vertex))
    import tempfile
    copy = os.path.join(tempfile.mkdtemp(prefix="sfa-submit-"), os.path.basename(package))
    if image:
        package = set_image(package, image, out=copy)
    check_images(package)
    if vertex and (service_account or network):
        package = set_custom_job_identity(package, service_account, network, out=copy)
    if bool(host) == bool(vertex):
        raise PipelineError("give exactly one of --host (a KFP endpoint) and --vertex PROJECT/REGION")
    run_name = run_name or f"{Path(package).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if vertex:
        project, _, region = vertex.partition("/")
        if not project or not region:
            raise PipelineError(f"--vertex {vertex!r}: expected PROJECT/REGION")
        if not pipeline_root:
            raise PipelineError("--pipeline-root gs://BUCKET/PATH is required for Vertex AI Pipelines")
        try:
            from google.cloud import aiplatform
        except ImportError:
            raise PipelineError("Vertex AI submission needs google-cloud-aiplatform: "
                                "pip install -c constraints.txt 'sfa-vivit[vertex]'") from None
        _check_bucket(pipeline_root)
        aiplatform.init(project=project, location=region)
        job = aiplatform.PipelineJob(display_name=run_name, template_path=package, pipeline_root=pipeline_root,
                                     parameter_values=params or {})
        try:
            job.submit(service_account=service_account, network=network, experiment=experiment)
        except Exception as e:  # noqa: BLE001 - the API's own message, in one line
            raise PipelineError(f"Vertex AI refused or half-took the run {run_name} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return job.resource_name
    _require_root(pipeline_root)
    client = _kfp_client(host, namespace, auth)
    _check_bucket(pipeline_root)
    run = client.create_run_from_pipeline_package(package, arguments=params or {}, run_name=run_name,
                                                  experiment_name=experiment, namespace=namespace,
                                                  pipeline_root=pipeline_root, service_account=service_account)
    return run.run_id


def staggered_crons(cron: str, count: int, minutes: int) -> list[str]:
    """`count` KFP cron expressions (with seconds) `minutes` apart, from `cron`'s minute and hour."""
    fields = cron.split()
    if minutes == 0:
        return [cron] * count
    if len(fields) != 6 or not (fields[1].isdigit() and fields[2].isdigit()):
        raise PipelineError(f"--cron {cron!r}: to stagger the runs it must name a fixed minute and hour "
                            "('SEC MIN HOUR DOM MON DOW'), or pass --stagger-minutes 0")
    start = int(fields[2]) * 60 + int(fields[1])
    if start + (count - 1) * minutes >= 24 * 60:
        raise PipelineError(f"{count} runs {minutes} min apart from {fields[2]}:{fields[1]} pass midnight; "
                            "start earlier or stagger less")
    return [" ".join([fields[0], str((start + i * minutes) % 60), str((start + i * minutes) // 60), *fields[3:]])
            for i in range(count)]


def schedule(package: str, *, host: str, datasets: dict[str, dict[str, Any]], cron: str = "0 0 3 * * 0",
             experiment: str = "sfa-vivit-reproductions", pipeline_root: str | None = None,
             service_account: str | None = None, namespace: str | None = None,
             stagger_minutes: int = 60, auth: KfpAuth = KfpAuth()) -> list[str]:
    """One recurring run per dataset (its name is both the data-prep dataset and the recipe), `stagger_minutes`
    apart; every parameter is checked against the compiled pipeline's inputs before any request. Returns ids."""
    from sfa_vivit.kubeflow.pipelines import REPRODUCE_DATASETS
    from sfa_vivit.train.config import RECIPES, recipe_dataset
    named = {r for r in RECIPES if recipe_dataset(r) == r}       # a dataset with a recipe of its own name
    unknown = sorted(set(datasets) - named)
    if unknown:
        raise PipelineError(f"unknown datasets {unknown}; choose from {list(REPRODUCE_DATASETS)} (or another "
                            f"dataset with a recipe: {sorted(named - set(REPRODUCE_DATASETS))})")
    runs = {name: {"dataset": name, "recipe": name, **values} for name, values in datasets.items()}
    for params in runs.values():
        check_parameters(package, params)
        check_tracking(package, params)
    check_images(package)
    crons = staggered_crons(cron, len(runs), stagger_minutes)
    _require_root(pipeline_root)
    client = _kfp_client(host, namespace, auth)
    _check_bucket(pipeline_root)
    exp = client.create_experiment(experiment, namespace=namespace)
    ids = []
    for (name, params), when in zip(runs.items(), crons):
        job = client.create_recurring_run(exp.experiment_id, job_name=f"sfa-{name}", cron_expression=when,
                                          pipeline_package_path=package, params=params, max_concurrency=1,
                                          no_catchup=True, pipeline_root=pipeline_root,
                                          service_account=service_account)
        ids.append(job.recurring_run_id)
    return ids
