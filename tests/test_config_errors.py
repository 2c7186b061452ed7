"""Bad training settings stop `train` before any work: exit code 2, one `error:` line naming the flag, no traceback."""
from __future__ import annotations

import random

import pytest

from onelayer_fast.cli import main
from onelayer_fast.trainer import GRPOConfig, RunSpec

TINY = ["train", "--model", "tiny", "--steps", "1", "--batch-size", "4", "--num-generations", "2",
        "--max-completion-length", "3"]


def _fails_clearly(capsys, out, flag: str, value: str) -> str:
    assert main(TINY + ["--output-dir", str(out), f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err and "Traceback" not in err, err
    return err


# Each bad value: the fixed edge cases plus a random one from the bad range.
BAD_VALUES = [
    ("--learning-rate", ["inf", "nan", "0", repr(-random.Random(1).uniform(1e-6, 1.0))]),
    # -1 was accepted, and clip_grad_norm_ then flipped every gradient: training against the reward.
    ("--max-grad-norm", ["-1", "0", "inf", "nan", repr(-random.Random(2).uniform(1e-3, 10.0))]),
    ("--top-p", ["0", "nan", "-0.5", repr(1.0 + random.Random(3).uniform(1e-6, 5.0))]),
    ("--temperature", ["0", "-1", "inf", "nan", repr(-random.Random(4).uniform(1e-6, 5.0))]),
    ("--save-total-limit", ["0", str(-random.Random(5).randint(1, 100))]),
    ("--save-steps", ["0", str(-random.Random(6).randint(1, 100))]),
    # TRL's trainer-level knobs (tests/test_trl_knobs.py)
    ("--warmup-steps", ["-1", "nan", "inf", repr(-random.Random(7).uniform(1e-6, 10.0))]),
    ("--ref-model-mixup-alpha", ["1.5", "-0.1", "nan"]),
    ("--ref-model-sync-steps", ["0", str(-random.Random(8).randint(1, 100))]),
    ("--entropy-target", ["nan", "inf"]),
]


@pytest.mark.parametrize("flag, value", [(flag, v) for flag, values in BAD_VALUES for v in values])
def test_bad_value_is_refused_before_any_work(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    err = _fails_clearly(capsys, out, flag, value)
    assert value in err or value.lower() in err.lower() or str(float(value)) in err  # says what it got
    assert not out.exists()  # nothing was created: the check came first


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "not-a-dir"
    content = random.randbytes(32)
    out.write_bytes(content)
    assert main(TINY + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--output-dir" in err and str(out) in err and "Traceback" not in err, err
    assert out.read_bytes() == content


def test_sync_ref_model_without_beta_is_refused(tmp_path, capsys):
    # TRL refuses it too: with beta 0 there is no reference pass, so nothing to synchronize.
    assert main(TINY + ["--output-dir", str(tmp_path / "run"), "--sync-ref-model", "--beta", "0"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--sync-ref-model" in err and "--beta" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_good_edge_values_pass():
    # None still means no clipping; top_p 1 is plain sampling.
    GRPOConfig(max_grad_norm=None, top_p=1.0, temperature=1e-3, learning_rate=1e-12).validate()
    # warm-up: a ratio in [0, 1) or a step count; the mix-up alpha's bounds; a sync every step
    GRPOConfig(warmup_steps=0.999, ref_model_mixup_alpha=0.0).validate()
    GRPOConfig(warmup_steps=10_000, sync_ref_model=True, beta=0.01, ref_model_mixup_alpha=1.0,
               ref_model_sync_steps=1).validate()
    RunSpec(save_steps=1, save_total_limit=1).validate()
