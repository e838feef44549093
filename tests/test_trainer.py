"""The Trainer: stage-2 surgery, exact resume, preemption (SIGTERM), a non-finite loss, bad input,
and the paper's time/top-1 claim (slow)."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY, config, final_state
from sfa_vivit.data.prep import PrepOptions, prepare, synth
from sfa_vivit.models import checkpoints
from sfa_vivit.train import NonFiniteLoss, Trainer, TrainError, resolve


def test_stage2_trains_exactly_adapter_temporal_and_head(tiny_data, stage1_run, tmp_path, no_mlflow_env, caplog):
    s1 = Path(stage1_run)
    m1 = json.loads((s1 / "metrics.json").read_text())
    assert m1["mode"] == "stage1" and m1["trainable_parameters"] == m1["total_parameters"]
    # Stage 2 at the same frame count starts exactly at the stage-1 function (an image checkpoint
    # given as well is not used, and the log says so).
    same = Trainer(config("stage2", "image_checkpoint=unused-vit", frames=4), tiny_data, str(tmp_path / "same"),
                   init=str(s1))
    assert "image_checkpoint=unused-vit is not used" in caplog.text
    stage1_model = checkpoints.load(s1 / "model").model.eval()
    video = torch.randn(2, 4, 3, 32, 32)
    assert torch.equal(same.model.eval()(video), stage1_model(video))
    # Stage 2 proper: 8 frames, spatial frozen, adapter on.
    trainer = Trainer(config("stage2", "log_every=2", frames=8), tiny_data, str(tmp_path / "s2"), init=str(s1))
    groups = {k: sum(p.numel() for _, p in v) for k, v in trainer.model.parameter_groups().items()}
    caplog.set_level("INFO", logger="sfa_vivit")
    m2 = trainer.fit()
    assert m2["trainable_parameters"] == groups["adapter"] + groups["temporal"] + groups["head"]
    assert m2["num_frames"] == 8 and m2["steps"] == 6
    # Its step lines say how fast it goes and how much training is left (no hours of silence on a big dataset).
    assert re.search(r"step \d+/\d+ loss [\d.]+ lr \S+ \([\d.]+ steps/s, about \d+:\d\d of training left\)",
                     caplog.text), caplog.text[-2000:]
    before, after = final_state(s1), final_state(tmp_path / "s2")
    for name, tensor in after.items():
        if name.startswith(("embedding", "spatial")):
            assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("temporal.blocks"))
    metrics = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    for key in ("mode", "num_frames", "epochs", "train_time_s", "epoch_time_s", "clips_per_s", "top1", "top5",
                "final", "npp_epoch", "peak_memory_bytes", "trainable_parameters", "total_parameters"):
        assert key in metrics, key
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["freeze_spatial"] is True


def test_a_slow_step_never_leaves_the_log_silent(tiny_data, tmp_path, no_mlflow_env, caplog, monkeypatch):
    # log_every=20 on a 6-step epoch: no loss line at all; with the silence bound at zero seconds every step
    # prints a line with its rate and time left, and no loss (reading it would move where the losses are summed).
    import sfa_vivit.train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "LOG_INTERVAL_S", 1e-9)
    caplog.set_level("INFO", logger="sfa_vivit")
    quiet = Trainer(config("baseline", "log_every=20"), tiny_data, str(tmp_path / "a")).fit()
    lines = re.findall(r"epoch 1/1 step (\d)/6( loss [\d.]+ lr \S+)? \([\d.]+ steps/s, about \d+:\d\d of training "
                       r"left\)", caplog.text)
    assert [step for step, _ in lines] == [str(k) for k in range(1, 7)] and not any(loss for _, loss in lines)
    monkeypatch.setattr(trainer_module, "LOG_INTERVAL_S", 3600.0)
    caplog.clear()
    reference = Trainer(config("baseline", "log_every=20"), tiny_data, str(tmp_path / "b")).fit()
    assert "of training left" not in caplog.text
    assert quiet["history"][0]["loss"] == reference["history"][0]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(final_state(tmp_path / "a").values(),
                                                 final_state(tmp_path / "b").values()))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_killed_run_resumes_to_bit_identical_weights(tiny_data, tmp_path, no_mlflow_env, optimizer):
    args = ("checkpoint_every=2", "dropout=0.1", "drop_path=0.1", "mixup_alpha=0.2", f"optimizer={optimizer}")
    reference = Trainer(config("baseline", *args, epochs=2), tiny_data, str(tmp_path / "a")).fit()
    # Hard kill at step 3: the last committed checkpoint is step 2, mid-epoch (6 steps per epoch).
    out = tmp_path / "b"
    assert Trainer(config("baseline", *args, epochs=2), tiny_data, str(out)).fit(
        stop_after_steps=3, checkpoint_on_stop=False) == {"status": "stopped", "step": 3}
    committed = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert committed == ["step-00000002"]
    # An interrupted write of a later checkpoint: payload there, marker missing. It must be ignored.
    torn = out / "checkpoints" / "step-00000004"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    (torn / "config.json").write_text("{")
    resumed = Trainer(config("baseline", *args, epochs=2), tiny_data, str(out))
    assert resumed.progress.step == 2 and resumed.progress.step_in_epoch == 2
    metrics = resumed.fit()
    assert metrics["weights_sha256"] == reference["weights_sha256"]
    a, b = final_state(tmp_path / "a"), final_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "SIGTERM"),
                                                 (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_signal_to_the_process_group_checkpoints_the_current_step_and_the_rerun_finishes(
        tiny_data, tmp_path, no_mlflow_env, signum, code, said):
    """What `timeout`, batch schedulers (SIGTERM) and a terminal (Ctrl-C) do: signal the whole process group,
    DataLoader workers included. The run commits a checkpoint at the current step and says how to resume."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sfa_vivit.cli", "train", "--mode", "baseline", "--recipe", "synthetic",
           "--data", tiny_data, "--out", str(out), *[a for s in [*TINY, "epochs=30", "num_frames=4", "workers=2"]
                                                      for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 3/" in line:
            break
    os.killpg(proc.pid, signum)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == code, err
    assert "DataLoader worker" not in err and "Traceback" not in err, err
    # The run said what it was about to do before its first step.
    banner = err[:err.index("step 1/")] if "step 1/" in err else err
    for said_first in ("sfa train: baseline (synthetic recipe) on", "parameters trained", "24 training clips, 6 steps "
                       "per epoch of 4 clips, 30 epochs", "1 rank(s) on cpu, fp32", f"  outputs    {out}"):
        assert said_first in banner, said_first
    (last,) = [line for line in err.splitlines() if line.startswith("sfa train: ")]
    assert last.startswith(f"sfa train: {said} at step ") and "run the same command again" in last
    (ckpt,) = [p for p in (out / "checkpoints").iterdir() if checkpoints.is_committed(p)]
    step = int(ckpt.name.split("-")[1])
    assert step >= 3 and f"at step {step}: checkpoint committed at {ckpt}" in last
    trainer = Trainer(config("baseline", "workers=2", epochs=30), tiny_data, str(out))
    assert trainer.progress.step == step


def test_nan_loss_stops_with_the_step_after_a_checkpoint(tiny_data, tmp_path, no_mlflow_env):
    trainer = Trainer(config("baseline", "base_lr=1e38", "grad_clip=0", "warmup_epochs=0"), tiny_data,
                      str(tmp_path / "nan"))
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf|-inf) at step \d+ .* Last good state: .*step-"):
        trainer.fit()
    assert any(checkpoints.is_committed(p) for p in (tmp_path / "nan" / "checkpoints").iterdir())


def test_bad_input_is_rejected_before_training(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    with pytest.raises(ValueError, match="unknown recipe 'k700'"):
        resolve("stage1", "k700")
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        resolve("stage1", "synthetic", sets=["epoch=3"])
    with pytest.raises(TrainError, match="stage2 needs --init"):
        Trainer(config("stage2"), tiny_data, str(tmp_path / "x"))
    s1 = Path(stage1_run)
    with pytest.raises(TrainError, match=r"another architecture .*width: checkpoint 32, run 64"):
        Trainer(resolve("stage2", "synthetic", sets=[*TINY, "model.width=64", "epochs=1"]), tiny_data,
                str(tmp_path / "y"), init=str(s1))
    # Data with other classes: refused unless the head is explicitly re-initialised.
    other = tmp_path / "other"
    manifest = json.loads((Path(tiny_data) / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:5]
    other.mkdir()
    for p in Path(tiny_data).glob("*.tar"):
        (other / p.name).symlink_to(p)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="predicts 12 classes but .* has 5; set reinit_head=true"):
        Trainer(config("stage2"), str(other), str(tmp_path / "z"), init=str(s1))
    trainer = Trainer(config("stage2", "reinit_head=true"), str(other), str(tmp_path / "z"), init=str(s1))
    assert trainer.model.head.out_features == 5
    with pytest.raises(TrainError, match="no committed checkpoint"):
        Trainer(config("stage2"), tiny_data, str(tmp_path / "w"), init=str(tmp_path / "nothing"))
    # Resuming a run folder with a different config is refused, not silently mixed.
    with pytest.raises(TrainError, match="different config"):
        Trainer(config("stage1", epochs=3), tiny_data, str(s1))


@pytest.mark.slow
def test_sfa_reaches_the_baseline_top1_in_less_time(tmp_path, no_mlflow_env):
    """The paper's claim on the synthetic data, seed 0: stage 1 at 8 frames then stage 2 at 32 frames,
    same recipe and epochs as the baseline at 32, every run's spatial encoder from the synthetic image
    ViT (as the paper's runs start from an image checkpoint). bench/sfa_vs_baseline.py runs it over
    several seeds; the README's table shows the seed-to-seed spread this one seed sits in. Less time is
    asserted; the top-1 claim is not met on this benchmark today, and the test says so (xfail with the
    figures) rather than fail the suite or pass silently."""
    from sfa_vivit.tools import synth_vit as image_vit
    from sfa_vivit.train import train

    paths = synth.generate(str(tmp_path / "raw"), synth.SynthOptions(difficulty="medium"), progress=False)
    data = str(tmp_path / "shards")
    prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], data,
            options=PrepOptions(fps=16, short_side=64, shard_size=64), progress=False)
    vit = image_vit.pretrain(str(tmp_path / "vit"), image_vit.ImageViTOptions(difficulty="medium"), progress=False)
    assert vit["val_accuracy"] > 4 * vit["chance_accuracy"]
    init = [f"image_checkpoint={tmp_path / 'vit'}"]
    base = train(resolve("baseline", "synthetic", sets=[*init, "num_frames=32"]), data, str(tmp_path / "b"))
    s1 = train(resolve("stage1", "synthetic", sets=[*init, "num_frames=8"]), data, str(tmp_path / "s1"))
    s2 = train(resolve("stage2", "synthetic", sets=["num_frames=32"]), data, str(tmp_path / "s2"),
               init=str(tmp_path / "s1"))
    assert s1["train_time_s"] + s2["train_time_s"] < base["train_time_s"]
    assert s2["final"]["top1"] > 4 * 100 / 12                       # SFA learns (chance is 8.3%)
    if s2["final"]["top1"] < base["final"]["top1"]:
        # Known and open (README, "Measured: SFA against the conventional recipe"): reported, not hidden.
        pytest.xfail(f"SFA top-1 {s2['final']['top1']:.1f} < baseline {base['final']['top1']:.1f} on seed 0")


def _as_written_before(out, **changes):
    """Edit the run's committed step checkpoint as an older release wrote it (drop exempt_from_decay, set
    `changes`), re-committing it with the new digest."""
    (step,) = checkpoints.committed_steps(str(out))
    cfg, marker = Path(step) / checkpoints.CONFIG_FILE, Path(step) / checkpoints.MARKER_FILE
    data = json.loads(cfg.read_text())
    del data["extra"]["config"]["exempt_from_decay"]
    data["extra"]["config"].update(changes)
    cfg.write_text(json.dumps(data))
    digests = json.loads(marker.read_text())
    digests[checkpoints.CONFIG_FILE] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    marker.write_text(json.dumps(digests))


def test_a_run_from_before_the_recipe_rename_and_the_decay_switch_resumes(tiny_data, tmp_path):
    """A checkpoint that names a recipe by its old name and has no exempt_from_decay resumes under today's
    names; with weight decay on, only with the setting it ran with (every parameter decayed)."""
    import dataclasses
    renamed = dataclasses.replace(config("stage1", epochs=2), recipe="kinetics400")
    Trainer(renamed, tiny_data, str(tmp_path / "old")).fit(stop_after_steps=1)
    _as_written_before(tmp_path / "old", recipe="k400")
    assert Trainer(renamed, tiny_data, str(tmp_path / "old")).fit()["steps"] > 1
    decayed = config("stage1", "weight_decay=0.01", epochs=2)
    Trainer(decayed, tiny_data, str(tmp_path / "decayed")).fit(stop_after_steps=1)
    _as_written_before(tmp_path / "decayed")
    with pytest.raises(TrainError, match="exempt_from_decay"):
        Trainer(decayed, tiny_data, str(tmp_path / "decayed"))
    Trainer(dataclasses.replace(decayed, exempt_from_decay="none"), tiny_data, str(tmp_path / "decayed")).fit()


def test_a_checkpoint_every_few_minutes_is_committed_mid_epoch_and_changes_no_weight(tiny_data, tmp_path,
                                                                                     no_mlflow_env):
    """checkpoint_every_minutes (on by default on cluster profiles: a preemption loses minutes, not an epoch):
    with a period shorter than a step, every step commits one; the weights are those of a run without."""
    from sfa_vivit.models import checkpoints
    from sfa_vivit.train import Trainer
    def steps(run):
        return [int(u.rsplit("-", 1)[1]) for u in checkpoints.committed_steps(str(run))]
    plain = tmp_path / "plain"
    n = Trainer(config("stage1", "keep_checkpoints=100", epochs=2), tiny_data, str(plain))
    n.fit()
    timed = tmp_path / "timed"
    Trainer(config("stage1", "checkpoint_every_minutes=1e-6", "keep_checkpoints=100", epochs=2), tiny_data,
            str(timed)).fit()
    assert steps(timed) == list(range(1, 2 * n.steps_per_epoch + 1))            # every step
    assert steps(plain) == [n.steps_per_epoch, 2 * n.steps_per_epoch]           # the epoch ends only
    a, b = final_state(plain), final_state(timed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="checkpoint_every_minutes=-1.0 must be a finite number >= 0"):
        config("stage1", "checkpoint_every_minutes=-1")
