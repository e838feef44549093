"""`sfa membench`: each setting measured in its own child process."""

import json

import pytest

from sfa_vivit.cli import main
from sfa_vivit.tools.membench import Setting, run_child, search_max_frames

SMALL = dict(spatial_depth=2, temporal_depth=1)


@pytest.fixture(scope="module")
def rows():
    """Full and stage-2 steps of a small Ti at 8 and 64 frames, each measured in its own child (two children
    at a time: a child's peak is its own process's, whatever runs beside it)."""
    from concurrent.futures import ThreadPoolExecutor
    cells = [(m, f) for m in ("full", "stage2") for f in (8, 64)]
    with ThreadPoolExecutor(2) as pool:
        measured = pool.map(lambda cell: run_child(Setting(variant="Ti", regime=cell[0], frames=cell[1], image_size=64,
                                                           batch_size=4, steps=1, num_classes=10, model=SMALL)), cells)
        return dict(zip(cells, measured))


def test_full_mode_peaks_higher_with_more_frames_and_stage2_grows_less(rows):
    assert all(r["fits"] and r["loss_finite"] for r in rows.values()), rows
    full_growth = rows["full", 64]["peak_memory_bytes"] - rows["full", 8]["peak_memory_bytes"]
    stage2_growth = rows["stage2", 64]["peak_memory_bytes"] - rows["stage2", 8]["peak_memory_bytes"]
    peaks = {k: round(r["peak_memory_bytes"] / 2**20) for k, r in rows.items()}
    assert full_growth > 50 * 2**20, peaks         # 56 more frames of activations kept for backward
    assert stage2_growth < full_growth / 3, peaks
    assert rows["stage2", 8]["trainable_parameters"] < rows["full", 8]["trainable_parameters"]


def test_a_failing_child_is_reported_not_raised():
    row = run_child(Setting(variant="Ti", regime="full", frames=7,  # 7: not a tubelet multiple
                            image_size=64, model=SMALL))
    assert row["fits"] is False and "tubelet" in row["error"]


def test_outputs_and_interleaved_timing(tmp_path, capsys):
    out = tmp_path / "mb.json"
    assert main(["membench", "--variant", "Ti", "--frames", "8", "--regimes", "full,stage2-cached", "--image-size",
                 "32", "--steps", "3", "--set", "model.spatial_depth=1", "--set", "temporal_depth=1", "--out", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert {(r["regime"], r["frames"]) for r in result["rows"]} == {("full", 8), ("stage2-cached", 8)}
    assert out.with_suffix(".md").read_text().count("| full |") == 1 and out.with_suffix(".png").stat().st_size
    # Times come from one child per frame count that interleaves the regimes, 3 rounds of each; the ratio is
    # the median of the per-round ratios, reported with its spread, of wall and of process CPU time.
    (timing,) = result["timing"]
    assert (timing["frames"], timing["regimes"]) == (8, ["full", "stage2-cached"])
    assert all(len(timing[kind][m]) == 3 for kind in ("wall_s", "cpu_s") for m in timing["regimes"])
    (ratio,) = result["ratios"]
    for key in ("step_ratio", "cpu_step_ratio"):
        spread = ratio[f"{key}_spread"]
        assert spread["min"] <= ratio[key] == spread["median"] <= spread["max"] and 0 < ratio[key] < 1
    per_round = sorted(a / b for a, b in zip(timing["wall_s"]["stage2-cached"], timing["wall_s"]["full"]))
    assert ratio["step_ratio"] == round(per_round[1], 4)
    assert "stage2-cached" in capsys.readouterr().out


def test_budget_search_stops_where_the_next_doubling_fails(rows):
    """A budget just above the smallest setting's peak (full, 8 frames): the search finds a frame count below
    the cap and every probe it accepted fits the budget."""
    budget = (rows["full", 8]["peak_memory_bytes"] + 40 * 2**20) / 2**30
    found = search_max_frames(Setting(variant="Ti", regime="full", image_size=64, batch_size=4, num_classes=10,
                                      model=SMALL), budget, max_frames=256, resolution=16)
    assert found["max_frames"] is not None and 8 <= found["max_frames"] < 256 and not found["capped"]
    assert all(p["peak_memory_bytes"] <= budget * 2**30 for p in found["probes"] if p["frames"] <= found["max_frames"])
