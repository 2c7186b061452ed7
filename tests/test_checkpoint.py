"""Checkpoint save/load/resume/merge on a tiny random Qwen2: exact round trips, atomicity, strictness."""
from __future__ import annotations

import copy
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import onelayer_fast as olf
from onelayer_fast import checkpoint as ckpt

VOCAB = 61
METADATA = {"base_model": "tiny-qwen2", "config": {"lr": 1e-2, "layer": 1}}


def _base(tiny_model, tied: bool = True, **overrides) -> torch.nn.Module:
    # conftest's qwen2: hidden 32, 3 layers, float32, eval, sdpa.
    return tiny_model("qwen2", vocab_size=VOCAB, tie_word_embeddings=tied, **overrides)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _train(policy, optimizer, steps: int = 2) -> None:
    ids = _ids()
    for _ in range(steps):
        hidden = policy.suffix(policy.prefix(ids))
        # The lm_head term makes the (tied) embedding train too in full mode.
        loss = hidden.pow(2).sum() + (hidden @ policy.lm_head_weight.T).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(_ids()).logits


def _trainer_state() -> dict:
    return {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(), "episodes": 12}


def _setup(tiny_model, tied: bool = True, full: bool = False):
    """(pristine base, trained policy, its optimizer): the trained weights differ from the base."""
    base = _base(tiny_model, tied)
    model = copy.deepcopy(base)
    policy = olf.FullModelPolicy(model, keep_reference=False) if full else olf.OneLayerPolicy(model, layer=1)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    _train(policy, optimizer)
    assert not torch.equal(_logits(base), _logits(model))
    return base, policy, optimizer


def _save(policy, optimizer, out, step, **kwargs) -> Path:
    return ckpt.save_checkpoint(out, policy=policy, optimizer=optimizer, step=step, metadata=METADATA,
                                trainer_state=_trainer_state(), **kwargs)


@pytest.mark.parametrize("tied", [True, False])
def test_single_layer_round_trip(tiny_model, tmp_path, tied):
    base, policy, optimizer = _setup(tiny_model, tied)
    path = _save(policy, optimizer, tmp_path, step=5)
    assert path == tmp_path / "checkpoint-000005"
    assert sorted(p.name for p in path.iterdir()) == ["layer.safetensors", "meta.json", "optimizer.pt"]

    meta = ckpt.read_meta(path)
    assert meta == {"format_version": 1, "mode": "single", "layer": 1, "num_layers": 3, "step": 5, **METADATA}
    with safe_open(str(path / "layer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(policy.target_layer.state_dict()) and "self_attn.q_proj.weight" in keys

    fresh = copy.deepcopy(base)
    assert ckpt.load_layer(fresh, path) == meta
    assert torch.equal(_logits(fresh), _logits(policy.model))
    # Only layer 1 changed.
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(base.named_parameters())[name]) != name.startswith("model.layers.1.")


def test_load_keeps_model_dtype(tiny_model, tmp_path):
    base, policy, optimizer = _setup(tiny_model)
    _save(policy, optimizer, tmp_path, step=1)
    fresh = copy.deepcopy(base).to(torch.bfloat16)
    ckpt.load_layer(fresh, tmp_path)
    for name, p in fresh.model.layers[1].named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, policy.target_layer.get_parameter(name).to(torch.bfloat16))


def test_merge(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    base, policy, optimizer = _setup(tiny_model)
    _save(policy, optimizer, tmp_path / "run", step=3)

    class Tokenizer:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    out = ckpt.merge_checkpoint(copy.deepcopy(base), tmp_path / "run", tmp_path / "merged", tokenizer=Tokenizer())
    assert out == tmp_path / "merged" and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(merged), _logits(policy.model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(FileExistsError, match="not an empty directory"):
        ckpt.merge_checkpoint(copy.deepcopy(base), tmp_path / "run", out)
    (tmp_path / "empty").mkdir()
    assert ckpt.merge_checkpoint(copy.deepcopy(base), tmp_path / "run", tmp_path / "empty").is_dir()


def test_training_state_round_trip_resumes_exactly(tiny_model, tmp_path):
    base, policy, optimizer = _setup(tiny_model)
    saved_state = _trainer_state()
    ckpt.save_checkpoint(tmp_path, policy=policy, optimizer=optimizer, step=7, metadata=METADATA,
                         trainer_state=saved_state)

    model2 = copy.deepcopy(base)
    ckpt.load_layer(model2, tmp_path)
    policy2 = olf.OneLayerPolicy(model2, layer=1)
    optimizer2 = torch.optim.AdamW(policy2.trainable_parameters(), lr=0.5)  # lr comes from the checkpoint
    step, trainer_state = ckpt.load_training_state(tmp_path, optimizer2)
    assert step == 7
    assert torch.equal(trainer_state["torch_rng"], saved_state["torch_rng"])
    assert trainer_state["python_rng"] == saved_state["python_rng"] and trainer_state["episodes"] == 12
    assert np.array_equal(trainer_state["numpy_rng"][1], saved_state["numpy_rng"][1])

    sd1, sd2 = optimizer.state_dict(), optimizer2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert sd1["state"].keys() == sd2["state"].keys()
    for i, state in sd1["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sd2["state"][i][key]), (i, key)

    # One more step on both: the resumed run continues bit-identically.
    _train(policy, optimizer, steps=1)
    _train(policy2, optimizer2, steps=1)
    assert torch.equal(_logits(model2), _logits(policy.model))


def test_keep_last_and_latest(tiny_model, tmp_path):
    _, policy, optimizer = _setup(tiny_model)
    for step in (1, 2, 3, 4):
        path = _save(policy, optimizer, tmp_path, step=step, keep_last=2)
        assert (tmp_path / "latest").read_text().strip() == path.name
        assert ckpt.latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000003", "checkpoint-000004", "latest"]
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-000004"
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoint-000003") == tmp_path / "checkpoint-000003"
    assert ckpt.read_meta(tmp_path)["step"] == 4
    # Re-saving an existing step replaces it.
    _save(policy, optimizer, tmp_path, step=4, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000004", "latest"]


def _boom(*args, **kwargs):
    raise OSError("simulated crash")


def _partial_safetensors(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 17)  # a torn write
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["weights", "optimizer", "rename", "latest"])
def test_interrupted_save_keeps_previous_checkpoint(tiny_model, tmp_path, monkeypatch, where):
    base, policy, optimizer = _setup(tiny_model)
    first = _save(policy, optimizer, tmp_path, step=1)
    expected = _logits(policy.model)
    _train(policy, optimizer)  # the model moves on; the failed save would have held these weights

    target = {"weights": (ckpt, "save_file", _partial_safetensors), "optimizer": (torch, "save", _boom),
              "rename": (os, "rename", _boom), "latest": (os, "replace", _boom)}[where]
    monkeypatch.setattr(*target)
    with pytest.raises(OSError, match="simulated crash"):
        _save(policy, optimizer, tmp_path, step=2)
    monkeypatch.undo()

    assert ckpt.latest_checkpoint(tmp_path) == first
    assert (tmp_path / "latest").read_text().strip() == first.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    fresh = copy.deepcopy(base)
    assert ckpt.load_layer(fresh, tmp_path)["step"] == 1
    assert torch.equal(_logits(fresh), expected)
    # The next save succeeds (for "latest", over the orphaned checkpoint-000002).
    assert _save(policy, optimizer, tmp_path, step=2) == ckpt.latest_checkpoint(tmp_path)


def test_latest_checkpoint_fallbacks(tiny_model, tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None
    leftover = tmp_path / ".tmp-checkpoint-000009-abc"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    (leftover / "layer.safetensors").write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path) is None

    _, policy, optimizer = _setup(tiny_model)
    _save(policy, optimizer, tmp_path, step=1, keep_last=5)
    second = _save(policy, optimizer, tmp_path, step=2, keep_last=5)
    assert not leftover.exists()  # cleaned after a successful save
    (tmp_path / "latest").unlink()  # e.g. crash between the rename and the `latest` update
    assert ckpt.latest_checkpoint(tmp_path) == second
    (tmp_path / "latest").write_text("checkpoint-000099\n")  # stale pointer
    with pytest.warns(ckpt.CorruptCheckpointWarning, match="checkpoint-000099, which does not exist"):
        assert ckpt.latest_checkpoint(tmp_path) == second


def test_missing_files_raise_file_not_found(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.resolve_checkpoint(tmp_path)

    base, policy, optimizer = _setup(tiny_model)
    path = _save(policy, optimizer, tmp_path / "run", step=1)
    (path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        ckpt.load_training_state(path, torch.optim.AdamW(policy.trainable_parameters()))
    for name in ("meta.json", "layer.safetensors"):
        path = _save(policy, optimizer, tmp_path / name, step=1)
        (path / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            ckpt.resolve_checkpoint(path)
        with pytest.raises(FileNotFoundError, match=name):
            ckpt.load_layer(copy.deepcopy(base), path)


def test_wrong_layer_count_raises(tiny_model, tmp_path):
    _, policy, optimizer = _setup(tiny_model)
    _save(policy, optimizer, tmp_path, step=1)
    with pytest.raises(ValueError, match="3 decoder layers, this model has 4"):
        ckpt.load_layer(_base(tiny_model, num_hidden_layers=4), tmp_path)


@pytest.mark.parametrize("tamper, message", [
    ("shape", r"shape mismatches \[mlp.up_proj.weight: checkpoint \(64, 31\) vs model \(64, 32\)\]"),
    ("missing", r"missing keys \['self_attn.q_proj.bias'\]"),
    ("unexpected", r"unexpected keys \['extra.weight'\]"),
])
def test_tampered_checkpoint_raises_and_leaves_model_untouched(tiny_model, tmp_path, tamper, message):
    base, policy, optimizer = _setup(tiny_model)
    path = _save(policy, optimizer, tmp_path, step=1)
    tensors = load_file(str(path / "layer.safetensors"))
    if tamper == "shape":
        tensors["mlp.up_proj.weight"] = tensors["mlp.up_proj.weight"][:, :31].contiguous()
    elif tamper == "missing":
        del tensors["self_attn.q_proj.bias"]
    else:
        tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path / "layer.safetensors"))

    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        ckpt.load_layer(fresh, path)
    assert torch.equal(_logits(fresh), _logits(base))  # checked before any copy


def test_full_mode_round_trip_tied(tiny_model, tmp_path):
    base, policy, optimizer = _setup(tiny_model, tied=True, full=True)
    path = _save(policy, optimizer, tmp_path, step=2)
    meta = ckpt.read_meta(path)
    assert (meta["mode"], meta["layer"], meta["num_layers"]) == ("full", None, 3)
    with safe_open(str(path / "layer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once

    fresh = copy.deepcopy(base)
    ckpt.load_layer(fresh, path)
    assert torch.equal(_logits(fresh), _logits(policy.model))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

    # An untied model of the same shape receives both copies of the tied tensor.
    untied = _base(tiny_model, tied=False)
    ckpt.load_layer(untied, path)
    assert torch.equal(untied.lm_head.weight, policy.model.model.embed_tokens.weight)
    assert torch.equal(_logits(untied), _logits(policy.model))

    # Resume in full mode.
    optimizer2 = torch.optim.AdamW(olf.FullModelPolicy(fresh, keep_reference=False).trainable_parameters())
    assert ckpt.load_training_state(tmp_path, optimizer2)[0] == 2


def test_full_mode_untied_checkpoint_into_tied_model_raises(tiny_model, tmp_path):
    base, policy, optimizer = _setup(tiny_model, tied=False, full=True)
    _save(policy, optimizer, tmp_path, step=1)
    fresh_untied = copy.deepcopy(base)
    ckpt.load_layer(fresh_untied, tmp_path)
    assert torch.equal(_logits(fresh_untied), _logits(policy.model))
    with pytest.raises(ValueError, match=r"tied in the model but different in the checkpoint: \['lm_head.weight'\]"):
        ckpt.load_layer(_base(tiny_model, tied=True), tmp_path)


def test_bad_arguments(tiny_model, tmp_path):
    _, policy, optimizer = _setup(tiny_model)
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_checkpoint(tmp_path, policy=policy, optimizer=optimizer, step=1, metadata={"step": 3},
                             trainer_state={})
    with pytest.raises(ValueError, match="keep_last"):
        _save(policy, optimizer, tmp_path, step=1, keep_last=0)
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save_checkpoint(tmp_path, policy=policy, optimizer=optimizer, step=1, metadata={"p": object()},
                             trainer_state={})
    assert list(tmp_path.iterdir()) == []
    # meta.json is plain JSON.
    path = _save(policy, optimizer, tmp_path, step=1)
    assert json.loads((path / "meta.json").read_text())["config"] == METADATA["config"]


# ------------------------------------------------------------------------------------ integrity
def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: random.randrange(1, len(data) - 2)])  # meta.json: more than its last newline
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "bit-flipped":
        flipped = bytearray(data)
        flipped[random.randrange(len(data))] ^= 1 << random.randrange(8)
        file.write_bytes(bytes(flipped))
    else:  # garbage
        file.write_bytes(random.randbytes(random.randrange(1, 200)))


def _two_checkpoints(tiny_model, out):
    """(base, policy, optimizer, first, second, logits at first): two checkpoints of different weights."""
    base, policy, optimizer = _setup(tiny_model)
    first = _save(policy, optimizer, out, step=1, keep_last=5)
    expected = _logits(policy.model)
    _train(policy, optimizer)
    second = _save(policy, optimizer, out, step=2, keep_last=5)
    return base, policy, optimizer, first, second, expected


DAMAGES = [(name, how) for name in ("layer.safetensors", "optimizer.pt") for how in ("truncated", "empty", "bit-flipped")]
DAMAGES += [("meta.json", "garbage"), ("meta.json", "truncated")]


@pytest.mark.parametrize("name, how", DAMAGES, ids=[f"{n}-{h}" for n, h in DAMAGES])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tiny_model, tmp_path, name, how):
    base, policy, optimizer, first, second, expected = _two_checkpoints(tiny_model, tmp_path)
    _damage(second / name, how)
    damaged = re.escape(str(second / name))

    with pytest.warns(ckpt.CorruptCheckpointWarning, match=f"skipping checkpoint .*{damaged}"):
        assert ckpt.latest_checkpoint(tmp_path) == first
    fresh = copy.deepcopy(base)
    with pytest.warns(ckpt.CorruptCheckpointWarning, match=name):  # an output dir resolves to the intact one
        assert ckpt.load_layer(fresh, tmp_path)["step"] == 1
    assert torch.equal(_logits(fresh), expected)

    # The damaged checkpoint itself, named explicitly (eval, merge): a clear error naming the file.
    untouched = copy.deepcopy(base)
    if name == "optimizer.pt":
        with pytest.raises(ValueError, match=f"{damaged}.* corrupt"):
            ckpt.load_training_state(second, torch.optim.AdamW(policy.trainable_parameters()))
    else:
        with pytest.raises(ValueError, match=f"{damaged}.* corrupt"):
            ckpt.load_layer(untouched, second)
        assert torch.equal(_logits(untouched), _logits(base))

    # Nothing intact left: an error naming the damage, not a silent fresh start.
    _damage(first / "layer.safetensors", "bit-flipped")
    with pytest.warns(ckpt.CorruptCheckpointWarning), pytest.raises(ValueError, match="no intact checkpoint") as error:
        ckpt.latest_checkpoint(tmp_path)
    assert str(second / name) in str(error.value) and str(first / "layer.safetensors") in str(error.value)


@pytest.mark.parametrize("pointer", ["garbage", "no name", "missing"])
def test_bad_latest_pointer_falls_back_to_the_newest_intact(tiny_model, tmp_path, pointer):
    *_, first, second, _ = _two_checkpoints(tiny_model, tmp_path)
    latest = tmp_path / "latest"
    if pointer == "garbage":
        latest.write_bytes(b"\xff\xfe" + random.randbytes(30))  # not even UTF-8
    elif pointer == "no name":
        latest.write_text(f"checkpoint-{random.randrange(1000)}-x\n")
    else:
        latest.write_text("checkpoint-000099\n")
    with pytest.warns(ckpt.CorruptCheckpointWarning, match="latest"):
        assert ckpt.latest_checkpoint(tmp_path) == second
    # The next save repairs the pointer.
    _, policy, optimizer = _setup(tiny_model)
    third = _save(policy, optimizer, tmp_path, step=3, keep_last=5)
    assert (latest.read_text().strip(), ckpt.latest_checkpoint(tmp_path)) == (third.name, third)


def test_digests_are_recorded_and_hidden(tiny_model, tmp_path):
    import hashlib

    _, policy, optimizer = _setup(tiny_model)
    path = _save(policy, optimizer, tmp_path, step=1)
    raw = json.loads((path / "meta.json").read_text())
    assert raw["sha256"] == {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
                             for name in ("layer.safetensors", "optimizer.pt")}
    assert "sha256" not in ckpt.read_meta(path)
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_checkpoint(tmp_path, policy=policy, optimizer=optimizer, step=2, metadata={"sha256": {}},
                             trainer_state={})


def _strip_digests(path: Path) -> None:
    """What a checkpoint written before digests were recorded looks like."""
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def test_old_checkpoint_without_digests_still_loads(tiny_model, tmp_path):
    import warnings

    base, policy, optimizer, first, second, _ = _two_checkpoints(tiny_model, tmp_path)
    for path in (first, second):
        _strip_digests(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is wrong with it
        assert ckpt.latest_checkpoint(tmp_path) == second
        fresh = copy.deepcopy(base)
        assert ckpt.load_layer(fresh, tmp_path)["step"] == 2
        assert ckpt.load_training_state(tmp_path, torch.optim.AdamW(olf.OneLayerPolicy(fresh, layer=1).trainable_parameters()))[0] == 2
    assert torch.equal(_logits(fresh), _logits(policy.model))

    # Without a digest, a truncated file is still caught by its structure.
    for name in ("layer.safetensors", "optimizer.pt"):
        _damage(second / name, "truncated")
        with pytest.warns(ckpt.CorruptCheckpointWarning, match=name):
            assert ckpt.latest_checkpoint(tmp_path) == first
        (second / name).write_bytes((first / name).read_bytes())  # repaired with step 1's (structurally fine)


# ------------------------------------------------------------------------------- resume settings
def _trainer(out, task=None, resume_steps: int = 1, **overrides):
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask
    from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec

    values = dict(max_steps=resume_steps, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                  learning_rate=1e-2, beta=0.04)
    values.update(overrides)
    run_fields = {"save_steps", "save_total_limit"}
    run = RunSpec(output_dir=str(out), layer=1, **{k: v for k, v in values.items() if k in run_fields})
    model, tokenizer = load_model("tiny")
    return GRPOTrainer(model, tokenizer, task or ArithmeticTask(), GRPOConfig(**{k: v for k, v in values.items()
                                                                               if k not in run_fields}), run,
                       base_model="tiny", progress=False)


def test_resume_refuses_other_training_settings(tmp_path):
    from onelayer_fast.tasks.arithmetic import ArithmeticTask

    _trainer(tmp_path).train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    lr = random.choice([2e-2, 5e-3, 1e-1])
    with pytest.raises(ValueError, match=rf"cannot resume .*learning_rate 0.01 -> {lr!r}"):
        _trainer(tmp_path, learning_rate=lr)
    with pytest.raises(ValueError, match=r"seed 42 -> 7"):
        _trainer(tmp_path, seed=7)
    with pytest.raises(ValueError, match=r"beta 0.04 -> 0.0"):
        _trainer(tmp_path, beta=0.0)
    other = ArithmeticTask()
    other.name = "arithmetic-v2"
    with pytest.raises(ValueError, match=r"task 'arithmetic' -> 'arithmetic-v2'"):
        _trainer(tmp_path, task=other)
    # Several at once: each is named.
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path, learning_rate=lr, seed=7, temperature=0.5, max_grad_norm=None)
    for setting in ("learning_rate", "seed 42 -> 7", "temperature 1.0 -> 0.5", "max_grad_norm 1.0 -> None"):
        assert setting in str(error.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched

    # What does not change the math may change: a longer run, another cadence, backend or layout.
    resumed = _trainer(tmp_path, resume_steps=2, save_steps=2, save_total_limit=3, loss_backend="reference",
                       layout="padded")
    assert resumed.step == 1
    assert [r["step"] for r in resumed.train()] == [2]


def test_lane_resume_refuses_another_lane_learning_rate(tmp_path):
    from onelayer_fast.lane_trainer import LaneRun, LaneTrainer
    from onelayer_fast.lanes import Lane
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask
    from onelayer_fast.trainer import GRPOConfig

    def lanes(max_steps: int, lr: float | None):
        model, tokenizer = load_model("tiny")
        config = GRPOConfig(max_steps=max_steps, per_device_train_batch_size=4, num_generations=2,
                            max_completion_length=3, learning_rate=1e-2)
        runs = [LaneRun(Lane(1, learning_rate=lr), str(tmp_path / "a")), LaneRun(Lane(2), str(tmp_path / "b"))]
        return LaneTrainer(model, tokenizer, ArithmeticTask(), config, runs, save_steps=1, progress=False)

    lanes(1, 3e-3).train()
    with pytest.raises(ValueError, match=r"learning_rate 0.003 -> 0.01"):
        lanes(2, None)  # the lane's own rate dropped: it would now train at the config's
    assert lanes(2, 3e-3).steps == [1, 1]
