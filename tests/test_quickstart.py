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
    assert (tmp_path / "runs" / "mlflow.db").exists() and (tmp_path / "runs" / "stage2" / "model").is_dir()
    # No warning of ours (prep holds the clips to the recipe the runs use; the recipe belongs to the dataset).
    ours = [line for line in cli.stderr.splitlines() if re.search(r"warning", line, re.I) and "sfa" in line]
    assert not ours, ours
    # It learns, and the README says what to expect: the evaluation line clearly above chance (8.3% on 12
    # classes), stage 2 above stage 1, and the figures the README quotes (+-8 points: another machine's float
    # rounding moves them a little, never to chance).
    stage1, stage2 = (float(x) for x in re.findall(r"final top-1 ([\d.]+)%", cli.stdout))
    top1 = float(re.search(r"sfa evaluate: top1 ([\d.]+)", cli.stdout).group(1))
    quoted = re.search(r"Expect about (\d+)% top-1 after stage 1 and about (\d+)% after stage 2", README.read_text())
    assert top1 == stage2 > 50.0 and stage2 > stage1, cli.stdout
    assert abs(stage1 - float(quoted.group(1))) <= 8 and abs(stage2 - float(quoted.group(2))) <= 8, (stage1, stage2)
    # The Python block as written, after a logging set-up that names each warning's logger (without one, Python
    # prints a library's warnings as bare messages, which could not be told from other output).
    named = "import logging; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
    python = subprocess.run([sys.executable, "-c", named + block("quickstart-python")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    assert not [line for line in python.stderr.splitlines() if line.startswith("WARNING sfa_vivit")], python.stderr
    # The same runs in Python: the same figures, to the digit.
    assert python.stdout.strip() == f"stage 1 top-1 {stage1:.1f}%, stage 2 top-1 {stage2:.1f}%", python.stdout
