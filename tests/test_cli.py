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
    table = capsys.readouterr().out
    assert table.startswith("ViViT-B factorised encoder, 32 frames at 224 px")
    assert "29.86M trained in SFA stage 2" in table
    assert main(["info", "--variant", "B", "--frames", "32", "--adapter", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "B" and info["total"] == sum(info["parameters"].values())
    assert info["trainable"] == sum(info["parameters"][k] for k in ("adapter", "temporal", "head"))
    assert main(["info", "--variant", "XL"]) == 2
    assert "unknown ViViT variant 'XL'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("sfa")   # installed beside the interpreter of the venv
    result = subprocess.run([exe, "info", "--variant", "Ti", "--frames", "8", "--json"], capture_output=True,
                            text=True, check=True)
    assert json.loads(result.stdout)["variant"] == "Ti"


def test_version_print_config_did_you_mean_and_defaults_in_help(capsys):
    from sfa_vivit import __version__
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sfa-vivit {__version__}"
    # A config can be seen before any data or run folder exists.
    assert main(["train", "--mode", "stage2", "--recipe", "synthetic", "--set", "cache_views=2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["mode"], printed["cache_views"], printed["freeze_spatial"]) == ("stage2", 2, True)
    assert main(["train", "--mode", "stage1", "--data", "d"]) == 2
    assert "--data and --out are required to train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:        # a setting given as a flag: say how to give it
        main(["train", "--mode", "stage1", "--data", "d", "--out", "o", "--epochs", "2"])
    assert done.value.code == 2 and "settings go through --set: --set epochs=2" in capsys.readouterr().err
    assert main(["train", "--mode", "stage1", "--recipe", "synthetic", "--data", "d", "--out", "o",
                 "--set", "num_frame=4"]) == 2
    assert "(did you mean 'num_frames'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prep", "--help"])
    assert "(default: 12.5)" in capsys.readouterr().out


def test_stage2_takes_the_architecture_of_its_init(tiny_data, tmp_path, capsys, no_mlflow_env):
    """Stage 1 with model overrides; stage 2 names none of them and trains the same architecture (a --set
    still wins over the inherited value and is then refused as another architecture)."""
    from helpers import TINY
    from sfa_vivit.models import checkpoints
    stage1 = ["--set", "epochs=1", "--set", "num_frames=4", *[a for s in TINY for a in ("--set", s)]]
    assert main(["train", "--mode", "stage1", "--recipe", "synthetic", "--data", tiny_data,
                 "--out", str(tmp_path / "s1"), *stage1]) == 0
    # Every run writes its resolved config as YAML; --config reads it back to the same config.
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "s1" / "config.yaml"), "--data", tiny_data,
                 "--out", str(tmp_path / "again"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "s1" / "config.json").read_text())
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--data", tiny_data, "--out", "x"]) == 2
    assert "must hold a mapping of settings" in capsys.readouterr().err
    plain = ["--set", "epochs=1", "--set", "num_frames=8", "--set", "batch_size=4", "--set", "workers=0",
             "--set", "final_eval_views=1x1", "--set", "log_every=1"]
    assert main(["train", "--mode", "stage2", "--recipe", "synthetic", "--data", tiny_data,
                 "--out", str(tmp_path / "s2"), "--init", str(tmp_path / "s1"), *plain]) == 0
    first = checkpoints.read_config(tmp_path / "s1" / "model")["model"]
    second = checkpoints.read_config(tmp_path / "s2" / "model")["model"]
    sizes = ("image_size", "width", "spatial_depth", "temporal_depth", "heads", "mlp_dim", "patch", "tubelet")
    assert {k: second[k] for k in sizes} == {k: first[k] for k in sizes} and second["adapter"]
    # Both stages in one MLflow store beside the run folders, artifacts beside it, per-step loss and rate.
    from mlflow.tracking import MlflowClient
    assert not (tmp_path / "s1" / "mlflow.db").exists() and (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfa-vivit").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["stage1-4f", "stage2-8f"]
    for run in runs:
        assert {"config.json", "metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.info.artifact_uri.startswith(f"file://{tmp_path / 'mlartifacts'}")
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6    # log_every=1, 6 steps
        assert run.data.params["batch_size"] == "4" and run.info.status == "FINISHED"
    # The final model is an MLflow model too (logged from code, nothing pickled), with its signature.
    import mlflow
    import numpy as np
    import torch
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = next(r for r in runs if r.info.run_name == "stage2-8f")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    inputs = served.metadata.get_input_schema().inputs[0]
    assert inputs.shape == (-1, 8, 3, 32, 32) and inputs.type == np.dtype("float32")
    video = np.random.default_rng(0).standard_normal((2, 8, 3, 32, 32)).astype(np.float32)
    ours = checkpoints.load(tmp_path / "s2" / "model").model.eval()
    with torch.no_grad():
        expected = ours(torch.from_numpy(video)).numpy()
    assert np.allclose(served.predict(video), expected, atol=1e-5)
    capsys.readouterr()
    assert main(["train", "--mode", "stage2", "--recipe", "synthetic", "--data", tiny_data,
                 "--out", str(tmp_path / "s2b"), "--init", str(tmp_path / "s1"), *plain,
                 "--set", "model.width=64"]) == 2
    assert "is another architecture than this run asks for" in capsys.readouterr().err


def test_the_recipe_defaults_to_the_prepared_datasets(tiny_data, tmp_path, capsys):
    assert main(["train", "--mode", "stage1", "--data", tiny_data, "--out", str(tmp_path / "x"), "--print-config"]) == 0
    out, err = capsys.readouterr()
    config = json.loads(out)
    assert config["recipe"] == "synthetic" and config["model"]["width"] == 96       # not ViViT-B at 224 px
    assert "recipe synthetic (the dataset of" in err
    assert not (tmp_path / "x").exists()


def test_prep_warns_when_its_clips_do_not_fit_the_recipe(tmp_path, capsys):
    """Prep's defaults (12.5 fps, 256 px) turn 16-frame 32 px synthetic videos into 12-frame 256 px clips: it
    says so, naming the recipe's 32 frames and 64 px crops."""
    from sfa_vivit.data.prep import synth
    paths = synth.generate(str(tmp_path / "raw"), synth.SynthOptions(num_train=2, num_val=1, num_frames=16, size=32,
                                                                     fps=16), progress=False)
    args = ["data", "prep", "--dataset", "synthetic", "--annotations", paths["train"], "--annotations",
            paths["validation"], "--videos", paths["videos"], "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sfa data prep: warning")]
    assert any("train: clips of 12-12 frames" in w and "trains on 32 frames" in w for w in warnings), warnings
    assert any("short side of 256 px for 64 px crops" in w for w in warnings), warnings
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["frames"] == {"min": 12, "median": 12, "max": 12}
    assert main([*args, "--out", str(tmp_path / "fitting"), "--fps", "32", "--short-side", "64"]) == 0
    assert "warning" not in capsys.readouterr().err
    # Checked against the settings the run will train with (the quick start's 16 frames at 32 px): no warning.
    assert main([*args, "--out", str(tmp_path / "small"), "--fps", "16", "--short-side", "32",
                 "--set", "image_size=32", "--set", "num_frames=16"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "small2"), "--fps", "16", "--short-side", "32"]) == 0
    assert "smaller than the recipe's 64 px crops" in capsys.readouterr().err


def test_progress_in_a_log_file_is_whole_lines(tmp_path):
    """Not a terminal (a pod's log, `> log 2>&1`): the progress bar prints lines, not carriage returns."""
    exe = Path(sys.executable).with_name("sfa")
    done = subprocess.run([exe, "data", "synth", "--out", str(tmp_path / "s"), "--num-train", "3", "--num-val", "1",
                           "--size", "16", "--num-frames", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "synth: 100%" in done.stderr and done.stderr.endswith("\n")


def test_sfa_help_lists_the_commands_without_importing_the_library():
    """`sfa`, `sfa --help` and `sfa --version` answer without importing torch (seconds of imports); the text is
    the full parser's own top-level help."""
    from sfa_vivit.cli import build_parser, light_parser
    assert light_parser().format_help() == build_parser().format_help()
    code = ("import sys\nfrom sfa_vivit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)\n")
    for words, status in ((["--help"], 0), (["--version"], 0), ([], 2)):
        done = subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == f"exit {status} False", (words, done.stdout, done.stderr)
    done = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert "--print-config" in done.stdout and done.stdout.strip().endswith("exit 0 True")   # a command's own help


def test_every_option_of_every_command_says_what_it_is_for():
    import argparse

    from sfa_vivit.cli import build_parser
    silent = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and not action.help:
                silent.append(f"{path} {action.option_strings[-1]}")

    walk(build_parser(), "sfa")
    assert not silent, silent
