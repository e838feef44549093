"""`sfa cluster doctor`: what a run of a compiled pipeline needs from a cluster, checked before any pod starts.

Read-only: it asks the KFP API, the Kubernetes API (with the user's kubeconfig, as kubectl does), the image
registries and MLflow; it creates nothing but SubjectAccessReviews (questions, which the API server does not
store). Each check gives one row: ✓, ⚠ (works, but not as we tested it) or ✗ with the command that fixes it.

    sfa cluster doctor pipelines/sfa-gpu-t4.yaml --host https://KFP --namespace kubeflow \\
        --service-account sfa-vivit [--param tracking_uri=...] [--kubeconfig F] [--context C]
"""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace
from typing import Any, Callable

from sfa_vivit.kubeflow import profiles
from sfa_vivit.kubeflow.runner import KfpAuth, PipelineError, _check_endpoint, _yaml_loader

# The KFP backend our pipelines and RBAC were read against (tests/data/kfp/needs.yaml).
KFP_TESTED = (2, 17)
KFP_OLDEST = (2, 14)     # the oldest backend whose driver reads our platform spec's emptyDirMounts

# What the pods of a run call with the run's service account (k8s/rbac.yaml's Role grants them;
# tests/data/kfp/needs.yaml says who calls each and where in KFP's and Argo's source).
RUN_RIGHTS: tuple[tuple[str, str, str], ...] = (
    ("", "configmaps", "get"), ("", "secrets", "get"), ("", "pods", "get"), ("", "pods", "list"),
    ("", "pods/log", "get"), ("argoproj.io", "workflows", "get"),
    ("argoproj.io", "workflowtaskresults", "create"), ("argoproj.io", "workflowtaskresults", "patch"),
)
# What a multi-node profile's launcher step calls besides, by operator.
JOB_RIGHTS = {
    "trainjob": tuple(("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "delete")),
    "pytorchjob": tuple(("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "delete")),
}
# What a multi-node profile needs installed, by operator: CRDs, and cluster-scoped objects of them.
JOB_CRDS = {
    "trainjob": ("trainjobs.trainer.kubeflow.org", "clustertrainingruntimes.trainer.kubeflow.org",
                 "jobsets.jobset.x-k8s.io"),
    "pytorchjob": ("pytorchjobs.kubeflow.org",),
}
RUNTIME = ("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", "torch-distributed")
WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"

INSTALL_TRAINER = ("kubectl apply --server-side -k "
                   "'https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0' && "
                   "kubectl apply --server-side -k "
                   "'https://github.com/kubeflow/trainer.git/manifests/overlays/runtimes?ref=v2.3.0'")


@dataclasses.dataclass
class Row:
    check: str
    status: str          # "ok", "warn" or "fail"
    detail: str
    fix: str = ""

    @property
    def mark(self) -> str:
        return {"ok": "✓", "warn": "⚠", "fail": "✗"}[self.status]


@dataclasses.dataclass
class Step:
    """What one step of the compiled pipeline asks of a node."""
    name: str
    image: str
    cpu: float
    memory: float          # bytes
    accelerator: str | None
    accelerator_count: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, str]]


# ----------------------------------------------------------------------------------------------
# Reading the compiled pipeline
# ----------------------------------------------------------------------------------------------

def read_pipeline(package: str) -> tuple[dict, dict, list[Step]]:
    """(pipeline spec, platform spec, steps) of a compiled pipeline YAML."""
    import yaml
    try:
        with open(package) as f:
            docs = list(yaml.load_all(f, Loader=_yaml_loader()))
    except OSError as e:
        raise PipelineError(f"{package}: cannot read the compiled pipeline ({e.strerror})") from None
    spec = docs[0] if docs and isinstance(docs[0], dict) else {}
    if "deploymentSpec" not in spec:
        raise PipelineError(f"{package} is not a compiled KFP pipeline (no deploymentSpec)")
    platform = (docs[1] if len(docs) > 1 else {}).get("platforms", {}).get("kubernetes", {}).get(
        "deploymentSpec", {}).get("executors", {})
    steps = []
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor.get("container", {})
        resources = container.get("resources", {})
        accelerator = resources.get("accelerator", {})
        kube = platform.get(name, {})
        steps.append(Step(
            name=name.removeprefix("exec-"), image=container.get("image", ""),
            cpu=quantity(resources.get("resourceCpuRequest") or resources.get("cpuRequest") or 0),
            memory=quantity(resources.get("resourceMemoryRequest") or
                            (f"{resources['memoryRequest']}G" if "memoryRequest" in resources else 0)),
            accelerator=accelerator.get("resourceType") or accelerator.get("type"),
            accelerator_count=int(accelerator.get("resourceCount") or accelerator.get("count") or 0),
            node_selector=dict(kube.get("nodeSelector", {}).get("labels", {})),
            tolerations=list(kube.get("tolerations", []))))
    return spec, platform, steps


def pipeline_profile(spec: dict) -> profiles.Profile | None:
    """The accelerator profile a pipeline was compiled for (its description names it)."""
    found = re.search(r"accelerator profile ([\w.-]+)\)", spec.get("pipelineInfo", {}).get("description", ""))
    return profiles.PROFILES.get(found.group(1)) if found else None


def quantity(value: Any) -> float:
    """A Kubernetes quantity ('7', '7500m', '42G', '45Gi', 3.5) as a number (bytes for memory)."""
    try:
        return profiles.amount(value)
    except ValueError as e:
        raise PipelineError(str(e)) from None


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------

def check_kfp(host: str, auth: KfpAuth) -> list[Row]:
    """The KFP API answers with the user's credentials, and its version is one we support."""
    import requests
    try:
        headers = auth.headers(auth.bearer())
        _check_endpoint(host, headers=headers)
    except PipelineError as e:
        return [Row("KFP API", "fail", str(e), "check --host, and give --token, --cookies or --iap-client-id")]
    try:   # the API server says tag_name; KFP's UI, in front of it at .../pipeline, says apiServerTagName
        answer = requests.get(host.rstrip("/") + "/apis/v2beta1/healthz", headers=headers, timeout=5).json()
        tag = answer.get("tag_name") or answer.get("apiServerTagName")
        if not tag or tag == "unknown":
            raise ValueError("no release in the answer")
    except Exception:  # noqa: BLE001 - the version is a nicety; the API itself answered
        return [Row("KFP API", "warn", f"{host} answers; its version is not reported",
                    f"make sure it is KFP {KFP_OLDEST[0]}.{KFP_OLDEST[1]} or newer")]
    found = re.match(r"v?(\d+)\.(\d+)", str(tag))
    version = (int(found.group(1)), int(found.group(2))) if found else None
    if version is None or version[0] != 2 or version < KFP_OLDEST:
        return [Row("KFP API", "fail", f"{host} runs KFP {tag}; our pipelines need 2.{KFP_OLDEST[1]} or newer",
                    "upgrade Kubeflow Pipelines (https://www.kubeflow.org/docs/components/pipelines/operator-guides/"
                    "installation/)")]
    if version > KFP_TESTED:
        return [Row("KFP API", "warn", f"{host} runs KFP {tag}, newer than the {KFP_TESTED[0]}.{KFP_TESTED[1]} we "
                    "checked our pipelines against", "")]
    return [Row("KFP API", "ok", f"{host} answers, KFP {tag}")]


class Kube:
    """The Kubernetes API as kubectl reaches it (kubeconfig, context, its auth plugins)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None):
        from kubernetes import client, config
        try:
            self.api = config.new_client_from_config(config_file=kubeconfig, context=context)
        except Exception as e:  # noqa: BLE001 - no config, bad context: one line
            raise PipelineError(f"cannot use the kubeconfig{' ' + kubeconfig if kubeconfig else ''} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}): run `gcloud container "
                                "clusters get-credentials CLUSTER --region REGION` first") from None
        self.core = client.CoreV1Api(self.api)
        self.extensions = client.ApiextensionsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.authz = client.AuthorizationV1Api(self.api)

    def get(self, call: Callable, *args: Any, **kwargs: Any) -> Any:
        """The object, or None when the API says 404."""
        from kubernetes.client.exceptions import ApiException
        try:
            return call(*args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise


def _api_error(check: str, e: Exception) -> Row:
    status = getattr(e, "status", None)
    said = f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else f"{type(e).__name__}: {e}"
    fix = ("your account may not read this: ask for the cluster-wide `view` role" if status in (401, 403)
           else "check that kubectl reaches the cluster (`kubectl get nodes`)")
    return Row(check, "fail", f"the Kubernetes API refused the question ({said[:160]})", fix)


def check_operator(kube: Kube, operator: str) -> list[Row]:
    """A multi-node profile's CRDs, and Kubeflow Trainer's torch-distributed runtime."""
    rows = []
    for crd in JOB_CRDS[operator]:
        try:
            found = kube.get(kube.extensions.read_custom_resource_definition, crd)
        except Exception as e:  # noqa: BLE001
            rows.append(_api_error(f"CRD {crd}", e))
            continue
        fix = INSTALL_TRAINER if operator == "trainjob" else (
            "kubectl apply --server-side -k 'github.com/kubeflow/training-operator.git/manifests/overlays/"
            "standalone?ref=v1.9.3'")
        rows.append(Row(f"CRD {crd}", "ok", "installed") if found else
                    Row(f"CRD {crd}", "fail", "not installed: multi-node training steps cannot create their job", fix))
    if operator == "trainjob":
        group, version, plural, name = RUNTIME
        try:
            found = kube.get(kube.custom.get_cluster_custom_object, group, version, plural, name)
        except Exception as e:  # noqa: BLE001
            found = e
        if isinstance(found, Exception):
            rows.append(_api_error(f"runtime {name}", found))
        else:
            rows.append(Row(f"ClusterTrainingRuntime {name}", "ok", "installed") if found else
                        Row(f"ClusterTrainingRuntime {name}", "fail", "not installed: a TrainJob names it",
                            INSTALL_TRAINER))
    return rows


KUEUE = ("kueue.x-k8s.io", "v1beta2")
TAINT = ("key", "value", "effect")
INSTALL_KUEUE = ("kubectl apply --server-side -f "
                 "https://github.com/kubernetes-sigs/kueue/releases/download/v0.19.2/manifests.yaml")


def pipeline_jobs(spec: dict) -> list[Any]:
    """The multi-node jobs a compiled pipeline's launcher pods create (trainjob.NodeSpec, one per distinct
    spec): read from the constants the pipeline passes them."""
    from sfa_vivit.kubeflow.trainjob import NodeSpec
    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.startswith("{") and '"procs_per_node"' in node:
            try:
                found.setdefault(node, NodeSpec.from_json(node))
            except (ValueError, TypeError):
                pass

    walk(spec.get("root", {}))
    return list(found.values())


def kueue_refusal(job: Any, cluster_queue: dict, flavors: dict[str, dict]) -> str | None:
    """Why the ClusterQueue could not admit one `job` (trainjob.NodeSpec) alone, or None when a flavor holds it
    whole. Kueue v0.19.2's flavor assignment (pkg/scheduler/flavorassigner/flavorassigner.go): a flavor fits
    when the pods tolerate its NoSchedule/NoExecute taints, the pods' node selector agrees with its labels on
    the keys it names, and its nominal quota covers every requested resource times the job's nodes."""
    requests = job.resources.get("requests", {})
    reasons = []
    for group in cluster_queue.get("spec", {}).get("resourceGroups", []):
        for entry in group.get("flavors", []):
            name = entry.get("name")
            flavor = flavors.get(name)
            if flavor is None:
                reasons.append(f"flavor {name}: no such ResourceFlavor")
                continue
            spec = flavor.get("spec", {})
            untolerated = [t for t in spec.get("nodeTaints", []) if t.get("effect") in ("NoSchedule", "NoExecute")
                           and not _tolerates(job.tolerations, SimpleNamespace(**{k: t.get(k) for k in TAINT}))]
            if untolerated:
                reasons.append(f"flavor {name}: taint {untolerated[0].get('key')} not tolerated")
                continue
            labels = spec.get("nodeLabels", {})
            if any(key in labels and labels[key] != value for key, value in job.node_selector.items()):
                reasons.append(f"flavor {name}: its node labels are not the job's node selector")
                continue
            quota = {r.get("name"): quantity(r.get("nominalQuota", 0)) for r in entry.get("resources", [])}
            short = [f"{r} {quantity(v) * job.nodes:g} > {quota.get(r, 0):g}" for r, v in requests.items()
                     if quantity(v) * job.nodes > quota.get(r, 0)]
            if not short:
                return None
            reasons.append(f"flavor {name}: quota short of one job of {job.nodes} nodes ({'; '.join(short)})")
    return "; ".join(reasons) or "the queue has no resource groups"


def check_queue(kube: Kube, namespace: str, jobs: list[Any]) -> list[Row]:
    """Gang scheduling of the pipeline's multi-node jobs: without a queue, two jobs can each hold part of the
    nodes and wait for the rest; with one, its LocalQueue and ClusterQueue exist and can admit each job whole."""
    rows = []
    for queue in sorted({job.queue for job in jobs}):
        check = f"Kueue queue {queue}" if queue else "Kueue queue"
        if not queue:
            rows.append(Row(check, "warn", "the multi-node jobs have no queue: two at once (overlapping runs, a "
                            "retried job) can each hold part of the nodes and wait for the rest",
                            "kubectl apply -n NAMESPACE -f k8s/kueue.yaml, then sfa pipeline compile ... "
                            "--queue sfa-vivit"))
            continue
        mine = [job for job in jobs if job.queue == queue]
        try:   # the list first: a 404 there means the API server knows no such resource type (no Kueue)
            flavors = {f["metadata"]["name"]: f for f in
                       kube.custom.list_cluster_custom_object(*KUEUE, "resourceflavors").get("items", [])}
            local = kube.get(kube.custom.get_namespaced_custom_object, *KUEUE, namespace, "localqueues", queue)
            cluster = local and kube.get(kube.custom.get_cluster_custom_object, *KUEUE, "clusterqueues",
                                         local.get("spec", {}).get("clusterQueue", ""))
        except Exception as e:  # noqa: BLE001
            if getattr(e, "status", None) == 404:
                rows.append(Row(check, "fail", "Kueue (kueue.x-k8s.io/v1beta2) is not installed: the jobs "
                                "would stay suspended", INSTALL_KUEUE))
            else:
                rows.append(_api_error(check, e))
            continue
        if not local:
            rows.append(Row(check, "fail", f"no LocalQueue {queue} in namespace {namespace}: Kueue holds its "
                            "jobs suspended for ever", f"kubectl apply -n {namespace} -f k8s/kueue.yaml"))
            continue
        if not cluster:
            rows.append(Row(check, "fail", f"LocalQueue {queue} points at ClusterQueue "
                            f"{local.get('spec', {}).get('clusterQueue')!r}, which does not exist",
                            f"kubectl apply -n {namespace} -f k8s/kueue.yaml"))
            continue
        refusals = [r for r in (kueue_refusal(job, cluster, flavors) for job in mine) if r]
        rows.append(Row(check, "fail", f"cannot admit a job whole: {refusals[0][:300]}",
                        f"kubectl apply -n {namespace} -f k8s/kueue.yaml (its flavors are our profiles' nodes and "
                        "taints; raise a flavor's nominalQuota there to what your pools hold)")
                    if refusals else
                    Row(check, "ok", f"ClusterQueue {cluster['metadata']['name']} admits each multi-node job whole "
                        f"({', '.join(f'{j.nodes} nodes' for j in mine)})"))
    return rows


def check_service_account(kube: Kube, namespace: str, account: str, rights: tuple[tuple[str, str, str], ...],
                          root: str | None) -> list[Row]:
    """The account exists, may do every call the run's pods make (asked of the API server), and carries a
    Workload Identity annotation when the artifacts live on GCS."""
    from kubernetes import client
    check = f"service account {namespace}/{account}"
    try:
        found = kube.get(kube.core.read_namespaced_service_account, account, namespace)
    except Exception as e:  # noqa: BLE001
        return [_api_error(check, e)]
    if found is None:
        return [Row(check, "fail", "does not exist: every pod of the run would be refused",
                    f"kubectl apply -n {namespace} -f k8s/service-account.yaml -f k8s/rbac.yaml "
                    "(after `sfa pipeline manifests`)")]
    rows = [Row(check, "ok", "exists")]
    user = f"system:serviceaccount:{namespace}:{account}"
    refused = []
    for group, resource, verb in rights:
        resource_name, _, sub = resource.partition("/")
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(group=group, resource=resource_name,
                                                            subresource=sub or None, verb=verb, namespace=namespace)))
        try:
            answer = kube.authz.create_subject_access_review(review)
        except Exception as e:  # noqa: BLE001
            return [*rows, _api_error(f"rights of {account}", e)]
        if not (answer.status and answer.status.allowed):
            refused.append(f"{verb} {resource}" + (f" ({group})" if group else ""))
    if not rights:
        pass
    elif refused:
        rows.append(Row(f"rights of {account}", "fail", f"may not: {', '.join(refused)}",
                        f"kubectl apply -n {namespace} -f k8s/rbac.yaml"))
    else:
        rows.append(Row(f"rights of {account}", "ok", f"may do all {len(rights)} calls the run's pods make"))
    if root and root.startswith("gs://"):
        google = (found.metadata.annotations or {}).get(WORKLOAD_IDENTITY)
        if google:
            rows.append(Row(f"Workload Identity of {account}", "ok", f"acts as {google}"))
        else:
            rows.append(Row(f"Workload Identity of {account}", "fail",
                            f"no {WORKLOAD_IDENTITY} annotation: the pods cannot write {root}",
                            f"kubectl annotate sa -n {namespace} {account} {WORKLOAD_IDENTITY}=GSA@PROJECT.iam."
                            "gserviceaccount.com (and grant that account roles/iam.workloadIdentityUser)"))
    return rows


def _tolerates(tolerations: list[dict[str, str]], taint: Any) -> bool:
    if taint.effect not in ("NoSchedule", "NoExecute"):
        return True
    for t in tolerations:
        effect_ok = not t.get("effect") or t.get("effect") == taint.effect
        if t.get("operator", "Equal") == "Exists":
            key_ok = not t.get("key") or t.get("key") == taint.key
        else:
            key_ok = t.get("key") == taint.key and t.get("value", "") == (taint.value or "")
        if effect_ok and key_ok:
            return True
    return False


def _fits(node: Any, step: Step) -> str | None:
    """Why `node` cannot hold `step`, or None when it can."""
    labels = node.metadata.labels or {}
    missing = {k: v for k, v in step.node_selector.items() if labels.get(k) != v}
    if missing:
        return "labels " + ", ".join(f"{k}={v}" for k, v in missing.items())
    for taint in node.spec.taints or []:
        if not _tolerates(step.tolerations, taint):
            return f"taint {taint.key}={taint.value or ''}:{taint.effect}"
    allocatable = node.status.allocatable or {}
    if quantity(allocatable.get("cpu", 0)) < step.cpu:
        return f"{allocatable.get('cpu')} CPUs allocatable < {step.cpu:g} requested"
    if quantity(allocatable.get("memory", 0)) < step.memory:
        return f"{_gib(quantity(allocatable.get('memory', 0)))} allocatable < {_gib(step.memory)} requested"
    if step.accelerator and quantity(allocatable.get(step.accelerator, 0)) < step.accelerator_count:
        return f"{allocatable.get(step.accelerator, 0)} {step.accelerator} allocatable < {step.accelerator_count}"
    return None


def check_nodes(nodes: list[Any], steps: list[Step], profile: profiles.Profile | None) -> list[Row]:
    """Every step has a node that can hold it; a multi-node profile's training job has `nodes` of them (a TPU
    slice's in one node pool)."""
    rows = []
    groups: dict[tuple, list[str]] = {}
    by_key: dict[tuple, Step] = {}
    for step in steps:
        key = (step.cpu, step.memory, step.accelerator, step.accelerator_count,
               tuple(sorted(step.node_selector.items())), json.dumps(step.tolerations, sort_keys=True))
        groups.setdefault(key, []).append(step.name)
        by_key[key] = step
    for key, names in groups.items():
        step = by_key[key]
        wants = f"{step.cpu:g} CPU, {_gib(step.memory)}" + (
            f", {step.accelerator_count} {step.accelerator}" if step.accelerator else "") + (
            f" on {', '.join(f'{k}={v}' for k, v in step.node_selector.items())}" if step.node_selector else "")
        label = f"nodes for {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
        reasons = [_fits(node, step) for node in nodes]
        if any(r is None for r in reasons):
            rows.append(Row(label, "ok", f"{sum(r is None for r in reasons)} node(s) can hold {wants}"))
        else:
            closest = next((r for r in reasons if r and not r.startswith("labels")), None)
            rows.append(Row(label, "fail", f"no node can hold {wants}" + (f" (closest: {closest})" if closest else
                                                                            " (no node has those labels)"),
                            _pool_fix(profile, step)))
    if profile and profile.nodes > 1:
        job = Step(f"{profile.name} training job", "", quantity(profile.cpu), quantity(profile.memory),
                   profile.accelerator, profile.accelerator_count, dict(profile.node_selector),
                   [{"key": k, "operator": o, "effect": e} for k, o, e in profile.tolerations])
        fitting = [n for n in nodes if _fits(n, job) is None]
        pools: dict[str, int] = {}
        for n in fitting:
            pool = (n.metadata.labels or {}).get("cloud.google.com/gke-nodepool", "")
            pools[pool] = pools.get(pool, 0) + 1
        best = max(pools.values(), default=0)
        need_one_pool = profile.device == "xla"
        have = best if need_one_pool else len(fitting)
        label = f"{profile.nodes} nodes for the training job"
        if have >= profile.nodes:
            rows.append(Row(label, "ok", f"{have} node(s){' in one pool' if need_one_pool else ''} can hold a worker"))
        else:
            where = " in one node pool (a TPU slice)" if need_one_pool else ""
            pool = max(pools, key=pools.get) if pools else ""
            fix = (f"gcloud container clusters resize CLUSTER --region REGION --node-pool {pool} --num-nodes "
                   f"{profile.nodes} (or let its autoscaler reach {profile.nodes})" if pool and not need_one_pool
                   else _pool_fix(profile, job, count=profile.nodes))
            rows.append(Row(label, "fail", f"{have} node(s){where} can hold a worker; the job needs {profile.nodes}",
                            fix))
    return rows


def _pool_fix(profile: profiles.Profile | None, step: Step, count: int = 1) -> str:
    if profile is None or not profile.machine_type or not step.node_selector:
        return "add a node pool with these labels and resources (docs/cluster.md, step 3)"
    accelerator = step.node_selector.get("cloud.google.com/gke-accelerator")
    topology = step.node_selector.get("cloud.google.com/gke-tpu-topology")
    return (f"gcloud container node-pools create sfa-{profile.name} --cluster CLUSTER --region REGION "
            f"--machine-type {profile.machine_type} --num-nodes {count}"
            + (f" --accelerator type={accelerator},count={profile.accelerator_count},gpu-driver-version=default"
               if accelerator else "") + (f" --tpu-topology {topology}" if topology else "")
            + " --workload-metadata GKE_METADATA")


def check_images(steps: list[Step], fetch: Callable[[str], int] | None = None) -> list[Row]:
    """Every image the pipeline names exists in its registry (a manifest request, with the user's Google
    credentials for Artifact Registry and an anonymous pull token elsewhere)."""
    fetch = fetch or manifest_status
    rows = []
    for image in sorted({s.image for s in steps if s.image}):
        try:
            status = fetch(image)
        except Exception as e:  # noqa: BLE001 - a registry we cannot reach: say so
            rows.append(Row(f"image {image}", "fail", f"cannot ask its registry ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''})", "check the image's registry host"))
            continue
        if status == 200:
            rows.append(Row(f"image {image}", "ok", "found in its registry"))
        elif status in (401, 403):
            rows.append(Row(f"image {image}", "fail", f"the registry refused us (HTTP {status})",
                            "gcloud auth configure-docker REGION-docker.pkg.dev, and grant the nodes' account "
                            "roles/artifactregistry.reader"))
        else:
            rows.append(Row(f"image {image}", "fail", f"not in its registry (HTTP {status})",
                            "build and push it (docs/cluster.md, step 2), then `sfa pipeline compile --registry ...`"))
    return rows


_MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))


def manifest_status(image: str) -> int:
    """HTTP status of the registry's manifest for `image` (OCI distribution spec: HEAD /v2/NAME/manifests/REF)."""
    import requests
    registry, _, rest = image.partition("/")
    if "." not in registry and ":" not in registry and registry != "localhost":
        registry, rest = "registry-1.docker.io", image if "/" in image else f"library/{image}"
    name, ref = (rest.split("@", 1) if "@" in rest else rest.rsplit(":", 1) if ":" in rest.rsplit("/", 1)[-1]
                 else (rest, "latest"))
    local = registry.split(":")[0] in ("localhost", "127.0.0.1")
    url = f"{'http' if local else 'https'}://{registry}/v2/{name}/manifests/{ref}"
    headers = {"Accept": _MANIFEST_TYPES}
    if registry.endswith("-docker.pkg.dev") or registry.endswith("gcr.io"):
        import google.auth
        import google.auth.transport.requests
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        headers["Authorization"] = f"Bearer {credentials.token}"
    answer = requests.head(url, headers=headers, timeout=10)
    challenge = answer.headers.get("WWW-Authenticate", "")
    if answer.status_code == 401 and challenge.startswith("Bearer ") and "Authorization" not in headers:
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        token = requests.get(fields.get("realm", ""), params={"service": fields.get("service", ""),
                                                              "scope": f"repository:{name}:pull"}, timeout=10)
        if token.ok:
            headers["Authorization"] = f"Bearer {token.json().get('token') or token.json().get('access_token')}"
            answer = requests.head(url, headers=headers, timeout=10)
    return answer.status_code


def check_tracking(kube: Kube | None, uri: str | None, namespace: str) -> list[Row]:
    """MLflow answers at the run's tracking_uri: an in-cluster service through the API server's service proxy
    (what a pod reaches by the same name), any other server directly."""
    import urllib.parse

    import requests
    if not uri:
        return [Row("MLflow", "fail", "the run has no tracking_uri", "pass --param tracking_uri=http://mlflow.sfa-vivit"
                    ".svc.cluster.local:5000 (or =none to run untracked)")]
    if uri == "none":
        return [Row("MLflow", "ok", "tracking_uri=none: the run is untracked, by choice")]
    parsed = urllib.parse.urlparse(uri)
    host = parsed.hostname or ""
    parts = host.split(".")
    in_cluster = host.endswith(".svc.cluster.local") or host.endswith(".svc") or (len(parts) <= 2 and host not in (
        "localhost",) and not re.fullmatch(r"[\d.]+", host))
    try:
        if in_cluster and kube is not None:
            service, service_namespace = parts[0], parts[1] if len(parts) > 1 else namespace
            port = parsed.port or 80
            answer = kube.core.connect_get_namespaced_service_proxy_with_path(
                f"{service}:{port}", service_namespace, "health", _preload_content=False)
            ok, said = answer.status == 200, f"HTTP {answer.status}"
        else:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=5)
            ok, said = answer.status_code == 200, f"HTTP {answer.status_code}"
    except Exception as e:  # noqa: BLE001 - one line with the fix
        status = getattr(e, "status", None)
        ok, said = False, (f"HTTP {status}" if status else f"{type(e).__name__}")
    if not ok:
        return [Row("MLflow", "fail", f"{uri} does not answer /health ({said})",
                    "kubectl apply -f k8s/mlflow.yaml (after `sfa pipeline manifests`), and wait for its pod")]
    rows = [Row("MLflow", "ok", f"{uri} answers /health")]
    if in_cluster and kube is not None:
        rows.append(check_allowed_hosts(kube, parsed.netloc, parts[1] if len(parts) > 1 else namespace))
    return rows


def check_allowed_hosts(kube: Kube, host: str, namespace: str) -> Row:
    """MLflow 3 answers 403 to a Host header it was not told to allow, except on /health (which the check above
    asks): the server's --allowed-hosts (or MLFLOW_SERVER_ALLOWED_HOSTS), read from its Deployment, must admit
    the Host an in-cluster client sends, as MLflow's own matcher decides."""
    from kubernetes import client
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header
    check = "MLflow allows the in-cluster Host"
    try:
        deployments = client.AppsV1Api(kube.api).list_namespaced_deployment(namespace).items
    except Exception as e:  # noqa: BLE001 - a nicety on top of /health: say what could not be read
        return Row(check, "warn", f"cannot read the Deployments of {namespace} ({getattr(e, 'status', '') or e})",
                   f"make sure MLflow's --allowed-hosts admits {host}")
    for deployment in deployments:
        for container in deployment.spec.template.spec.containers:
            words = [*(container.command or []), *(container.args or [])]
            if "server" not in words or not any("mlflow" in w for w in words):
                continue
            flag = next((w.split("=", 1)[1] for w in words if w.startswith("--allowed-hosts=")), None)
            env = next((e.value for e in container.env or [] if e.name == "MLFLOW_SERVER_ALLOWED_HOSTS"), None)
            allowed = [h.strip() for h in (flag or env).split(",")] if (flag or env) else get_default_allowed_hosts()
            name = f"{namespace}/{deployment.metadata.name}"
            if is_allowed_host_header(allowed, host):
                return Row(check, "ok", f"{name} admits Host {host}")
            return Row(check, "fail", f"{name} would answer 403 to Host {host} (allowed: "
                       f"{','.join(allowed) if flag or env else 'the default, localhost and private IPs'})",
                       f"add {host.split(':')[0]}* to its --allowed-hosts (k8s/mlflow.yaml has it)")
    return Row(check, "warn", f"no `mlflow server` Deployment in {namespace} to read --allowed-hosts from",
               f"make sure MLflow's --allowed-hosts admits {host}")


# ----------------------------------------------------------------------------------------------
# Vertex AI
# ----------------------------------------------------------------------------------------------

# Where each Google API answers (the discovery documents' rootUrl + servicePath; tests point them at loopback).
GOOGLE_APIS = {"serviceusage": "https://serviceusage.googleapis.com/v1", "iam": "https://iam.googleapis.com/v1",
               "resourcemanager": "https://cloudresourcemanager.googleapis.com/v1",
               "storage": "https://storage.googleapis.com/storage/v1", "compute": "https://compute.googleapis.com/compute/v1",
               "iamcredentials": "https://iamcredentials.googleapis.com/v1",
               "storage_upload": "https://storage.googleapis.com/upload/storage/v1"}
VERTEX_APIS = ("aiplatform.googleapis.com", "storage.googleapis.com", "compute.googleapis.com")
# Roles that hold what each need takes (predefined roles; a custom role is not read here: ⚠ then).
VERTEX_USER = ("roles/aiplatform.user", "roles/aiplatform.admin", "roles/editor", "roles/owner")
ACT_AS = ("roles/iam.serviceAccountUser", "roles/editor", "roles/owner")
BUCKET_WRITER = ("roles/storage.objectAdmin", "roles/storage.objectUser", "roles/storage.admin",
                 "roles/storage.legacyBucketOwner", "roles/editor", "roles/owner")


def _members(policy: dict, roles: tuple[str, ...]) -> set[str]:
    return {m for b in policy.get("bindings", []) if b.get("role") in roles for m in b.get("members", [])}


def _google_session() -> Any:
    """Requests with the user's Google credentials (Application Default Credentials, as gcloud writes them)."""
    import google.auth
    from google.auth.transport.requests import AuthorizedSession
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except Exception as e:  # noqa: BLE001 - no credentials: one line with the fix
        raise PipelineError(f"no Google credentials ({type(e).__name__}): run `gcloud auth application-default "
                            "login`") from None
    return AuthorizedSession(credentials)


def check_write(google_account: str, root: str, session: Any = None, apis: dict[str, str] | None = None) -> list[Row]:
    """Write and delete one small object under the pipeline root as `google_account` (a short-lived token from
    IAM Credentials, asked with your credentials): what the run's pods will do, before they do it."""
    import urllib.parse
    import uuid

    import requests
    session = session or _google_session()
    url = {**GOOGLE_APIS, **(apis or {})}
    check = f"write test as {google_account}"
    bucket, _, prefix = root[len("gs://"):].partition("/")
    name = f"{prefix.rstrip('/')}/.sfa-doctor-{uuid.uuid4().hex[:12]}".lstrip("/")
    answer = session.post(f"{url['iamcredentials']}/projects/-/serviceAccounts/{google_account}:generateAccessToken",
                          json={"scope": ["https://www.googleapis.com/auth/devstorage.read_write"],
                                "lifetime": "300s"}, timeout=15)
    if answer.status_code != 200:
        return [Row(check, "fail", f"cannot act as {google_account} (generateAccessToken: HTTP {answer.status_code})",
                    f"gcloud iam service-accounts add-iam-policy-binding {google_account} --role "
                    "roles/iam.serviceAccountTokenCreator --member user:YOU@EXAMPLE.COM (for this test only)")]
    as_it = {"Authorization": f"Bearer {answer.json().get('accessToken', '')}"}
    written = requests.post(f"{url['storage_upload']}/b/{bucket}/o", params={"uploadType": "media", "name": name},
                            data=b"sfa cluster doctor: a write test, deleted at once\n", headers=as_it, timeout=15)
    if written.status_code != 200:
        return [Row(check, "fail", f"{google_account} may not write gs://{bucket}/{name} (HTTP {written.status_code})",
                    f"gcloud storage buckets add-iam-policy-binding gs://{bucket} --role roles/storage.objectAdmin "
                    f"--member serviceAccount:{google_account}")]
    deleted = requests.delete(f"{url['storage']}/b/{bucket}/o/{urllib.parse.quote(name, safe='')}", headers=as_it,
                              timeout=15)
    if deleted.status_code not in (200, 204):
        return [Row(check, "fail", f"{google_account} wrote gs://{bucket}/{name} but may not delete it (HTTP "
                    f"{deleted.status_code}; remove it by hand)", f"grant roles/storage.objectAdmin on gs://{bucket} "
                    f"to serviceAccount:{google_account} (checkpoints replace files)")]
    return [Row(check, "ok", f"wrote and deleted gs://{bucket}/{name}")]


def check_vertex(spec: dict, project: str, region: str, service_account: str | None, root: str | None,
                 session: Any = None, apis: dict[str, str] | None = None) -> list[Row]:
    """What a Vertex AI PipelineJob of this pipeline needs: the APIs on, the caller allowed to act as the run's
    service account, that account a Vertex AI user (and able to act as itself for custom jobs), the bucket
    writable by it, and the profile's GPUs offered in one of the region's zones."""
    session = session or _google_session()
    url = {**GOOGLE_APIS, **(apis or {})}
    profile = pipeline_profile(spec)
    rows = []

    def call(method: str, address: str, body: dict | None = None) -> tuple[int, dict]:
        answer = session.request(method, address, json=body, timeout=15)
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return answer.status_code, {}

    for api in VERTEX_APIS:
        status, body = call("GET", f"{url['serviceusage']}/projects/{project}/services/{api}")
        if status == 200 and body.get("state") == "ENABLED":
            rows.append(Row(f"API {api}", "ok", "enabled"))
        elif status == 200:
            rows.append(Row(f"API {api}", "fail", f"{body.get('state', 'not enabled').lower()} in {project}",
                            f"gcloud services enable {api} --project {project}"))
        else:
            rows.append(Row(f"API {api}", "fail", f"cannot ask Service Usage (HTTP {status})",
                            "grant yourself roles/serviceusage.serviceUsageViewer, or check --vertex PROJECT"))
    if not service_account:
        rows.append(Row("run's service account", "fail", "none given: the run would use Compute Engine's default "
                        "account, which does not hold our bucket rights", "pass --service-account SA@PROJECT.iam."
                        "gserviceaccount.com"))
        return rows
    member = f"serviceAccount:{service_account}"
    account = f"{url['iam']}/projects/-/serviceAccounts/{service_account}"
    status, body = call("POST", f"{account}:testIamPermissions", {"permissions": ["iam.serviceAccounts.actAs"]})
    if status == 200 and "iam.serviceAccounts.actAs" in body.get("permissions", []):
        rows.append(Row("you may act as the run's account", "ok", f"iam.serviceAccounts.actAs on {service_account}"))
    else:
        rows.append(Row("you may act as the run's account", "fail",
                        f"no iam.serviceAccounts.actAs on {service_account}" + (f" (HTTP {status})" if status != 200
                                                                                else ""),
                        f"gcloud iam service-accounts add-iam-policy-binding {service_account} --role "
                        "roles/iam.serviceAccountUser --member user:YOU@EXAMPLE.COM"))
    status, project_policy = call("POST", f"{url['resourcemanager']}/projects/{project}:getIamPolicy", {})
    if status != 200:
        rows.append(Row("roles of the run's account", "warn", f"cannot read {project}'s IAM policy (HTTP {status})",
                        "ask for roles/iam.securityReviewer to let the doctor read it"))
        project_policy = None
    elif member in _members(project_policy, VERTEX_USER):
        rows.append(Row("Vertex AI user", "ok", f"{service_account} may run pipelines and jobs in {project}"))
    else:
        rows.append(Row("Vertex AI user", "fail", f"{service_account} has no Vertex AI role in {project}",
                        f"gcloud projects add-iam-policy-binding {project} --role roles/aiplatform.user "
                        f"--member {member}"))
    if profile is not None and profile.vertex_custom_job:
        status, own = call("POST", f"{account}:getIamPolicy", {})
        holders = _members(own, ACT_AS) | (_members(project_policy, ACT_AS) if project_policy else set())
        if status == 200 and member in holders:
            rows.append(Row("the account may act as itself", "ok", "its custom jobs can run as it"))
        else:
            rows.append(Row("the account may act as itself", "fail", f"{service_account} cannot start custom jobs "
                            "that run as itself" + (f" (HTTP {status})" if status != 200 else ""),
                            f"gcloud iam service-accounts add-iam-policy-binding {service_account} --role "
                            f"roles/iam.serviceAccountUser --member {member}"))
    if root and root.startswith("gs://"):
        bucket = root[len("gs://"):].split("/", 1)[0]
        status, policy = call("GET", f"{url['storage']}/b/{bucket}/iam")
        writers = _members(policy, BUCKET_WRITER) if status == 200 else set()
        writers |= _members(project_policy, BUCKET_WRITER) if project_policy else set()
        if member in writers:
            rows.append(Row(f"bucket {bucket}", "ok", f"{service_account} may write it"))
        else:
            rows.append(Row(f"bucket {bucket}", "fail", f"{service_account} may not write gs://{bucket}"
                            + (f" (bucket policy: HTTP {status})" if status != 200 else ""),
                            f"gcloud storage buckets add-iam-policy-binding gs://{bucket} --role "
                            f"roles/storage.objectAdmin --member {member}"))
    if profile is not None and profile.vertex_accelerator and profile.vertex_accelerator.startswith("NVIDIA_"):
        name = profile.vertex_accelerator.lower().replace("_", "-")
        status, body = call("GET", f"{url['compute']}/projects/{project}/regions/{region}")
        zones = [z.rsplit("/", 1)[-1] for z in body.get("zones", [])] if status == 200 else []
        offered = [z for z in zones
                   if call("GET", f"{url['compute']}/projects/{project}/zones/{z}/acceleratorTypes/{name}")[0] == 200]
        if offered:
            rows.append(Row(f"{name} in {region}", "ok", f"offered in {', '.join(offered)}"))
        elif status != 200:
            rows.append(Row(f"{name} in {region}", "fail", f"cannot read region {region} (HTTP {status})",
                            "check --vertex PROJECT/REGION"))
        else:
            rows.append(Row(f"{name} in {region}", "fail", f"no zone of {region} offers it",
                            "choose a region that does: https://cloud.google.com/vertex-ai/docs/general/locations"))
    elif profile is not None and profile.vertex_accelerator:
        rows.append(Row(f"{profile.vertex_accelerator} in {region}", "warn", "TPU offers are not listed by an API "
                        "we can ask", "check https://cloud.google.com/vertex-ai/docs/training/training-with-tpu-vm"))
    return rows


# ----------------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------------

def doctor_vertex(package: str, vertex: str, *, service_account: str | None = None, pipeline_root: str | None = None,
                  session: Any = None, apis: dict[str, str] | None = None,
                  image_status: Callable[[str], int] | None = None, write_test: bool = False) -> list[Row]:
    """Every check for one Vertex AI run of `package` in `vertex` (PROJECT/REGION); write_test: also write and
    delete an object under the pipeline root as the run's service account."""
    project, _, region = vertex.partition("/")
    if not project or not region:
        raise PipelineError(f"--vertex {vertex!r}: expected PROJECT/REGION")
    spec, _, steps = read_pipeline(package)
    rows = check_vertex(spec, project, region, service_account, pipeline_root, session, apis)
    if write_test and service_account and pipeline_root and pipeline_root.startswith("gs://"):
        rows += check_write(service_account, pipeline_root, session, apis)
    return [*rows, *check_images(steps, image_status)]


def doctor(package: str, *, host: str, namespace: str = "kubeflow", service_account: str = "sfa-vivit",
           params: dict[str, Any] | None = None, auth: KfpAuth = KfpAuth(), kubeconfig: str | None = None,
           context: str | None = None, operator: str = "trainjob", pipeline_root: str | None = None,
           image_status: Callable[[str], int] | None = None, write_test: bool = False, session: Any = None,
           apis: dict[str, str] | None = None) -> list[Row]:
    """Every check for one run of `package`; the rows in the order a run needs them. write_test: also write
    and delete an object under the pipeline root as the run's Workload Identity account."""
    from sfa_vivit.kubeflow.runner import pipeline_inputs
    spec, _, steps = read_pipeline(package)
    profile = pipeline_profile(spec)
    values = {**pipeline_inputs(package), **(params or {})}
    rows = check_kfp(host, auth)
    try:
        kube = Kube(kubeconfig, context)
    except PipelineError as e:
        return [*rows, Row("Kubernetes API", "fail", str(e), "gcloud container clusters get-credentials CLUSTER "
                           "--region REGION")]
    multinode = profile is not None and profile.nodes > 1
    if multinode:
        rows += check_operator(kube, operator)
        rows += check_queue(kube, namespace, pipeline_jobs(spec))
    rights = RUN_RIGHTS + (JOB_RIGHTS[operator] if multinode else ())
    rows += check_service_account(kube, namespace, service_account, rights, pipeline_root)
    if write_test and pipeline_root and pipeline_root.startswith("gs://"):
        google = next((r.detail.removeprefix("acts as ") for r in rows
                       if r.check == f"Workload Identity of {service_account}" and r.status == "ok"), None)
        if google:
            rows += check_write(google, pipeline_root, session, apis)
    if multinode:
        from sfa_vivit.kubeflow.trainjob import TRAIN_SERVICE_ACCOUNT
        rows += check_service_account(kube, namespace, TRAIN_SERVICE_ACCOUNT, (), pipeline_root)
    try:
        nodes = kube.core.list_node().items
    except Exception as e:  # noqa: BLE001
        rows.append(_api_error("nodes", e))
    else:
        rows += check_nodes(nodes, steps, profile)
    rows += check_images(steps, image_status)
    rows += check_tracking(kube, values.get("tracking_uri"), namespace)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a table a terminal shows: mark, check, what was found; a fix under each ✗ and ⚠."""
    width = max(len(r.check) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r.mark} {r.check.ljust(width)}  {r.detail}")
        if r.fix and r.status != "ok":
            lines.append(f"  {' ' * width}  fix: {r.fix}")
    failed = sum(r.status == "fail" for r in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} checks passed" + (
        f"; {failed} to fix before a run can start" if failed else ": nothing found that would stop a first run"))
    return "\n".join(lines)


__all__ = ["Row", "Step", "doctor", "doctor_vertex", "check_vertex", "read_pipeline", "quantity", "table",
           "check_nodes", "check_images", "check_write", "check_allowed_hosts", "check_kfp", "check_operator",
           "check_service_account", "check_tracking", "check_queue", "kueue_refusal", "pipeline_jobs", "RUN_RIGHTS",
           "JOB_RIGHTS"]
