"""The README's quick starts, run exactly as written (the command-line block, then the Python block)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def block(marker: str) -> str:
    """The fenced code block that follows `<!-- marker -->` in the README."""
    found = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert found, f"no {marker} block in the README"
    return found.group(1)


def test_the_readme_quick_starts_run_as_written(tmp_path, no_mlflow_env):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cli = subprocess.run(["bash", "-euo", "pipefail", "-c", block("quickstart-cli")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "sfa evaluate: top1" in cli.stdout and "recipe synthetic (the dataset of data/shards" in cli.stderr
    assert (tmp_path / "runs" / "mlflow.db").exists() and (tmp_path / "runs" / "stage2" / "model").is_dir()
    python = subprocess.run([sys.executable, "-c", block("quickstart-python")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    assert re.match(r"stage 1 top-1 \d+\.\d%, stage 2 top-1 \d+\.\d%", python.stdout)
