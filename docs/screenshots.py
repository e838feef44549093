"""Screenshots of the main job's report and of its MLflow runs view (headless Chromium), for the README.

    python docs/screenshots.py [RUN_FOLDER]      # default: the newest runs/<run-id>/ that has a report.html

Writes docs/report.png and docs/mlflow-runs.png. Needs `chromium` (Debian: apt-get install chromium) and the
project's environment (for `mlflow server`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium on PATH (Debian: apt-get install chromium)")


def shoot(url: str, out: Path, size: str, wait_ms: int) -> None:
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out} ({out.stat().st_size // 1024} KB) <- {url}")


# The runs view's columns: each run's top-1 and training time, and the parent's headline figures.
COLUMNS = ("top1", "train_time_s", "sfa_top1", "baseline_top1", "sfa_train_time_s", "baseline_train_time_s")


def share_view(uri: str) -> tuple[str, str]:
    """(experiment id, share key) of a runs view listing the parent run and its children with the COLUMNS shown.

    The MLflow UI's "Share" button stores its view as the experiment tag `mlflow.sharedViewState.<key>` (plain
    JSON is read as well as its compressed form) and opens it with `?viewStateShareKey=<key>`: written here
    the same way, so the screenshot needs no clicks."""
    import json

    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sfa-vivit")
    # A shared view does not carry unfolded rows; a search filter lists children beside their parent instead,
    # and ordered by end time the list reads in the pipeline's order with the parent, which ends last, below.
    state = {"searchFilter": "attributes.run_name LIKE '%'", "orderByKey": "attributes.end_time", "orderByAsc": True,
             "selectedColumns": ["attributes.`Duration`", *(f"metrics.`{name}`" for name in COLUMNS)]}
    key = "readme"
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    return experiment.experiment_id, key


def main() -> None:
    runs = sorted(Path("runs").glob("*/report.html"), key=lambda p: p.stat().st_mtime)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else (runs[-1].parent if runs else None)
    if root is None or not (root / "report.html").exists():
        sys.exit("no runs/<run-id>/report.html: run `make run` first, or name the run folder")
    shoot((root / "report.html").resolve().as_uri(), DOCS / "report.png", "1100,2600", 2000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        experiment_id, share_key = share_view(f"http://127.0.0.1:{port}")
        shoot(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?viewStateShareKey={share_key}",
              DOCS / "mlflow-runs.png", "2000,700", 15000)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
