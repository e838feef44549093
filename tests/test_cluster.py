"""What the cluster does with what we emit, held offline to the behaviour of the real systems (their source
at the versions we support, kept as test data with path and commit): the run's RBAC against every call
KFP's pods and our launcher make, the retry window as Argo counts it, and the limits and fan-out a profile
namespace's quota sees. No cluster runs here (docs/cluster.md says what has never run on one)."""

import re
from pathlib import Path

import pytest
import yaml

from helpers import yaml_docs
from sfa_vivit.kubeflow import pipelines
from sfa_vivit.kubeflow.trainjob import TRAIN_SERVICE_ACCOUNT

ROOT = Path(__file__).resolve().parents[1]
NEEDS = yaml.safe_load((ROOT / "tests" / "data" / "kfp" / "needs.yaml").read_text())


def rules_of(account: str, docs: list[dict]) -> list[dict]:
    """The rules every Role or ClusterRole bound to ServiceAccount `account` grants (as the API server's RBAC
    authorizer unions them)."""
    roles = {(d["kind"], d["metadata"]["name"]): d.get("rules") or [] for d in docs
             if d and d.get("kind") in ("Role", "ClusterRole")}
    rules = []
    for binding in (d for d in docs if d and d.get("kind") in ("RoleBinding", "ClusterRoleBinding")):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in binding.get("subjects") or []):
            rules += roles.get((binding["roleRef"]["kind"], binding["roleRef"]["name"]), [])
    return rules


def grants(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any((group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
               and (resource in r.get("resources", []) or "*" in r.get("resources", []))
               and (verb in r.get("verbs", []) or "*" in r.get("verbs", [])) for r in rules)


def missing_rights(account: str, docs: list[dict]) -> list[str]:
    rules = rules_of(account, docs)
    return [f"{n['apiGroup'] or 'core'}/{n['resource']} {verb} ({n['by']})" for n in NEEDS["needs"]
            for verb in n["verbs"] if not grants(rules, n["apiGroup"], n["resource"], verb)]


def _manifests() -> list[dict]:
    return [d for path in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml_docs(path.read_text()) if d]


def test_the_runs_account_may_do_what_kfp_argo_and_our_launcher_call_and_the_training_pods_nothing():
    docs = _manifests()
    assert not missing_rights("sfa-vivit", docs)
    # The training job's pods run as an account with Workload Identity and no binding at all.
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert TRAIN_SERVICE_ACCOUNT in accounts and "iam.gke.io/gcp-service-account" in \
        accounts[TRAIN_SERVICE_ACCOUNT]["metadata"]["annotations"]
    assert rules_of(TRAIN_SERVICE_ACCOUNT, docs) == []
    # The check is live: a bare account (what the docs submitted with before) misses the driver's ConfigMap read.
    bare = [d for d in docs if d["kind"] not in ("RoleBinding", "ClusterRoleBinding")]
    assert any(m.startswith("core/configmaps get") for m in missing_rights("sfa-vivit", bare))


def _retry_policies(spec: dict) -> list[tuple[str, dict]]:
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    return [(name, task["retryPolicy"]) for dag in dags for name, task in dag["tasks"].items() if "retryPolicy" in task]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, f"{duration!r} is not a protobuf Duration in seconds"
    return float(match.group(1))


# The longest a retried step may take from its first start (a ViViT-L/H run on Kinetics, with preemptions).
LONGEST_STEP_S = 14 * 24 * 3600


@pytest.mark.parametrize("package", sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml")))
def test_a_retried_step_may_run_for_days_as_argo_counts_the_window(package):
    """KFP 2.17.0's Argo compiler turns a task's retryPolicy into retryStrategy {limit, backoff {duration,
    factor, maxDuration}} on the executor template (backend/src/v2/compiler/argocompiler/container.go L577-
    588, L599-685), durations as whole seconds. Argo v4.0.5 (workflow/controller/operator.go) fails the step
    once now > start of its FIRST attempt + maxDuration, refuses a backoff that would end past it, and sets
    that instant as every attempt's execution deadline: maxDuration bounds the whole step, retries included.
    It parses the factor as an integer."""
    spec, _ = yaml_docs((ROOT / "pipelines" / package).read_text())
    policies = _retry_policies(spec)
    assert policies, f"{package}: no step retries"
    for name, policy in policies:
        window = _seconds(policy["backoffMaxDuration"])
        deadline = 0 + window                    # the first attempt starts at 0
        assert deadline >= LONGEST_STEP_S, f"{package}/{name}: killed {window / 3600:.0f} h after its first start"
        factor = float(policy["backoffFactor"])
        assert factor == int(factor) and factor >= 1, f"{package}/{name}: factor {factor}"
        waits = [_seconds(policy["backoffDuration"]) * factor ** k for k in range(int(policy["maxRetryCount"]))]
        assert sum(waits) < window


def test_light_steps_have_limits_and_the_prep_fan_out_is_bounded(tmp_path):
    """A profile namespace's ResourceQuota on limits refuses pods without them; the prep fan-out is bounded by
    Argo's loop parallelism (KFP 2.17.0 argocompiler/dag.go L382-384: iteratorPolicy.parallelismLimit)."""
    from sfa_vivit.kubeflow import runner
    spec, _ = yaml_docs((ROOT / "pipelines" / "sfa-gpu-a100.yaml").read_text())
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        assert resources.get("cpuLimit") and resources.get("memoryLimit"), f"{name} has no limits: {resources}"
        assert resources["cpuLimit"] == resources["cpuRequest"], name
    loops = [task for c in spec["components"].values() if "dag" in c for task in c["dag"]["tasks"].values()
             if "parameterIterator" in task]
    loops += [task for task in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in task]
    assert loops and all(t["iteratorPolicy"]["parallelismLimit"] == pipelines.PREP_PARALLELISM for t in loops)
    out = runner.compile_pipeline("sfa", "cpu", str(tmp_path / "p.yaml"), prep_parallelism=3)
    spec, _ = yaml_docs(Path(out).read_text())
    assert "parallelismLimit: 3" in Path(out).read_text()
    with pytest.raises(ValueError, match="--prep-parallelism=0 must be >= 1"):
        runner.compile_pipeline("sfa", "cpu", str(tmp_path / "p.yaml"), prep_parallelism=0)


GKE = yaml.safe_load((ROOT / "tests" / "data" / "gke" / "machines.yaml").read_text())


def _tiered(amount: float, tiers: list) -> float:
    return sum(max(0.0, min(amount, float(hi)) - lo) * fraction for lo, hi, fraction in tiers)


def allocatable(machine: str, kind: str) -> tuple[float, float]:
    """(CPUs, GiB) a pod can request on an empty node of `machine`: the VM's, less the kernel's share, GKE's
    reservation (tests/data/gke/machines.yaml), the eviction threshold and the system DaemonSets of `kind`."""
    m, pods = GKE["machines"][machine], GKE["system_pods"][kind]
    memory = m["memory_gb"] * (1 - GKE["kernel_fraction"])
    memory -= _tiered(m["memory_gb"], GKE["memory_tiers"]) + GKE["eviction_mib"] / 1024 + pods["memory_mib"] / 1024
    cpu = m["vcpu"] - _tiered(m["vcpu"], GKE["cpu_tiers"]) - pods["millicores"] / 1000
    return cpu, memory


def _gib(quantity: str) -> float:
    units = {"G": 1e9 / 2**30, "Gi": 1.0, "M": 1e6 / 2**30, "Mi": 1 / 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([GM]i?)", quantity).groups()
    return float(number) * units[unit]


def test_every_profile_fits_on_one_node_of_its_machine_type():
    """A request above a node's allocatable is never scheduled (the pod stays Pending). gpu-t4 asked for 8
    CPUs, which no 8-vCPU node has left after GKE's reservation; now every profile is held to the node it names."""
    from sfa_vivit.kubeflow import profiles
    for name, p in profiles.PROFILES.items():
        assert p.machine_type in GKE["machines"], f"{name}: no machine type to size it for"
        kind = "tpu" if p.device == "xla" else "gpu" if p.accelerator else "cpu"
        cpu, memory = allocatable(p.machine_type, kind)
        assert float(p.cpu) <= cpu and _gib(p.memory) <= memory, \
            f"{name} asks {p.cpu} CPU / {p.memory}; an {p.machine_type} node leaves {cpu:.2f} CPU / {memory:.1f} GiB"
    # The arithmetic against nodes GKE reported (n1-standard-8: 7910m and 25.88 GiB allocatable).
    cpu, memory = allocatable("n1-standard-8", "cpu")
    assert abs(cpu + 0.5 - 7.91) < 1e-9 and 25.88 - 0.5 < memory + 1 < 25.88       # ours is the lower
    assert 8 > allocatable("n1-highmem-8", "gpu")[0]


def test_manifests_are_filled_in_one_step_and_a_placeholder_is_never_applied(tmp_path):
    """`sfa pipeline manifests` fills PROJECT_ID, BUCKET, the image registry, MLflow's database password and the
    runs' namespace; what it writes passes strict validation and keeps no placeholder outside comments."""
    import subprocess
    import sys

    from sfa_vivit.cli import main
    from sfa_vivit.kubeflow import manifests
    out = tmp_path / "k8s-my-proj"
    assert main(["pipeline", "manifests", "--project", "my-proj-123", "--bucket", "gs://my-bucket/",
                 "--registry", "europe-docker.pkg.dev/my-proj-123/sfa/sfa-vivit", "--namespace", "team-a",
                 "--root", str(ROOT), "--out", str(out)]) == 0
    files = sorted(out.glob("*.yaml"))
    assert [f.name for f in files] == sorted(p.name for p in (ROOT / "k8s").glob("*.yaml"))
    done = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", *map(str, files)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for f in files for d in yaml_docs(f.read_text()) if d}
    for text in (f.read_text() for f in files):
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\b(PROJECT_ID|BUCKET|CHANGE_ME_DB_PASSWORD)\b", code)
        assert "ghcr.io/sfa-vivit" not in code
    server = docs["Deployment", "mlflow"]["spec"]["template"]["spec"]
    assert server["serviceAccountName"] == "mlflow" and docs["ServiceAccount", "mlflow"]["metadata"]["namespace"] == \
        "sfa-vivit"
    args = server["containers"][0]["args"]
    assert "--artifacts-destination=gs://my-bucket/mlflow-artifacts" in args
    assert "--backend-store-uri=postgresql://mlflow:$(DB_PASSWORD)@mlflow-db:5432/mlflow" in args
    assert server["containers"][0]["image"] == "europe-docker.pkg.dev/my-proj-123/sfa/sfa-vivit:" + \
        docs["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
    password = docs["Secret", "mlflow-db"]["stringData"]["password"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)          # safe inside the database URL
    assert docs["RoleBinding", "sfa-vivit-run"]["subjects"][0]["namespace"] == "team-a"
    for account in ("sfa-vivit", "sfa-vivit-train", "mlflow"):
        assert docs["ServiceAccount", account]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == \
            "sfa-vivit@my-proj-123.iam.gserviceaccount.com"
    assert any("[sfa-vivit/mlflow]" in line for line in manifests.bindings("my-proj-123"))
    # Filled again into the same folder: the database password PostgreSQL was initialised with is kept.
    assert main(["pipeline", "manifests", "--project", "my-proj-123", "--bucket", "my-bucket", "--registry",
                 "localhost:5000/sfa", "--root", str(ROOT), "--out", str(out)]) == 0
    again = {d["kind"]: d for d in yaml_docs((out / "mlflow.yaml").read_text()) if d}
    assert again["Secret"]["stringData"]["password"] == password
    assert again["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("localhost:5000/sfa:")
    registry = "r.io/sfa"
    for kwargs, needle in ((dict(project="PROJECT_ID", bucket="b1x"), "--project"),
                           (dict(project="my-proj-123", bucket="BUCKET"), "--bucket"),
                           (dict(project="my-proj-123", bucket="b"), "--bucket"),
                           (dict(project="my-proj-123", bucket="my-bucket", registry="r.io/x:1"), "--registry"),
                           (dict(project="my-proj-123", bucket="my-bucket", registry="ghcr.io/sfa-vivit/sfa-vivit"),
                            "publishes none"),
                           (dict(project="my-proj-123", bucket="my-bucket", namespace="Team_A"), "--namespace")):
        with pytest.raises(manifests.ManifestError, match=needle):
            manifests.render(ROOT, **{"registry": registry, **kwargs})


def test_training_on_a_cluster_commits_a_checkpoint_every_30_minutes_unless_told_otherwise():
    """Checkpoints at epoch ends only lose up to an epoch of a spot TPU/GPU run to a preemption: every training
    step of a compiled pipeline starts from the profile's `checkpoint_every_minutes=30`, which the pipeline's
    own sets override (they come later)."""
    from sfa_vivit.kubeflow.pipelines import join_sets
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        spec, _ = yaml_docs(path.read_text())
        tasks = [t for c in [spec["root"]] + list(spec["components"].values()) if "dag" in c
                 for t in c["dag"]["tasks"].values() if t["taskInfo"]["name"].startswith("sets-")]
        assert len(tasks) >= 3, path.name
        for task in tasks:
            defaults = task["inputs"]["parameters"]["defaults"]["runtimeValue"]["constant"]
            assert defaults == ["checkpoint_every_minutes=30"], (path.name, task["taskInfo"]["name"])
    joined = join_sets.python_func(defaults=["checkpoint_every_minutes=30"], a=["checkpoint_every_minutes=5"], b=[],
                                   fixed=[])
    from sfa_vivit.train import resolve
    assert resolve("stage1", "kinetics400", sets=joined).checkpoint_every_minutes == 5


def test_evaluation_uses_every_gpu_of_its_pod_and_the_benchmark_asks_for_one():
    """Evaluation and the benchmark held a whole 8-GPU node and used cuda:0: evaluation now runs one process
    per GPU (torchrun; each reads its share of the shards and the counts are summed) with loader workers, and
    the memory benchmark, which measures one device, asks for one GPU and that share of the node."""
    from sfa_vivit.kubeflow import profiles
    for path in sorted((ROOT / "pipelines").glob("sfa-*.yaml")):
        spec, _ = yaml_docs(path.read_text())
        profile = profiles.get(path.stem.removeprefix("sfa-"))
        one_pod = profiles.get(profile.single_host) if profile.single_host else profile
        evals = [t for c in [spec["root"]] + list(spec["components"].values()) if "dag" in c
                 for t in c["dag"]["tasks"].values() if t["taskInfo"]["name"].startswith("evaluate")]
        assert len(evals) == 2, path.name
        for task in evals:
            given = {k: int(task["inputs"]["parameters"][k]["runtimeValue"]["constant"]) for k in ("nproc", "workers")}
            assert given["nproc"] == one_pod.nproc and given["workers"] == profiles.loader_workers(one_pod)
        bench = spec["deploymentSpec"]["executors"]["exec-memory-benchmark"]["container"]["resources"]
        if one_pod.accelerator == "nvidia.com/gpu":
            assert bench["accelerator"]["resourceCount"] == "1", path.name
            assert float(bench["cpuRequest"]) <= float(one_pod.cpu) / one_pod.accelerator_count
    a100 = profiles.get("gpu-a100")
    assert (a100.nproc, profiles.loader_workers(a100)) == (8, 8) and profiles.loader_workers(profiles.get("cpu")) == 0


@pytest.mark.integration
def test_the_evaluation_step_over_two_processes_gives_the_counts_of_one(tiny_data, stage1_run, tmp_path,
                                                                        no_mlflow_env):
    """The step as a GPU node runs it, on CPU: torchrun with two processes (gloo), loader workers, the same
    metrics.json as one process."""
    from kfp import dsl

    from sfa_vivit.kubeflow import steps

    def artifact(kind, uri):
        made = kind(uri=uri)
        made.path = uri                 # what KFP's launcher gives a step: a local path per artifact
        return made
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = steps.evaluate(
            artifact(dsl.Model, stage1_run), artifact(dsl.Dataset, tiny_data), views="2x1",
            metrics=artifact(dsl.Metrics, str(tmp_path / f"metrics{nproc}")),
            classification=artifact(dsl.ClassificationMetrics, str(tmp_path / f"confusion{nproc}")),
            results=artifact(dsl.Artifact, str(tmp_path / f"results{nproc}")), tracking_uri="none", nproc=nproc,
            workers=1)
    for key in ("num_examples", "top1", "top5", "confusion"):
        assert runs[2][key] == runs[1][key], key


# What each consumer may take of a training step (KFP's launcher downloads every input artifact before a step
# starts, backend/src/v2/component/launcher_v2.go at 2.17.0): the final model where it is needed (stage 2's
# init, evaluation), the run's figures for the report; never the run folder with its checkpoints and cache.
SMALL_OUTPUTS = {"train-stage2": {"model"}, "evaluate": {"model"}, "report": {"run_metrics"}}


def _artifact_sources(spec: dict) -> list[tuple[str, str, str, str]]:
    """(consuming container component, input, producer task's component, output key) of every artifact input
    of a container step, through the channels (`pipelinechannel--TASK-KEY`) of the DAGs around it."""
    dags = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
    task_component = {name: task["componentRef"]["name"] for c in dags for name, task in c["dag"]["tasks"].items()}
    found = []
    for c in dags:
        for task in c["dag"]["tasks"].values():
            consumer = task["componentRef"]["name"]
            if "executorLabel" not in spec["components"][consumer]:
                continue
            for name, source in task.get("inputs", {}).get("artifacts", {}).items():
                if "taskOutputArtifact" in source:
                    producer, key = source["taskOutputArtifact"]["producerTask"], \
                        source["taskOutputArtifact"]["outputArtifactKey"]
                else:
                    channel = source.get("componentInputArtifact", "")
                    if not channel.startswith("pipelinechannel--"):
                        continue
                    producer, _, key = channel.removeprefix("pipelinechannel--").rpartition("-")
                found.append((consumer, name, task_component.get(producer, producer), key))
    return found


def test_no_step_downloads_a_training_run_only_its_final_model_or_its_figures():
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        spec, _ = yaml_docs(path.read_text())
        outputs = {name: set(c.get("outputDefinitions", {}).get("artifacts", {})) for name, c in
                   spec["components"].items() if name.startswith("comp-train-")}
        assert outputs and all(keys == {"model", "metrics", "run_metrics"} for keys in outputs.values()), outputs
        sources = [s for s in _artifact_sources(spec) if s[2].startswith("comp-train-")]
        assert {next((k for k in SMALL_OUTPUTS if s[0].startswith(f"comp-{k}")), s[0]) for s in sources} == \
            set(SMALL_OUTPUTS), path.name                  # every kind of consumer was seen
        for consumer, name, producer, key in sources:
            kind = next((k for k in SMALL_OUTPUTS if consumer.startswith(f"comp-{k}")), None)
            assert kind and key in SMALL_OUTPUTS[kind], (path.name, consumer, name, producer, key)


def test_a_final_model_is_copied_whole_marker_last(tmp_path, stage1_run):
    """The Model artifact is the run's final model, copied file by file and committed by its marker last, so
    a copy cut short is no checkpoint and a retried step's copy completes it."""
    from sfa_vivit.models import checkpoints
    dst = tmp_path / "model"
    checkpoints.copy_committed(stage1_run, str(dst))
    final = checkpoints.resolve_model(stage1_run)
    a, b = checkpoints.load(str(dst)).model.state_dict(), checkpoints.load(final).model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    assert not (dst / "checkpoints").exists() and not list(dst.glob("state*"))
    (dst / checkpoints.MARKER_FILE).unlink()                 # cut short before the marker
    assert not checkpoints.is_committed(str(dst))
    checkpoints.copy_committed(stage1_run, str(dst))
    assert checkpoints.is_committed(str(dst))
    # A retry's copy over the committed one, cut short after its first file: not committed (it was, before).
    import fsspec.implementations.local as local_fs
    real, calls = local_fs.LocalFileSystem.copy, []

    def failing(self, *args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise OSError("the pod was killed")
        return real(self, *args, **kwargs)
    local_fs.LocalFileSystem.copy = failing
    try:
        with pytest.raises(OSError, match="killed"):
            checkpoints.copy_committed(stage1_run, str(dst))
    finally:
        local_fs.LocalFileSystem.copy = real
    assert not checkpoints.is_committed(str(dst))
