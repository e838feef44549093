"""The local pipeline's terminal (kubeflow/local_log.py): what kfp.local prints, filtered line by line. The
lines are written in kfp.local's own formats (kfp 2.x `local/logging_utils.py`: '%(asctime)s - %(levelname)s -
%(message)s', task names in colour; a task's log records as its executor formats them)."""

import io

from sfa_vivit.kubeflow import local_log
from sfa_vivit.kubeflow.pipelines import build_sfa

KFP_LINES = """\
01:40:54.048 - INFO - Executing task \x1b[96m'train-stage1'\x1b[0m
01:40:54.048 - WARNING - /x/kfp/local/subprocess_task_handler.py:81: RuntimeWarning: You may be attemping to run a task
  warnings.warn(
01:40:54.048 - INFO - Streamed logs:
    [KFP Executor 2026-12-04 01:40:55,894 INFO]: Looking for component `train_stage1` in --component_module_path `/t`
    [KFP Executor 2026-12-04 01:40:55,895 INFO]: Got executor_input:
    {
        "inputs": {}
    }
    [KFP Executor 2026-12-04 01:41:08,503 INFO]: epoch 1/2 step 1/6 loss 2.4849 lr 0.008333
    /x/mlflow/pyfunc/__init__.py:3344: UserWarning: \x1b[1;33mAn input example was not provided\x1b[0m
    Downloading artifacts: 100%|##########| 3/3 [00:00<00:00, 8461.94it/s]
    prep:  50% 384/768 [00:17<00:17, 21.80video/s]
    [KFP Executor 2026-12-04 01:41:09,000 WARNING]: image_checkpoint=x is not used
    [KFP Executor 2026-12-04 01:41:14,983 INFO]: Wrote executor output file to /t/executor_output.json.
01:41:19.296 - INFO - Task \x1b[96m'train-stage1'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
01:41:19.300 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m
    [KFP Executor 2026-12-04 01:41:20,000 INFO]: Got executor_input:
    Traceback (most recent call last):
    ValueError: no such split
01:41:21.296 - ERROR - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_the_terminal_gets_tasks_and_our_lines_and_the_log_gets_everything():
    log, terminal = io.StringIO(), io.StringIO()
    tasks = local_log.TaskLog(log, terminal, total=15, history={"train-stage1": 83.0})
    for piece in (KFP_LINES[:100], KFP_LINES[100:]):        # writes need not end at a line's end
        tasks.write(piece)
    assert log.getvalue() == KFP_LINES
    shown = terminal.getvalue().splitlines()
    assert shown[:4] == ["[1/15] train-stage1 (elapsed 0:00; took 1:23 last run)",
                         "  train-stage1: epoch 1/2 step 1/6 loss 2.4849 lr 0.008333",
                         "  train-stage1: prep:  50% 384/768 [00:17<00:17, 21.80video/s]",
                         "  train-stage1: WARNING image_checkpoint=x is not used"]
    assert shown[4] == "[2/15] evaluate (elapsed 0:00)"
    # A failed task's last lines come to the terminal too, so its error is never only in the file.
    assert shown[5].startswith("  evaluate failed after") and "  | ValueError: no such split" in shown
    assert not any(word in terminal.getvalue() for word in ("Warning", "executor_input", "Downloading", "\x1b"))
    assert set(tasks.durations) == {"train-stage1", "evaluate"}


def test_the_task_count_is_what_kfp_local_executes():
    """Every executor task, the prep fan-out's body once per part, and of the baseline's If/Else the branch that
    runs: 15 tasks with 2 prep parts and the baseline (as the end-to-end run shows), 12 without it."""
    spec = build_sfa("cpu").pipeline_spec
    assert local_log.task_count(spec, 2, True) == 15
    assert local_log.task_count(spec, 3, True) == 16
    assert local_log.task_count(spec, 2, False) == 12


def test_our_progress_lines_reach_the_terminal_and_download_bars_do_not(capsys):
    """The lines our bars print in a log (core.progress.bar off a terminal) are the ones the terminal passes on."""
    from sfa_vivit.core.progress import bar
    for _ in bar(range(5), desc="prep", unit="video"):
        pass
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and all(local_log._PROGRESS.match(line) for line in lines), lines
    assert "5/5" in lines[-1] and "video/s" in lines[-1]
    assert not local_log._PROGRESS.match("Downloading artifacts: 100%|##########| 3/3 [00:00<00:00, 8461.94it/s]")
