"""The `sfa` command line: installed entry point, smoke job, info, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_version_print_config_did_you_mean_and_defaults_in_help(capsys):
    from sfa_vivit import __version__
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sfa-vivit {__version__}"
    assert main(["train", "--mode", "stage2", "--recipe", "synthetic", "--data", "unused", "--out", "unused",
                 "--set", "cache_views=2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["mode"], printed["cache_views"], printed["freeze_spatial"]) == ("stage2", 2, True)
    assert main(["train", "--mode", "stage1", "--recipe", "synthetic", "--data", "d", "--out", "o",
                 "--set", "num_frame=4"]) == 2
    assert "(did you mean 'num_frames'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prep", "--help"])
    assert "(default: 12.5)" in capsys.readouterr().out
