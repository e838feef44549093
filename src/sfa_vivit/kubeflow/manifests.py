"""The cluster manifests of k8s/, filled for one project (`sfa pipeline manifests`).

The checked-in files carry placeholders: PROJECT_ID (the Google service account of Workload Identity), BUCKET
(MLflow's artifact store), CHANGE_ME_DB_PASSWORD (MLflow's PostgreSQL), the project's default image registry,
and the namespace the runs' pods run in (the RoleBinding's subject). Applied as they are, a pod would start
with a service account bound to no Google identity or an MLflow writing to a bucket named BUCKET: so they
are filled here, in one step, and a file with a placeholder left is refused rather than written.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from sfa_vivit.kubeflow.components import REGISTRY

PLACEHOLDERS = ("PROJECT_ID", "BUCKET", "CHANGE_ME_DB_PASSWORD")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")          # Google Cloud project IDs
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")       # Cloud Storage bucket names
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")    # Kubernetes namespaces (DNS-1123 label)
_RUN_NAMESPACE = "namespace: kubeflow"                            # the RoleBinding subject's, in rbac.yaml


class ManifestError(ValueError):
    """A value that cannot fill a manifest, or a placeholder left unfilled."""


def render(root: str | Path, project: str, bucket: str, *, registry: str,
           namespace: str = "kubeflow", db_password: str | None = None) -> dict[str, str]:
    """{file name: text} of every k8s/*.yaml under `root`, filled. Raises ManifestError naming the value
    that cannot be used, or the file and line where a placeholder is left."""
    bucket = bucket.removeprefix("gs://").rstrip("/")
    for name, value, pattern in (("--project", project, _PROJECT), ("--bucket", bucket, _BUCKET),
                                 ("--namespace", namespace, _NAMESPACE)):
        if not pattern.fullmatch(value or "") or value in PLACEHOLDERS:
            raise ManifestError(f"{name} {value!r} is not a valid {name[2:]} name")
    if not registry or any(c.isspace() for c in registry) or ":" in registry.rsplit("/", 1)[-1] \
            or registry.startswith(f"{REGISTRY}"):
        raise ManifestError(f"--registry {registry!r}: give REGISTRY/NAME of the images you built and pushed, without "
                            f"a tag (the flavour tag is added); the project's default {REGISTRY} publishes none")
    values = {"PROJECT_ID": project, "BUCKET": bucket,
              "CHANGE_ME_DB_PASSWORD": db_password or secrets.token_urlsafe(24)}
    files = sorted(Path(root, "k8s").glob("*.yaml"))
    if not files:
        raise ManifestError(f"no k8s/*.yaml under {root} (give --root: the repository)")
    out = {}
    token = re.compile(r"\b(" + "|".join(PLACEHOLDERS) + r")\b")
    for path in files:
        # Comments keep their placeholders: they explain the file, and say which values were filled.
        text = "".join(line if line.lstrip().startswith("#") else token.sub(lambda m: values[m.group(1)], line)
                       for line in path.read_text().splitlines(keepends=True))
        text = text.replace(f"{REGISTRY}:", f"{registry}:")
        if path.name == "rbac.yaml":
            text = text.replace(_RUN_NAMESPACE, f"namespace: {namespace}")
        out[path.name] = text
    for name, text in out.items():
        for number, line in enumerate(text.splitlines(), 1):
            left = [] if line.lstrip().startswith("#") else [p for p in PLACEHOLDERS if re.search(rf"\b{p}\b", line)]
            if left:
                raise ManifestError(f"k8s/{name} line {number}: {left[0]} is still a placeholder")
    return out


def existing_password(out: str | Path) -> str | None:
    """MLflow's database password in a folder written before: filling the files again keeps it, so that
    re-applying them does not lock MLflow out of the database PostgreSQL initialised with it."""
    import yaml
    path = Path(out) / "mlflow.yaml"
    if not path.exists():
        return None
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Secret" and doc["metadata"]["name"] == "mlflow-db":
            password = (doc.get("stringData") or {}).get("password")
            return password if password and password not in PLACEHOLDERS else None
    return None


def write(files: dict[str, str], out: str | Path) -> list[str]:
    """Write the filled files into the folder `out` (made if missing; an existing file is replaced)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (folder / name).write_text(text)
        written.append(str(folder / name))
    return written


def bindings(project: str, namespace: str = "kubeflow") -> list[str]:
    """The Workload Identity bindings the filled accounts need (gcloud lines)."""
    member = f"serviceAccount:{project}.svc.id.goog"
    return [f"gcloud iam service-accounts add-iam-policy-binding sfa-vivit@{project}.iam.gserviceaccount.com "
            f"--role roles/iam.workloadIdentityUser --member \"{member}[{ns}/{account}]\""
            for ns, account in ((namespace, "sfa-vivit"), (namespace, "sfa-vivit-train"), ("sfa-vivit", "mlflow"))]
