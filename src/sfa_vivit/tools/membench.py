"""`sfa membench`: training-step time and peak memory of full training vs SFA stage 2, per frame count.

Memory: each configuration runs in a fresh child process (so one configuration's allocations cannot
inflate another's peak): build the model, one warm-up and one measured SGD step on random inputs.
Peak memory is the CUDA allocator's peak on a GPU and the child's peak resident set on CPU (which
includes the interpreter and torch, reported apart as `base_rss_bytes`).

Time: the regimes of one frame count are timed in one child, interleaved (full, stage2, full,
stage2, ...) for `steps` repeats after a warm-up step of each, so load on the machine at any moment
falls on every regime alike. Each regime's ratio to `full` is taken per repeat; the median and the
spread (min, max) are reported, of wall time and, on CPU, of the process's CPU time.

Modes:
    full           every parameter trained (the conventional recipe, SFA stage 1)
    stage2         tubelet + spatial frozen (no_grad, eval mode, chunks of `spatial_chunk` tubelets),
                   adapter + temporal + head trained, from videos
    stage2-cached  the same trainable part, from precomputed spatial features (the feature cache)

With a budget, it searches, per regime, the largest frame count whose step fits (the paper's
Table 4): doubling from the smallest, then bisection to `resolution` frames.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sfa_vivit.core.options import option
from sfa_vivit.core.plots import line_plot
from sfa_vivit.models.vivit import VARIANTS

log = logging.getLogger(__name__)

REGIMES = ("full", "stage2", "stage2-cached")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What a memory benchmark measures by default: the one source of `sfa membench`'s flags, the `sfa`
    pipeline's membench_* parameters and `benchmark()` (the paper's Table 4 asks for ViViT-B at 224 px)."""
    variant: str = option("B", "the ViViT variant measured", choices=sorted(VARIANTS), pipeline="membench_variant")
    frames: str = option("8,16,32,64,128", "comma-separated frame counts (multiples of the tubelet)",
                         pipeline="membench_frames")
    regimes: str = option(",".join(REGIMES), "what each measured step computes: full, stage2 (frozen spatial), "
                                             "stage2-cached", pipeline="membench_regimes")
    image_size: int = option(224, "square frame size in pixels", pipeline="membench_image_size")
    batch_size: int = option(1, "clips per measured step", pipeline="membench_batch_size")
    # A pipeline's benchmark is a report beside the training, not the measurement of record: 2 timed steps.
    steps: int = option(5, "timed steps of each regime, interleaved with the other regimes in one process after a "
                           "warm-up step of each (median and spread of the per-step ratios)",
                        pipeline="membench_steps", pipeline_default=2)
    budget_gib: float = option(0.0, "> 0: also search the largest frame count per regime whose step fits in this "
                                    "many GiB", pipeline="membench_budget_gib")
    max_frames: int = option(2048, "where the budget search stops", pipeline="membench_max_frames")
    spatial_chunk: int = option(4, "tubelets per frozen-spatial chunk in stage 2", pipeline="membench_spatial_chunk")
    precision: str = option("fp32", "arithmetic of the measured steps", choices=("fp32", "bf16"),
                            pipeline="membench_precision")


BENCH = BenchOptions()


@dataclasses.dataclass
class Setting:
    variant: str = "S"
    regime: str = "full"
    frames: int = 16
    image_size: int = 224
    batch_size: int = 1
    num_classes: int = 400
    steps: int = 3
    warmup: int = 1
    spatial_chunk: int = 4          # tubelets per frozen-spatial chunk in stage 2
    device: str = "cpu"
    precision: str = "fp32"         # fp32 | bf16 (autocast)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime {self.regime!r} is not one of {list(REGIMES)}")
        for name in ("frames", "image_size", "batch_size", "steps", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} is not fp32 or bf16")


def _build_step(s: Setting, rt):
    """Model, optimizer and random inputs of one setting → (a function doing one SGD step, trainable
    parameters, model, last-loss holder)."""
    from sfa_vivit.models import vivit
    device = rt.device
    model = vivit(s.variant, num_frames=s.frames, image_size=s.image_size, num_classes=s.num_classes,
                  spatial_chunk=s.spatial_chunk, **s.model)
    if s.regime != "full":
        model.add_adapter().freeze_spatial()
    model.to(device).train()
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    c = model.config
    if s.regime == "stage2-cached":
        inputs = {"features": torch.randn(s.batch_size, c.num_tubelets, c.width, device=device)}
    else:
        inputs = {"video": torch.randn(s.batch_size, s.frames, 3, s.image_size, s.image_size, device=device)}
    labels = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        with rt.autocast:
            logits = model(**inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rt.step()
        rt.synchronize()
        last["loss"] = loss
    return step, params, model, last


def measure(s: Setting) -> dict[str, Any]:
    """Peak memory of one setting's training step, in this process (the CLI runs it in a fresh child):
    `warmup` steps, then `steps` measured steps (their median wall time is `step_s`; the benchmark's
    step times and ratios come from `time_interleaved`, which times the regimes side by side)."""
    from sfa_vivit.core import runtime
    s.validate()
    base_rss = runtime.peak_rss_bytes()
    # One device (on XLA one chip, without SPMD): the memory of one device's step is the question.
    rt = runtime.start(s.device, s.precision, data_parallel=False)
    step, params, model, last = _build_step(s, rt)
    rt.synchronize()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    times = []
    for i in range(s.warmup + s.steps):
        start = time.perf_counter()
        step()
        if i >= s.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = rt.peak_memory_bytes()
    return {**dataclasses.asdict(s), "step_s": round(seconds, 5), "clips_per_s": round(s.batch_size / seconds, 4),
            "peak_memory_bytes": peak, "base_rss_bytes": base_rss, "fits": True,
            "xla_compilations": rt.compilations(),
            "trainable_parameters": sum(p.numel() for p in params), "total_parameters": model.num_parameters(),
            "loss_finite": bool(torch.isfinite(last["loss"]))}


def time_interleaved(settings: list[Setting], repeats: int) -> dict[str, Any]:
    """Step times of `settings` (one frame count, several regimes) measured in this process, interleaved:
    one warm-up step of each, then `repeats` rounds of one step of each in turn. Returns per regime the
    lists of wall and process-CPU seconds, one entry per round."""
    from sfa_vivit.core import runtime
    rt = runtime.start(settings[0].device, settings[0].precision, data_parallel=False)
    steps = {}
    for s in settings:
        s.validate()
        steps[s.regime] = _build_step(s, rt)[0]
        steps[s.regime]()                      # warm-up: first-call allocations, kernel selection
    wall: dict[str, list[float]] = {regime: [] for regime in steps}
    cpu: dict[str, list[float]] = {regime: [] for regime in steps}
    for _ in range(repeats):
        for regime, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            wall[regime].append(time.perf_counter() - w)
            cpu[regime].append(time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu}


def _child(payload: dict[str, Any], timeout: float | None) -> tuple[dict[str, Any] | None, str, int]:
    """Run this module in a fresh Python process on `payload` → (its JSON answer or None, error, status)."""
    cmd = [sys.executable, "-m", "sfa_vivit.tools.membench", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s", -1
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1]), "", 0
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower()
    return None, "out of memory" if oom else tail, proc.returncode


def run_child(s: Setting, timeout: float | None = None) -> dict[str, Any]:
    """`measure(s)` in a fresh Python process. Out of memory (or killed) → {'fits': False, 'error'}."""
    answer, error, status = _child(dataclasses.asdict(s), timeout)
    if answer is not None:
        return answer
    row = {**dataclasses.asdict(s), "fits": False, "error": error}
    return row | ({"returncode": status} if status > 0 or status < -1 else {})


def run_timing_child(settings: list[Setting], repeats: int, timeout: float | None = None) -> dict[str, Any]:
    """`time_interleaved(settings, repeats)` in a fresh Python process; {'error': ...} if it fails."""
    answer, error, _ = _child({"interleave": [dataclasses.asdict(s) for s in settings], "repeats": repeats}, timeout)
    return answer if answer is not None else {"error": error}


def _fits(row: dict[str, Any], budget_bytes: float) -> bool:
    return bool(row.get("fits")) and row["peak_memory_bytes"] <= budget_bytes


def search_max_frames(base: Setting, budget_gib: float, *, max_frames: int = 2048, resolution: int = 8,
                      timeout: float | None = None) -> dict[str, Any]:
    """Largest frame count (a multiple of `resolution`) whose step peaks under `budget_gib`."""
    budget = budget_gib * 2**30
    probes: list[dict[str, Any]] = []

    def probe(frames: int) -> bool:
        row = run_child(dataclasses.replace(base, frames=frames, steps=1, warmup=0), timeout)
        probes.append(row)
        log.info("  %s %d frames: %s", base.regime, frames,
                 f"{row['peak_memory_bytes'] / 2**30:.2f} GiB" if row.get("fits") else row.get("error"))
        return _fits(row, budget)

    low, high = 0, None
    frames = resolution
    while frames <= max_frames:
        if probe(frames):
            low, frames = frames, frames * 2
        else:
            high = frames
            break
    if high is not None and low:
        while high - low > resolution:
            mid = (low + high) // 2 // resolution * resolution
            if probe(mid):
                low = mid
            else:
                high = mid
    return {"regime": base.regime, "budget_gib": budget_gib, "max_frames": low or None,
            "capped": high is None, "probes": probes}


def run(options: BenchOptions, *, out: str | None = None, device: str = "cpu",
        model: dict[str, Any] | None = None, timeout: float | None = 1800) -> dict[str, Any]:
    """`benchmark` with the options of `sfa membench` and the pipeline's memory-benchmark step."""
    o = options
    return benchmark(o.variant, [int(f) for f in o.frames.split(",") if f.strip()],
                     [r.strip() for r in o.regimes.split(",") if r.strip()], image_size=o.image_size,
                     batch_size=o.batch_size, budget_gib=o.budget_gib, out=out, steps=o.steps, device=device,
                     precision=o.precision, spatial_chunk=o.spatial_chunk, model=model, max_frames=o.max_frames,
                     timeout=timeout)


def benchmark(variant: str, frames: list[int], regimes: list[str], *, image_size: int = BENCH.image_size,
              batch_size: int = BENCH.batch_size, budget_gib: float | None = BENCH.budget_gib, out: str | None = None,
              steps: int = BENCH.steps, device: str = "cpu", precision: str = BENCH.precision,
              spatial_chunk: int = BENCH.spatial_chunk, model: dict[str, Any] | None = None,
              max_frames: int = BENCH.max_frames, timeout: float | None = 1800) -> dict[str, Any]:
    """Measure every (regime, frames), optionally search the budget; write JSON + Markdown + PNG at `out`.
    Raises ValueError naming the option for a regime, frame count, budget or step count that cannot be."""
    if budget_gib is not None and not (math.isfinite(budget_gib) and budget_gib >= 0):
        raise ValueError(f"--budget-gib={budget_gib} must be a finite number >= 0 (0: no budget search)")
    if not frames or any(f < 1 for f in frames):
        raise ValueError(f"--frames={','.join(map(str, frames))} must be positive frame counts")
    if steps < 1:
        raise ValueError(f"--steps={steps} must be >= 1")
    for regime in regimes:
        if regime not in REGIMES:
            raise ValueError(f"--regimes: {regime!r} is not one of {list(REGIMES)}")
    from sfa_vivit.core.runtime import resolve_device
    device = resolve_device(device)
    rows = []
    timing: list[dict[str, Any]] = []
    for f in frames:
        cells = [Setting(variant=variant, regime=regime, frames=f, image_size=image_size, batch_size=batch_size,
                         steps=1, device=device, precision=precision, spatial_chunk=spatial_chunk,
                         model=dict(model or {})) for regime in regimes]
        for s in cells:
            s.validate()
            row = run_child(s, timeout)                  # memory: a fresh child per cell
            rows.append(row)
            log.info("%s %s %3d frames: %s", variant, s.regime, f,
                     f"peak {row['peak_memory_bytes'] / 2**30:.2f} GiB" if row.get("fits") else row.get("error"))
        fitting = [s for s, row in zip(cells, rows[-len(cells):]) if row.get("fits")]
        if fitting:                                       # time: the regimes that fit, side by side
            timed = run_timing_child(fitting, steps, timeout)
            timing.append({"frames": f, "regimes": [s.regime for s in fitting], **timed})
            for row in rows[-len(cells):]:
                _set_times(row, timed, device)
            log.info("%s %3d frames, %d interleaved steps each: %s", variant, f, steps,
                     timed.get("error") or ", ".join(f"{r} {statistics.median(t):.3f} s"
                                                      for r, t in timed["wall_s"].items()))
    rows.sort(key=lambda r: (regimes.index(r["regime"]), frames.index(r["frames"])))   # regime by regime, as before
    result: dict[str, Any] = {"variant": variant, "device": device, "image_size": image_size,
                              "batch_size": batch_size, "precision": precision, "rows": rows,
                              "steps": steps, "ratios": ratios(rows, timing),
                              "per_frame_bytes": per_frame_bytes(rows), "timing": timing}
    if budget_gib:
        result["budget"] = [search_max_frames(Setting(variant=variant, regime=m, image_size=image_size,
                                                      batch_size=batch_size, device=device, precision=precision,
                                                      spatial_chunk=spatial_chunk, model=dict(model or {})),
                                              budget_gib, max_frames=max_frames, timeout=timeout) for m in regimes]
    if out:
        write_outputs(result, out)
    return result


def _set_times(row: dict[str, Any], timed: dict[str, Any], device: str) -> None:
    """A memory row's step time from the interleaved timing of its frame count (median over rounds)."""
    wall = timed.get("wall_s", {}).get(row["regime"])
    if not row.get("fits") or not wall:
        return
    row["step_s"] = round(statistics.median(wall), 5)
    row["clips_per_s"] = round(row["batch_size"] / row["step_s"], 4)
    if device == "cpu":
        row["cpu_step_s"] = round(statistics.median(timed["cpu_s"][row["regime"]]), 5)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def ratios(rows: list[dict[str, Any]], timing: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each regime over `full` at the same frame count: peak memory from the memory rows, step time per
    interleaved round (`step_ratio` = the median over rounds, `step_ratio_spread` its median/min/max;
    `cpu_step_ratio*` the same of process CPU time, on CPU). Without `timing`, from the rows' step times."""
    full = {r["frames"]: r for r in rows if r["regime"] == "full" and r.get("fits")}
    timed = {t["frames"]: t for t in timing or [] if "wall_s" in t}
    out = []
    for r in rows:
        ref = full.get(r["frames"])
        if r["regime"] == "full" or not ref or not r.get("fits"):
            continue
        entry = {"regime": r["regime"], "frames": r["frames"],
                 "peak_ratio": round(r["peak_memory_bytes"] / ref["peak_memory_bytes"], 4)}
        t = timed.get(r["frames"])
        if t and r["regime"] in t["wall_s"] and "full" in t["wall_s"]:
            for kind, key in (("wall_s", "step_ratio"), ("cpu_s", "cpu_step_ratio")):
                if kind == "cpu_s" and r["device"] != "cpu":
                    continue
                per_round = [a / b for a, b in zip(t[kind][r["regime"]], t[kind]["full"])]
                entry[f"{key}_spread"] = _spread(per_round)
                entry[key] = entry[f"{key}_spread"]["median"]
        elif "step_s" in r and "step_s" in ref:
            entry["step_ratio"] = round(r["step_s"] / ref["step_s"], 4)
        out.append(entry)
    return out


def per_frame_bytes(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Least-squares slope of peak memory over frames, per regime (bytes per added frame)."""
    slopes: dict[str, float | None] = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        points = [(r["frames"], r["peak_memory_bytes"]) for r in rows if r["regime"] == regime and r.get("fits")]
        if len(points) < 2:
            slopes[regime] = None
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        var = sum((x - mx) ** 2 for x, _ in points)
        slopes[regime] = round(sum((x - mx) * (y - my) for x, y in points) / var, 1) if var else None
    return slopes


def markdown(result: dict[str, Any]) -> str:
    lines = [f"ViViT-{result['variant']} on {result['device']}, {result['image_size']} px, batch "
             f"{result['batch_size']}, {result['precision']}", "",
             f"Step times: {result.get('steps', '?')} steps of each regime, interleaved in one process; "
             "step / full is the median of the per-round ratios (min-max in brackets); CPU: process CPU time.", "",
             "| regime | frames | step (s) | clips/s | peak memory (GiB) | step / full | CPU time / full "
             "| peak / full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rel = {(r["regime"], r["frames"]): r for r in result["ratios"]}
    for r in result["rows"]:
        ratio = rel.get((r["regime"], r["frames"]), {})
        if r.get("fits"):
            lines.append(f"| {r['regime']} | {r['frames']} | {r['step_s']:.3f} | {r['clips_per_s']:.2f} | "
                         f"{r['peak_memory_bytes'] / 2**30:.2f} | {_ratio_cell(ratio, 'step_ratio')} | "
                         f"{_ratio_cell(ratio, 'cpu_step_ratio')} | {ratio.get('peak_ratio', '')} |")
        else:
            lines.append(f"| {r['regime']} | {r['frames']} | - | - | {r.get('error')} | | | |")
    lines += ["", "Peak memory per added frame: " + ", ".join(
        f"{m} {v / 2**20:.2f} MiB" if v is not None else f"{m} -" for m, v in result["per_frame_bytes"].items())]
    for b in result.get("budget", []):
        lines.append(f"- {b['regime']}: at most {b['max_frames']} frames in {b['budget_gib']} GiB"
                     + (" (search cap reached)" if b["capped"] else ""))
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: dict[str, Any], key: str) -> str:
    if key not in ratio:
        return ""
    spread = ratio.get(f"{key}_spread")
    return f"{ratio[key]:.3f} ({spread['min']:.3f}-{spread['max']:.3f})" if spread else f"{ratio[key]:.3f}"


def write_outputs(result: dict[str, Any], out: str) -> None:
    """`out` (JSON), and beside it the same name with .md and .png."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    series = {}
    for regime in dict.fromkeys(r["regime"] for r in result["rows"]):
        points = sorted((r["frames"], r["peak_memory_bytes"] / 2**30) for r in result["rows"]
                        if r["regime"] == regime and r.get("fits"))
        if points:
            series[regime] = tuple(map(list, zip(*points)))
    budgets = {f"budget {b['budget_gib']} GiB": b["budget_gib"] for b in result.get("budget", [])}
    line_plot(path.with_suffix(".png"), series, xlabel="frames", ylabel="peak memory (GiB)", hlines=budgets,
              title=f"ViViT-{result['variant']} training step, {result['device']}, batch {result['batch_size']}")


def main(argv: list[str]) -> int:
    """Child entry point: one JSON Setting in, one JSON row out."""
    torch.set_num_threads(int(os.environ.get("SFA_MEMBENCH_THREADS", torch.get_num_threads())))
    payload = json.loads(argv[0])
    if "interleave" in payload:
        answer = time_interleaved([Setting(**s) for s in payload["interleave"]], payload["repeats"])
    else:
        answer = measure(Setting(**payload))
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
