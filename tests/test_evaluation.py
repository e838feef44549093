"""Evaluation (sfa_vivit.tools.evaluate, sfa_vivit.train.evaluation): `sfa evaluate` on a model with known
outputs, and multi-head (verb, noun, action) counting."""

import json

import pytest
import torch

from sfa_vivit.models import checkpoints


def test_evaluator_on_a_model_with_known_outputs(tiny_data, tmp_path, no_mlflow_env, capsys):
    """A head with zero weights and a fixed bias predicts the same ranking for every clip: top-1,
    top-5 and the confusion matrix are then known exactly from the label counts."""
    from sfa_vivit.cli import main
    from sfa_vivit.data.manifest import load_manifest
    from sfa_vivit.data.reader import iter_samples
    from sfa_vivit.models import vivit
    model = vivit("Ti", num_frames=4, image_size=32, num_classes=12, width=32, spatial_depth=1, temporal_depth=1,
                  heads=2, mlp_dim=64, patch=8)
    ranking = [3, 2, 4, 1, 5, 0, 6, 7, 8, 9, 10, 11]      # the order every clip's logits put the classes in
    bias = torch.empty(12)
    for position, cls in enumerate(ranking):
        bias[cls] = 12.0 - position
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(bias)
    checkpoints.save(model, tmp_path / "ckpt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", tiny_data, "--views", "2x3",
                 "--out", str(tmp_path / "eval"), "--workers", "0"]) == 0
    assert "top1" in capsys.readouterr().out
    text = (tmp_path / "eval" / "metrics.json").read_text()
    metrics = json.loads(text)
    rows = [line.strip().rstrip(",") for line in text.splitlines() if line.strip().startswith("[")]
    assert sum(row.count(",") == 11 for row in rows) == 12               # a confusion-matrix row per line
    assert len(text.splitlines()) < 100                                  # not one integer per line (150+)
    labels = [s["meta"]["label"] for s in iter_samples(load_manifest(tiny_data).shard_urls("validation"))]
    n = len(labels)
    assert metrics["num_examples"] == n == 8
    assert 3 in labels and metrics["top1"] == pytest.approx(100 * sum(label == 3 for label in labels) / n)
    assert metrics["top5"] == pytest.approx(100 * sum(label in ranking[:5] for label in labels) / n)
    expected = [[0] * 12 for _ in range(12)]
    for label in labels:
        expected[label][3] += 1
    assert metrics["confusion"] == expected
    assert metrics["per_class_top1"][3] == 100.0
    assert all(v in (None, 0.0) for c, v in enumerate(metrics["per_class_top1"]) if c != 3)
    assert metrics["views"] == "2x3" and len(metrics["classes"]) == 12


def test_multi_head_evaluation_counts_verb_noun_and_action():
    from sfa_vivit.train.evaluation import evaluate_model

    class Fixed(torch.nn.Module):
        """Predicts verb 0 and noun 1 for every view."""
        def forward(self, video):
            n = video.shape[0]
            verb = torch.tensor([5.0, 1, 0, 0, 0, 0, 0]).expand(n, 7)
            noun = torch.tensor([0.0, 5, 1, 0, 0, 0, 0, 0]).expand(n, 8)
            return {"verb": verb, "noun": noun}

    labels = {"verb": torch.tensor([0, 0, 1, 0]), "noun": torch.tensor([1, 2, 1, -1])}
    loader = [{"video": torch.zeros(4, 3, 2, 3, 8, 8), "label": labels}]
    m = evaluate_model(Fixed(), loader, num_classes={"verb": 7, "noun": 8},
                       confusion=True)
    assert m["num_examples"] == 3                       # the unlabelled noun is skipped
    assert m["verb_top1"] == pytest.approx(100 * 2 / 3) and m["noun_top1"] == pytest.approx(100 * 2 / 3)
    assert m["top1"] == pytest.approx(100 / 3)          # action: both right only for the first clip
    assert m["verb_top5"] == 100.0 and m["confusion"]["noun"][2][1] == 1
