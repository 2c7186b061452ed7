"""TRL 1.16 trainer-level knobs: the learning-rate schedule, truncated-completion masking, the reference sync,
multi-objective reward aggregation and the (adaptive) entropy bonus; in single runs and in lanes."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import onelayer_fast as olf
from onelayer_fast.advantages import normalize_then_sum
from onelayer_fast.batch import RolloutBatch, mask_truncated, truncated_rows
from onelayer_fast.kernels.grpo_loss import LossConfig, group_advantages
from onelayer_fast.lane_trainer import LaneRun, LaneTrainer
from onelayer_fast.lanes import Lane, LanePolicy, stack_batches
from onelayer_fast.models import load_model
from onelayer_fast.tasks import Example
from onelayer_fast.tasks.arithmetic import ArithmeticTask
from onelayer_fast.tasks.rewards import reward_table, score, weighted_sum
from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec, scored_batch
from onelayer_fast.update import (LR_SCHEDULERS, EntropyControl, StepControls, UpdateConfig, grpo_update,
                                  lanes_update, lr_multiplier, make_scheduler, warmup_step_count)

TINY = dict(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
            learning_rate=1e-2, num_iterations=2)


# ------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("kind", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 3, 0.25, 0.5, 7.9])
def test_schedule_matches_transformers(kind, warmup, tmp_path):
    # transformers' TrainingArguments (its warm-up reading) needs accelerate: the [real] / [trl] extras bring it
    pytest.importorskip("accelerate", reason="transformers' TrainingArguments needs accelerate")
    from transformers import TrainingArguments, get_scheduler

    total = 13
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, lr_scheduler_type=kind, report_to=[])
    assert warmup_step_count(warmup, total) == args.get_warmup_steps(total)
    ours_param, theirs_param = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([ours_param], lr=0.5)
    theirs = torch.optim.SGD([theirs_param], lr=0.5)
    scheduler = make_scheduler(ours, kind, warmup, total)
    reference = get_scheduler(kind, theirs, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    for step in range(total + 2):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-15, abs=1e-18), step
        assert ours.param_groups[0]["lr"] == pytest.approx(0.5 * lr_multiplier(kind, step, args.get_warmup_steps(total), total))
        ours.step(), theirs.step()
        scheduler.step(), reference.step()


def test_schedule_resumes_at_its_step():
    param = torch.nn.Parameter(torch.zeros(1))
    straight = torch.optim.SGD([param], lr=0.3)
    scheduler = make_scheduler(straight, "cosine", 2, 10)
    for _ in range(4):
        straight.step()
        scheduler.step()
    resumed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    make_scheduler(resumed, "cosine", 2, 10, done_steps=4)
    assert resumed.param_groups[0]["lr"] == straight.param_groups[0]["lr"]


def test_optimizer_steps_and_learning_rates_of_a_run(tmp_path):
    """max_steps * num_iterations optimizer steps, each at its step's rate (what TRL's Trainer builds with
    steps_per_generation 1: num_training_steps = its max_steps = optimizer steps)."""
    from transformers import get_scheduler

    config = GRPOConfig(**{**TINY, "max_steps": 3, "num_iterations": 2}, warmup_steps=2)
    assert config.total_optimizer_steps == 6
    model, tokenizer = load_model("tiny")
    trainer = GRPOTrainer(model, tokenizer, ArithmeticTask(), config, RunSpec(output_dir=str(tmp_path), layer=1),
                          progress=False)
    expected_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    expected = get_scheduler("linear", expected_optimizer, num_warmup_steps=2, num_training_steps=6)
    rates = []
    for _ in range(6):
        rates.append(expected_optimizer.param_groups[0]["lr"])
        expected_optimizer.step()
        expected.step()
    records = trainer.train()
    for step, record in enumerate(records):
        assert record["learning_rate"] == pytest.approx((rates[2 * step] + rates[2 * step + 1]) / 2, rel=1e-12)
    assert trainer.controls.optimizer_steps == 6 and trainer.optimizer.param_groups[0]["lr"] == 0.0


def test_lane_learning_rates_follow_a_single_runs_schedule(tmp_path):
    config = GRPOConfig(**{**TINY, "max_steps": 3}, lr_scheduler_type="cosine", warmup_steps=0.3)
    model, tokenizer = load_model("tiny")
    runs = [LaneRun(Lane(1, learning_rate=3e-3), str(tmp_path / "a")), LaneRun(Lane(2), str(tmp_path / "b"))]
    lanes = LaneTrainer(model, tokenizer, ArithmeticTask(), config, runs, progress=False)
    lane_records = lanes.train()
    for k, lane in enumerate(lanes.policy.lanes):
        model, tokenizer = load_model("tiny")
        single = GRPOTrainer(model, tokenizer, ArithmeticTask(),
                             dataclasses.replace(config, learning_rate=lane.learning_rate or config.learning_rate),
                             RunSpec(output_dir=str(tmp_path / f"single{k}"), layer=lane.layer), progress=False)
        single_records = single.train()
        assert [r["learning_rate"] for r in lane_records[k]] == [r["learning_rate"] for r in single_records]
        assert lanes.optimizers[k].param_groups[0]["lr"] == single.optimizer.param_groups[0]["lr"]


def test_scheduled_run_with_controls_resumes_exactly(tmp_path):
    """Linear warm-up and decay, reference sync and adaptive entropy: a run interrupted after 2 of 4 steps
    and resumed ends exactly where a straight run does (the schedule position, the entropy controller and the
    synced reference come back from the checkpoint)."""
    settings = dict(TINY, max_steps=4, warmup_steps=3, beta=0.04, sync_ref_model=True, ref_model_sync_steps=3,
                    use_adaptive_entropy=True, entropy_target=100.0, entropy_coef_delta=0.01, loss_backend="chunked")

    def trainer(out):
        model, tokenizer = load_model("tiny")
        return GRPOTrainer(model, tokenizer, ArithmeticTask(), GRPOConfig(**settings),
                           RunSpec(output_dir=str(out), layer=1, save_steps=100), progress=False)

    straight = trainer(tmp_path / "a")
    records = straight.train()
    assert [r["entropy_coef"] for r in records] == pytest.approx([0.015, 0.035, 0.055, 0.075])  # two steps each
    interrupted = trainer(tmp_path / "b")
    interrupted.train_step()
    interrupted.train_step()
    interrupted._save()
    resumed = trainer(tmp_path / "b")
    assert resumed.step == 2 and resumed.controls.entropy.coef == pytest.approx(0.04)
    resumed.train()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for a, b in zip(straight.policy.reference_layer.parameters(), resumed.policy.reference_layer.parameters()):
        assert torch.equal(a, b)
    assert straight.controls.state_dict()["entropy_coef"] == resumed.controls.state_dict()["entropy_coef"]
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------- config and CLI
def test_defaults_and_loss_config_are_trls():
    config = GRPOConfig()
    assert (config.max_completion_length, config.lr_scheduler_type, config.warmup_steps) == (512, "linear", 0)
    assert (config.sync_ref_model, config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (False, 0.6, 512)
    assert config.multi_objective_aggregation == "sum_then_normalize" and not config.mask_truncated_completions
    assert (config.entropy_coef, config.use_adaptive_entropy, config.entropy_coef_min, config.entropy_coef_max,
            config.entropy_coef_delta, config.entropy_target) == (0.0, False, 0.0, 1.0, 0.005, 0.2)
    knobs = dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=3.5, vespo_lambda_neg=1.25,
                 off_policy_mask_threshold=0.3, top_entropy_quantile=0.4, entropy_coef=0.02)
    loss = GRPOConfig(**knobs).loss_config()
    assert {name: getattr(loss, name) for name in knobs} == knobs


@pytest.mark.parametrize("overrides, message", [
    (dict(warmup_steps=-1), "--warmup-steps must be"),
    (dict(warmup_steps=math.nan), "--warmup-steps must be"),
    (dict(lr_scheduler_type="step"), "lr_scheduler_type must be one of"),
    (dict(sync_ref_model=True, beta=0.0), "--sync-ref-model needs --beta > 0"),
    (dict(sync_ref_model=True, beta=0.1, ref_model_mixup_alpha=1.5), r"--ref-model-mixup-alpha must be in \[0, 1\]"),
    (dict(ref_model_sync_steps=0), "--ref-model-sync-steps must be >= 1"),
    (dict(multi_objective_aggregation="max"), "multi_objective_aggregation must be one of"),
    (dict(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1), "--entropy-coef-min"),
    (dict(use_adaptive_entropy=True, entropy_coef_delta=-0.1), "--entropy-coef-delta must be >= 0"),
    (dict(entropy_target=math.inf), "--entropy-target must be a finite number"),
    (dict(entropy_coef=math.nan), "entropy_coef"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
])
def test_knob_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**overrides).validate()


def test_knobs_are_cli_flags():
    from onelayer_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "train", "--lr-scheduler-type", "cosine", "--warmup-steps", "0.1", "--mask-truncated-completions",
        "--sync-ref-model", "--beta", "0.04", "--ref-model-sync-steps", "8", "--ref-model-mixup-alpha", "0.9",
        "--multi-objective-aggregation", "normalize_then_sum", "--loss-type", "vespo", "--vespo-k-pos", "1.5",
        "--off-policy-mask-threshold", "0.5", "--top-entropy-quantile", "0.2", "--use-adaptive-entropy",
        "--entropy-coef", "0.01", "--entropy-target", "0.7"])
    config = config_from_args(GRPOConfig, args)
    config.validate()
    assert (config.lr_scheduler_type, config.warmup_steps, config.mask_truncated_completions) == ("cosine", 0.1, True)
    assert (config.sync_ref_model, config.ref_model_sync_steps, config.ref_model_mixup_alpha) == (True, 8, 0.9)
    assert (config.multi_objective_aggregation, config.loss_type, config.vespo_k_pos) == ("normalize_then_sum", "vespo", 1.5)
    assert (config.off_policy_mask_threshold, config.top_entropy_quantile) == (0.5, 0.2)
    assert (config.use_adaptive_entropy, config.entropy_coef, config.entropy_target) == (True, 0.01, 0.7)


# ----------------------------------------------------------------------------- truncated completions
def test_truncated_rows_are_those_without_an_end_token():
    eos, pad = 9, 0
    ids = torch.tensor([[3, 4, 9, 0], [3, 4, 5, 6], [9, 0, 0, 0], [5, 6, 7, 0], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    # ended by EOS; cut off; EOS first; cut off (its last token is no end token); no tokens at all
    assert truncated_rows(ids, mask, (eos, pad)).tolist() == [False, True, False, True, False]
    assert truncated_rows(ids, mask, (eos,)).tolist() == [False, True, False, True, False]


def _truncation_batch():
    ids = torch.tensor([[3, 4, 9, 0], [3, 4, 5, 6], [9, 0, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    prompts = torch.tensor([[1, 2]] * 4)
    return RolloutBatch(prompts, torch.ones_like(prompts), ids, mask, torch.tensor([1.0, 0.0, 0.5, 2.0]), group_size=2)


def test_mask_truncated_zeroes_only_the_truncated_rows():
    batch = _truncation_batch()
    masked, truncated = mask_truncated(batch, (9, 0))
    assert truncated.tolist() == [False, True, False, True]
    assert masked.completion_mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(masked.rewards, batch.rewards) and masked.group_size == 2


def _capture(monkeypatch, module):
    """Record what mask_truncated got and gave in `module` (the trainer or the lane trainer)."""
    calls = []
    original = module.mask_truncated

    def spy(batch, end_ids):
        masked, truncated = original(batch, end_ids)
        calls.append((batch, masked, truncated, end_ids))
        return masked, truncated

    monkeypatch.setattr(module, "mask_truncated", spy)
    return calls


def _check_masked(calls, eos):
    assert calls
    for batch, masked, truncated, end_ids in calls:
        assert eos in end_ids
        ended = [(row[m.bool()][-1:] == eos).any().item() or int(m.sum()) == 0
                 for row, m in zip(batch.completion_ids, batch.completion_mask)]
        assert truncated.tolist() == [not e for e in ended]
        for r, cut in enumerate(truncated.tolist()):
            expected = torch.zeros_like(batch.completion_mask[r]) if cut else batch.completion_mask[r]
            assert torch.equal(masked.completion_mask[r], expected)
    return sum(int(t.sum()) for *_, t, _ in calls)


def test_trainer_and_lanes_mask_truncated_completions(tmp_path, monkeypatch):
    import onelayer_fast.lane_trainer as lane_module
    import onelayer_fast.trainer as trainer_module

    config = GRPOConfig(**TINY, mask_truncated_completions=True)
    model, tokenizer = load_model("tiny")
    calls = _capture(monkeypatch, trainer_module)
    records = GRPOTrainer(model, tokenizer, ArithmeticTask(), config, RunSpec(output_dir=str(tmp_path / "s"), layer=1),
                          progress=False).train()
    cut = _check_masked(calls, tokenizer.eos_token_id)
    assert cut > 0 and all("clipped_ratio" in r for r in records)
    assert sum(r["clipped_ratio"] for r in records) * config.per_device_train_batch_size == cut

    model, tokenizer = load_model("tiny")
    calls = _capture(monkeypatch, lane_module)
    LaneTrainer(model, tokenizer, ArithmeticTask(), config,
                [LaneRun(Lane(1), str(tmp_path / "a")), LaneRun(Lane(2), str(tmp_path / "b"))], progress=False).train()
    assert _check_masked(calls, tokenizer.eos_token_id) > 0


def test_masked_rows_do_not_count_in_the_loss(tiny_model):
    """A truncated row, masked, contributes nothing: the gradient equals that of the batch without its tokens
    (same advantages, as the rewards still count in the group statistics)."""
    model = tiny_model("qwen2").to(torch.float64)
    batch = _truncation_batch()
    masked, _ = mask_truncated(batch, (9, 0))
    update = UpdateConfig(loss=LossConfig(loss_type="dapo"), num_iterations=1, loss_backend="reference", layout="padded")
    grads = []
    for b in (masked, dataclasses.replace(masked, advantages=group_advantages(batch.rewards, 2)[0])):
        policy = olf.OneLayerPolicy(copy.deepcopy(model), layer=1)
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
        grpo_update(policy, optimizer, b, update)
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert any(g.abs().max() > 0 for g in grads[0])


# ------------------------------------------------------------------------------------ reference sync
def test_sync_timing_and_formula():
    reference, policy = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    controls = StepControls(sync_pairs=[(reference, policy)], sync_alpha=0.6, sync_every=2)
    values = []
    for step in range(1, 6):
        policy.fill_(float(step))
        controls.step_end({})
        values.append(reference[0].item())
    # synced at global steps 2 and 4 (global_step % sync_steps == 0 at step end): 0.6 * 2, then 0.6 * 4 + 0.4 * 1.2
    assert values == pytest.approx([0.0, 1.2, 1.2, 0.6 * 4 + 0.4 * 1.2, 0.6 * 4 + 0.4 * 1.2], rel=1e-15)


def _random_batch(vocab: int, generator: torch.Generator, groups: int = 2, group_size: int = 3) -> RolloutBatch:
    rows = groups * group_size
    prompt_ids = torch.randint(1, vocab, (groups, 4), generator=generator).repeat_interleave(group_size, 0)
    completion_ids = torch.randint(1, vocab, (rows, 5), generator=generator)
    lengths = torch.randint(1, 6, (rows, 1), generator=generator)
    mask = (torch.arange(5) < lengths).long()
    rewards = torch.rand(rows, generator=generator, dtype=torch.float64).float()
    return RolloutBatch(prompt_ids, torch.ones_like(prompt_ids), completion_ids * mask, mask, rewards,
                        group_size=group_size)


def test_lanes_have_their_own_synced_reference_and_schedule(tiny_model):
    """Two updates with warm-up, a reference sync at every optimizer step and adaptive entropy: each lane of
    a lane update ends where its layer's single run does, its reference layer included."""
    model = tiny_model("qwen3").to(torch.float64)
    config = GRPOConfig(max_steps=4, num_iterations=2, learning_rate=1e-3, warmup_steps=1, beta=0.1,
                        sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                        use_adaptive_entropy=True, entropy_target=100.0, entropy_coef=0.01, loss_backend="reference",
                        layout="padded")
    update = config.update_config()
    generator = torch.Generator().manual_seed(3)
    lanes = [Lane(1, learning_rate=2e-3), Lane(3)]
    batches = [[_random_batch(model.config.vocab_size, generator) for _ in lanes] for _ in range(2)]

    policy = LanePolicy(copy.deepcopy(model), lanes, own_references=True)
    order = policy.order
    optimizers = [torch.optim.AdamW(policy.trainable_parameters(k), lr=lane.learning_rate or config.learning_rate)
                  for k, lane in enumerate(policy.lanes)]
    controls = [config.step_controls(o, sync_pairs=list(zip(policy.reference_layers[k].parameters(),
                                                            policy.lane_layers[k].parameters())))
                for k, o in enumerate(optimizers)]
    lane_history = [lanes_update(policy, optimizers, stack_batches([b[i] for i in order]), update, controls)
                    for b in batches]
    for k, lane in enumerate(policy.lanes):
        alone = olf.OneLayerPolicy(copy.deepcopy(model), layer=lane.layer)
        optimizer = torch.optim.AdamW(alone.trainable_parameters(), lr=lane.learning_rate or config.learning_rate)
        own = config.step_controls(optimizer, sync_pairs=list(zip(alone.reference_layer.parameters(),
                                                                  alone.target_layer.parameters())))
        history = [grpo_update(alone, optimizer, b[order[k]], update, own) for b in batches]
        for lane_step, alone_step in zip(lane_history, history):
            for a, e in zip(lane_step[k], alone_step):
                assert a["learning_rate"] == e["learning_rate"] and a["entropy_coef"] == e["entropy_coef"]
                assert a["loss"] == pytest.approx(e["loss"], rel=1e-9, abs=1e-12)
        for a, e in zip(policy.trainable_parameters(k), alone.trainable_parameters()):
            assert torch.allclose(a, e, rtol=1e-9, atol=1e-12)
        for a, e in zip(policy.reference_layers[k].parameters(), alone.reference_layer.parameters()):
            assert torch.allclose(a, e, rtol=1e-9, atol=1e-12)
        original = model.model.layers[lane.layer]
        assert not torch.equal(next(alone.reference_layer.parameters()), next(original.parameters()))
        assert [h["learning_rate"] for h in history[0]] == [0.0, lane.learning_rate or config.learning_rate]


def test_unsynced_own_references_equal_the_shared_original(tiny_model):
    model = tiny_model("llama").to(torch.float64)
    batch = _random_batch(model.config.vocab_size, torch.Generator().manual_seed(5))
    lanes = [Lane(0), Lane(2)]
    both = stack_batches([batch, batch])
    shared, own = LanePolicy(model, lanes), LanePolicy(model, lanes, own_references=True)
    with torch.no_grad():
        for lane_layer in list(shared.lane_layers) + list(own.lane_layers):  # policies that moved away
            for p in lane_layer.parameters():
                p.add_(0.01)
        a = shared.completion_states(shared.prefix_lanes(both), reference=True)
        b = own.completion_states(own.prefix_lanes(both), reference=True)
    assert torch.equal(a, b)
    assert own.subset([1]).reference_layers[0] is own.reference_layers[1]


# ------------------------------------------------------------------------------ multiple reward functions
def _nanstd(tensor, dim=None, keepdim=False):  # TRL's trl.trainer.utils.nanstd
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    variance = variance * count / (count - 1)
    return torch.sqrt(variance) if keepdim else torch.sqrt(variance).squeeze(dim) if dim is not None else torch.sqrt(variance).squeeze()


def _trl_advantages(rewards_per_func, weights, group_size, aggregation, scale_rewards):
    """A direct transcription of TRL 1.16 GRPOTrainer._generate_and_score_completions' advantage formulas."""
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
        if scale_rewards in ("group", "none"):
            std = _nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
        else:
            std = _nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        return advantages
    grouped = rewards_per_func.view(-1, group_size, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = _nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    std = _nanstd(rewards).expand_as(rewards)
    return (rewards - torch.nanmean(rewards)) / (std + 1e-4)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_aggregations_match_trl_in_float64(scale_rewards):
    generator = torch.Generator().manual_seed(11)
    group_size, groups = 4, 5
    table = torch.rand(group_size * groups, 3, generator=generator, dtype=torch.float64) * 3
    table[:, 2] = (table[:, 2] > 1.5).double()  # a 0/1 reward, like correctness
    table[4:8, 0] = 0.75  # a function constant within one group
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ours = normalize_then_sum(table, weights.tolist(), group_size)
    theirs = _trl_advantages(table, weights, group_size, "normalize_then_sum", scale_rewards)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    # sum_then_normalize: the weighted sum normalized by the loss (group_advantages), as before
    summed = (table * weights).sum(dim=1)
    ours, _ = group_advantages(summed, group_size, scale_rewards)
    theirs = _trl_advantages(table, weights, group_size, "sum_then_normalize", scale_rewards)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_constant_rewards_give_zero_advantages():
    table = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    assert torch.equal(normalize_then_sum(table, [1.0, 1.0], 2), torch.zeros(4, dtype=torch.float64))


def test_score_is_the_weighted_sum_of_the_reward_table():
    task = ArithmeticTask()
    examples = [task.make(3, "+", 4), task.make(10, "-", 2)]
    completions = ["7", "x8"]
    table = reward_table(task, completions, examples)
    assert table.shape == (2, len(task.reward_funcs)) and table.dtype == np.float32
    assert np.array_equal(score(task, completions, examples), weighted_sum(table, task.reward_weights))


def test_scored_batch_normalizes_each_lane_on_its_own():
    task = ArithmeticTask()
    config = GRPOConfig(num_generations=2, per_device_train_batch_size=4,
                        multi_objective_aggregation="normalize_then_sum")
    examples = [task.make(1, "+", 1)] * 2 + [task.make(2, "+", 2)] * 2
    texts = ["2", "x3", "4", "5"]
    prompts = torch.tensor([[5, 6]] * 2 + [[7, 8]] * 2)
    ids = torch.ones(4, 2, dtype=torch.long)
    one = scored_batch(config, task, texts, examples, prompts, torch.ones_like(prompts), ids, torch.ones_like(ids), "cpu")
    two = scored_batch(config, task, texts * 2, examples * 2, prompts.repeat(2, 1), torch.ones(8, 2, dtype=torch.long),
                       ids.repeat(2, 1), torch.ones(8, 2, dtype=torch.long), "cpu", lanes=2)
    expected = normalize_then_sum(torch.from_numpy(reward_table(task, texts, examples)), task.reward_weights, 2)
    assert torch.equal(one.advantages, expected) and torch.equal(two.advantages, expected.repeat(2))
    assert torch.equal(one.rewards, torch.from_numpy(score(task, texts, examples)))
    plain = scored_batch(dataclasses.replace(config, multi_objective_aggregation="sum_then_normalize"), task, texts,
                         examples, prompts, torch.ones_like(prompts), ids, torch.ones_like(ids), "cpu")
    assert plain.advantages is None  # the loss normalizes the summed rewards, as before


def test_normalize_then_sum_refuses_environment_tasks(tmp_path):
    from onelayer_fast.tasks.agent import AgentTask

    model, tokenizer = load_model("tiny")
    with pytest.raises(ValueError, match="multi_objective_aggregation 'normalize_then_sum' needs reward functions"):
        GRPOTrainer(model, tokenizer, AgentTask(), GRPOConfig(**TINY, multi_objective_aggregation="normalize_then_sum"),
                    RunSpec(output_dir=str(tmp_path), layer=1), progress=False)


# ------------------------------------------------------------------------------------ entropy control
def _trl_controller(entropies, coef, minimum, maximum, delta, target):
    """TRL's compute_loss: (applied coefficient, coefficient after the step) per optimizer step."""
    last, out = float("inf"), []
    for entropy in entropies:
        applied = coef if last <= target else 0.0
        if entropy <= target:
            coef = min(coef + delta, maximum)
        else:
            coef = max(coef - delta, minimum)
        last = entropy
        out.append((applied, coef))
    return out


def test_adaptive_entropy_follows_trl():
    entropies = [0.1, 0.3, 0.2, 0.05, 0.5, 0.5, 0.5, 0.1, 0.1]
    control = EntropyControl(coef=0.01, adaptive=True, minimum=0.0, maximum=0.02, delta=0.006, target=0.2)
    ours = []
    for entropy in entropies:
        applied = control.applied()
        control.update(entropy)
        ours.append((applied, control.coef))
    expected = _trl_controller(entropies, 0.01, 0.0, 0.02, 0.006, 0.2)
    assert len(ours) == len(expected)
    assert [x for pair in ours for x in pair] == pytest.approx([x for pair in expected for x in pair])
    static = EntropyControl(coef=0.03)
    static.update(5.0)
    assert static.applied() == 0.03 and static.coef == 0.03


def test_adaptive_entropy_in_an_update(tiny_model):
    """The first step applies no bonus (no entropy measured yet); the coefficient then moves each step, and
    the step's loss sees the coefficient of the end of the previous step."""
    model = tiny_model("qwen2").to(torch.float64)
    batch = _random_batch(model.config.vocab_size, torch.Generator().manual_seed(2))
    config = GRPOConfig(max_steps=1, num_iterations=3, use_adaptive_entropy=True, entropy_coef=0.1,
                        entropy_coef_delta=0.05, entropy_target=100.0, loss_backend="reference", layout="padded")
    policy = olf.OneLayerPolicy(model, layer=1)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    controls = config.step_controls(optimizer)
    seen = []
    original = controls.loss_config

    def spy(loss):
        seen.append(original(loss).entropy_coef)
        return original(loss)

    controls.loss_config = spy
    history = grpo_update(policy, optimizer, batch, config.update_config(), controls)
    assert seen == pytest.approx([0.0, 0.15, 0.2])
    assert [h["entropy_coef"] for h in history] == pytest.approx([0.15, 0.2, 0.25])
    assert all(0 < h["entropy"] < math.log(model.config.vocab_size) + 1e-9 for h in history)


def test_controller_entropy_is_the_losss_metric_or_the_subsets(tiny_model):
    """Measured without a bonus (taken by the controller itself) it equals the loss's own "entropy" metric; with
    top_entropy_quantile < 1 it is the mean over the kept high-entropy tokens, as TRL measures it."""
    from onelayer_fast.kernels.grpo_loss import high_entropy_mask
    from onelayer_fast.kernels.token_logprobs import token_logprobs_entropy_ref
    from onelayer_fast.update import controlled_entropy, prefix_cache

    model = tiny_model("qwen2").to(torch.float64)
    batch = _random_batch(model.config.vocab_size, torch.Generator().manual_seed(4))
    policy = olf.OneLayerPolicy(model, layer=1)
    update = UpdateConfig(loss=LossConfig(entropy_coef=0.01), loss_backend="reference", layout="padded")
    with torch.no_grad():
        states = policy.completion_states(prefix_cache(policy, batch, update))
        result = olf.grpo_loss(states, policy.lm_head_weight, batch.completion_ids, batch.completion_mask,
                               rewards=batch.rewards, group_size=3, config=update.loss, backend="reference")
    metric = float(result.metrics["entropy"])
    plain = LossConfig()
    assert controlled_entropy(states, policy.lm_head_weight, batch.completion_ids, batch.completion_mask, plain,
                              {}) == pytest.approx(metric, rel=1e-12)
    subset = LossConfig(top_entropy_quantile=0.3)
    _, entropies = token_logprobs_entropy_ref(states, policy.lm_head_weight, batch.completion_ids, 1.0)
    mask = batch.completion_mask.double() * high_entropy_mask(entropies, batch.completion_mask.double(), 0.3)
    expected = float((entropies * mask).sum() / mask.sum())
    assert expected > metric
    assert controlled_entropy(states, policy.lm_head_weight, batch.completion_ids, batch.completion_mask, subset,
                              {"entropy": metric}) == pytest.approx(expected, rel=1e-12)
