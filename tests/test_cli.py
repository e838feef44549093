"""The `sfa` command line: installed entry point, smoke job, info, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

from sfa_vivit.cli import main


def test_smoke_runs_full_and_stage2_steps(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert main(["smoke", "--variants", "Ti", "--frames", "4", "--stage2-frames", "12",
                 "--image-size", "32", "--batch-size", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["regime"], r["frames"]) for r in rows] == [("full", 4), ("stage2", 12)]
    full, stage2 = rows
    assert stage2["trainable"] < full["trainable"] < stage2["parameters"]
    assert "sfa smoke: ok" in capsys.readouterr().out


def test_info_counts_parameters_and_rejects_unknown_variants(capsys):
    assert main(["info", "--variant", "B", "--frames", "32", "--adapter"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "B" and info["total"] == sum(info["parameters"].values())
    assert info["trainable"] == sum(info["parameters"][k] for k in ("adapter", "temporal", "head"))
    assert main(["info", "--variant", "XL"]) == 2
    assert "unknown ViViT variant 'XL'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("sfa")   # installed beside the interpreter of the venv
    result = subprocess.run([exe, "info", "--variant", "Ti", "--frames", "8"], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout)["variant"] == "Ti"
