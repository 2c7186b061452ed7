"""Bad input fails at once with one `error:` line naming the flag or file and exit status 2, never a
traceback; a sweep directory is locked while a sweep runs in it, and a kill during its first settings
write leaves a directory that a rerun accepts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from onelayer_fast import models, sweep as sweep_module
from onelayer_fast.cli import main
from onelayer_fast.sweep import LOCK_NAME, SETTINGS_NAME, SweepBusyError, SweepConfig, SweepLock, run_sweep
from onelayer_fast.trainer import GRPOConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The sweep of tests/test_sweep.py: tiny preset, 2 steps of 4 completions, 8 eval examples.
TRAIN_FLAGS = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                   num_iterations=1, beta=0.0, learning_rate=1e-2)
SWEEP = ["sweep", "--model", "tiny", "--task", "arithmetic", "--layers", "1,-1", "--eval-size", "8",
         "--metric", "mean_reward", "--steps", "2", "--batch-size", "4", "--num-generations", "2",
         "--max-completion-length", "3", "--num-iterations", "1", "--beta", "0", "--learning-rate", "1e-2",
         "--no-progress"]
EVAL = ["eval", "--model", "tiny", "--eval-size", "4"]


def sweep_config(out: Path) -> SweepConfig:
    return SweepConfig(model="tiny", out=str(out), task="arithmetic", layers="1,-1", eval_size=8,
                       metric="mean_reward", grpo=GRPOConfig(**TRAIN_FLAGS), progress=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Validation must come before any work: loading a model fails the test (AssertionError is not a
    user error, so main lets it through)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(sweep_module, "load_model", refuse)


def fails_with(capsys, argv: list[str], *expected: str) -> str:
    """main(argv) exits 2 with an `error:` line holding every `expected` text and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next((line for line in err.splitlines() if "error:" in line), None)
    assert line is not None, err
    for text in expected:
        assert text in line, (text, err)
    return line


def task_file(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


ROW = '{"prompt": "2+2=", "answer": "4"}'
OTHER = '{"prompt": "3+3=", "answer": "6"}'


# ------------------------------------------------------------------------------------- task files

@pytest.mark.parametrize("command", ["train", "eval", "sweep"])
def test_jsonl_line_that_is_a_list(tmp_path, capsys, no_model_load, command):
    path = task_file(tmp_path / "t.jsonl", ROW, "[1, 2]", OTHER)
    argv = {"train": ["train", "--output-dir", str(tmp_path / "run")], "eval": EVAL,
            "sweep": SWEEP + ["--out", str(tmp_path / "sweep")]}[command]
    fails_with(capsys, argv + ["--task", "jsonl", "--task-path", str(path)], f"{path}:2", "JSON object", "list")
    assert not (tmp_path / "sweep").exists()  # nothing written either


def test_jsonl_line_over_the_size_bound(tmp_path, capsys, no_model_load):
    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:
        f.write(ROW + "\n")
        f.write('{"prompt": "' + "x" * (50 << 20) + '", "answer": "1"}\n')
        f.write(OTHER + "\n")
    fails_with(capsys, EVAL + ["--task", "jsonl", "--task-path", str(path)], f"{path}:2", "longer than")


def test_jsonl_prompt_that_would_be_in_both_splits(tmp_path, capsys, no_model_load):
    # Before: the one prompt went to train, and one of its copies was moved into eval (train == eval).
    path = task_file(tmp_path / "dup.jsonl", ROW, ROW, ROW)
    fails_with(capsys, EVAL + ["--task", "jsonl", "--task-path", str(path)], str(path), "single distinct prompt")


def test_task_path_that_is_a_directory(tmp_path, capsys, no_model_load):
    fails_with(capsys, EVAL + ["--task", "jsonl-math", "--task-path", str(tmp_path)], str(tmp_path), "directory")


# ----------------------------------------------------------------------------------------- device

@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_unknown_device(tmp_path, capsys, no_model_load, command):
    argv = EVAL if command == "eval" else SWEEP + ["--out", str(tmp_path / "sweep")]
    fails_with(capsys, argv + ["--device", "nosuch"], "--device", "nosuch")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys, no_model_load):
    fails_with(capsys, EVAL + ["--device", "cuda"], "--device", "CUDA is not available")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_beyond_the_last(capsys, no_model_load):
    fails_with(capsys, EVAL + ["--device", f"cuda:{torch.cuda.device_count()}"], "--device", "CUDA device(s)")


# ------------------------------------------------------------------------------------ output paths

def test_train_output_dir_that_is_a_file(tmp_path, capsys):
    # The check itself belongs to RunSpec (a ValueError); without it, creating the directory fails with
    # FileExistsError. Either way: one error line naming the path.
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    fails_with(capsys, ["train", "--model", "tiny", "--steps", "1", "--output-dir", str(path)], str(path))


def test_sweep_out_that_is_a_file(tmp_path, capsys, no_model_load):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    fails_with(capsys, SWEEP + ["--out", str(path)], str(path), "not a directory")


def test_sweep_out_that_is_another_directory(tmp_path, capsys, no_model_load):
    (tmp_path / "notes.txt").write_text("not a sweep")
    fails_with(capsys, SWEEP + ["--out", str(tmp_path)], str(tmp_path), "not a sweep directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # not even a lock file left in it


@pytest.mark.parametrize("kind", ["non-empty directory", "file"])
def test_merge_into_an_existing_target(tmp_path, capsys, no_model_load, kind):
    out = tmp_path / "merged"
    if kind == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    fails_with(capsys, ["merge", "--model", "tiny", "--checkpoint", str(tmp_path / "run"), "--out", str(out)],
               "--out", str(out), "not an empty directory")
    assert out.exists() and (kind == "file" or (out / "keep.txt").exists())


# ------------------------------------------------------------------------------------- number flags

@pytest.mark.parametrize("argv, expected", [
    (EVAL + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (EVAL + ["--max-new-tokens", "-3"], "--max-new-tokens"),
    (EVAL + ["--eval-size", "0"], "--eval-size"),
    (EVAL + ["--eval-size", "-1"], "--eval-size"),
    (EVAL + ["--eval-batch-size", "0"], "--eval-batch-size"),
    (SWEEP + ["--eval-size", "0"], "--eval-size"),
    (SWEEP + ["--eval-batch-size", "-2"], "--eval-batch-size"),
    (SWEEP + ["--memory-budget-mib", "0"], "--memory-budget-mib"),
    (SWEEP + ["--memory-budget-mib", "nan"], "--memory-budget-mib"),
    (SWEEP + ["--memory-budget-mib", "inf"], "--memory-budget-mib"),
    (SWEEP + ["--memory-budget-mib", "-5"], "--memory-budget-mib"),
    (SWEEP + ["--save-steps", "0"], "--save-steps"),  # RunSpec's own check, made before any run starts
])
def test_bad_numbers(tmp_path, capsys, no_model_load, argv, expected):
    if argv[0] == "sweep":
        argv = argv + ["--out", str(tmp_path / "sweep")]
    fails_with(capsys, argv, expected)
    assert not (tmp_path / "sweep").exists()


def test_sweep_config_rejects_a_non_finite_memory_budget(tmp_path):
    config = sweep_config(tmp_path / "s")
    config.memory_budget_mib = float("inf")
    with pytest.raises(ValueError, match="memory_budget_mib"):
        config.validate()


# ------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("config_text, message", [
    ("{not json", "not valid JSON"),
    ('{"hidden_size": 64}', "model_type"),
    ("[1, 2]", "JSON object"),
])
@pytest.mark.parametrize("command", ["eval", "train", "merge"])
def test_invalid_config_json(tmp_path, capsys, no_model_load, config_text, message, command):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config_text)
    argv = {"eval": ["eval", "--model", str(model)],
            "train": ["train", "--model", str(model), "--output-dir", str(tmp_path / "run")],
            "merge": ["merge", "--model", str(model), "--checkpoint", str(tmp_path / "run"),
                      "--out", str(tmp_path / "merged")]}[command]
    fails_with(capsys, argv, str(model / "config.json"), message)


def test_model_directory_without_weights(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    fails_with(capsys, EVAL[:1] + ["--model", str(model)], str(model))


@pytest.mark.parametrize("command", ["eval", "train", "sweep"])
def test_model_that_is_neither_preset_nor_directory(tmp_path, capsys, no_model_load, command):
    argv = {"eval": ["eval"], "train": ["train", "--output-dir", str(tmp_path / "run")],
            "sweep": SWEEP[:1] + ["--out", str(tmp_path / "sweep")]}[command]
    line = fails_with(capsys, argv + ["--model", "nosuch-model"], "nosuch-model", "neither a preset")
    assert all(name in line for name in ("tiny", "toy-arith", "smollm2-135m"))


# --------------------------------------------------------------------------------------- sweep lock

def test_second_sweep_into_a_locked_directory_fails_at_once(tmp_path, capsys, no_model_load):
    out = tmp_path / "sweep"
    with SweepLock(out):
        fails_with(capsys, SWEEP + ["--out", str(out)], str(out), f"pid {os.getpid()}", "another sweep")
        with pytest.raises(SweepBusyError, match=f"pid {os.getpid()}"):  # the library API too
            run_sweep(sweep_config(out))
    assert not (out / SETTINGS_NAME).exists()
    with SweepLock(out):  # released: free again
        pass


def start_python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lock_of_a_killed_sweep_is_taken_over(tmp_path):
    out = tmp_path / "sweep"
    holder = start_python("""
        import sys, time
        from onelayer_fast.sweep import SweepLock
        SweepLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """, str(out))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(SweepBusyError, match=f"{re.escape(str(out))}.*pid {holder.pid}"):
            SweepLock(out).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays
        holder.communicate(timeout=60)
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    with SweepLock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_kill_during_the_first_settings_write_then_rerun(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    # SIGKILL itself at the rename of the settings' temp file: the temp file and the lock file stay.
    killed = start_python("""
        import os, signal, sys
        from pathlib import Path
        from onelayer_fast import sweep
        from onelayer_fast.trainer import GRPOConfig

        rename = os.replace
        def replace(source, target):
            if Path(target).name == sweep.SETTINGS_NAME:
                os.kill(os.getpid(), signal.SIGKILL)
            rename(source, target)
        os.replace = replace
        sweep.run_sweep(sweep.SweepConfig(model="tiny", out=sys.argv[1], layers="1,-1", eval_size=8,
                                          metric="mean_reward", grpo=GRPOConfig(max_steps=2), progress=False))
    """, str(out))
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -9, stderr
    leftovers = {p.name for p in out.iterdir()} - {LOCK_NAME}
    assert (out / LOCK_NAME).is_file() and len(leftovers) == 1, leftovers
    assert next(iter(leftovers)).startswith(f".{SETTINGS_NAME}.tmp-")  # the torn write, no sweep.json

    # The rerun (other settings even: nothing ran) takes the lock over and writes its settings; it is stopped
    # at its first run, which is all this test needs.
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(sweep_module._Sweep, "execute", stop)
    with pytest.raises(Stop):
        run_sweep(sweep_config(out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, SETTINGS_NAME]
    assert json.loads((out / SETTINGS_NAME).read_text())["learning_rates"] == [TRAIN_FLAGS["learning_rate"]]


def test_torn_settings_file(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(sweep_module._Sweep, "execute", stop)
    # Torn, nothing run: a fresh start.
    out = tmp_path / "fresh"
    out.mkdir()
    (out / SETTINGS_NAME).write_text('{"format_version": 2, "mod')
    with pytest.raises(Stop):
        run_sweep(sweep_config(out))
    assert json.loads((out / SETTINGS_NAME).read_text())["layers"] == [1, 3]
    # Torn beside runs: which settings made them is lost; refused, naming the file.
    out = tmp_path / "runs-made"
    (out / "runs" / "full").mkdir(parents=True)
    (out / SETTINGS_NAME).write_text('{"format_version": 2, "mod')
    with pytest.raises(ValueError, match=re.escape(f"{out / SETTINGS_NAME} is damaged")):
        run_sweep(sweep_config(out))
