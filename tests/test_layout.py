"""Packed layouts (shared-prompt groups, padding-free packing) give the padded layout's loss and gradients.

The expected side is `grpo_update` with layout="padded" (itself checked against a plain HF model in
test_policy.py); the actual side the same update, same weights and rollouts, with a packed layout.
Every iteration's loss, KL, clip ratios and trained-layer gradients must agree to rel. error < 1e-5.
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast import layout as layouts, planner
from onelayer_fast.batch import RolloutBatch
from onelayer_fast.kernels.grpo_loss import LossConfig
from onelayer_fast.layout import PaddedLayout
from onelayer_fast.update import UpdateConfig, grpo_update, prefix_cache

# tiny tensors: one intra-op thread is faster and immune to a busy machine (see conftest)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

GROUP_SIZE = 3
PROMPT_LEN, COMPLETION_LEN = 7, 6
PROMPT_LENGTHS = [7, 2, 5]  # per group, left-padded; only the first fills the width
COMPLETION_LENGTHS = [6, 3, 0, 1, 6, 4, 2, 5, 6]  # row 2 fully masked, most rows cut short
REWARDS = [1.0, 0.0, 0.25, 0.5, 0.5, 0.5, 0.1, 0.9, 0.3]  # group 1 constant: zero advantages
LAYOUTS = ("packed", "shared_prompt")


def make_batch(vocab: int, prompt_lengths=PROMPT_LENGTHS, completion_lengths=COMPLETION_LENGTHS) -> RolloutBatch:
    groups = len(prompt_lengths)
    prompt_mask = (torch.arange(PROMPT_LEN) >= PROMPT_LEN - torch.tensor(prompt_lengths).unsqueeze(1)).long()
    prompt_ids = torch.randint(1, vocab, (groups, PROMPT_LEN)) * prompt_mask  # pad id 0 on the left
    rows = groups * GROUP_SIZE
    completion_mask = (torch.arange(COMPLETION_LEN) < torch.tensor(completion_lengths).unsqueeze(1)).long()
    completion_ids = torch.randint(1, vocab, (rows, COMPLETION_LEN)) * completion_mask
    return RolloutBatch(prompt_ids.repeat_interleave(GROUP_SIZE, 0), prompt_mask.repeat_interleave(GROUP_SIZE, 0),
                        completion_ids, completion_mask, torch.tensor(REWARDS[:rows]), group_size=GROUP_SIZE)


def update_config(layout: str = "auto", num_iterations: int = 2, beta: float = 0.04, epsilon: float = 0.1,
                  max_grad_norm: float | None = None, loss_type: str = "dapo") -> UpdateConfig:
    loss = LossConfig(beta=beta, epsilon_low=epsilon, epsilon_high=epsilon, loss_type=loss_type)
    return UpdateConfig(loss=loss, num_iterations=num_iterations, max_grad_norm=max_grad_norm, layout=layout)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps each step's gradients (after clipping): plain SGD moves the weights linearly in the
    gradient, so tiny float differences stay tiny in the next iteration (Adam's first step would not)."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.grads: list[list[torch.Tensor]] = []
        super().__init__(self.params, lr=lr)

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for p in self.params])
        return super().step(closure)


def run_update(model, layout: str, layer: int, mode: str = "single", **settings):
    policy = olf.OneLayerPolicy(model, layer=layer) if mode == "single" else olf.FullModelPolicy(model)
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    optimizer = RecordingSGD(policy.trainable_parameters(), lr=settings.pop("lr", 0.5))
    batch = settings.pop("batch")
    history = grpo_update(policy, optimizer, batch, update_config(layout, **settings))
    return history, names, optimizer.grads


def assert_updates_match(actual, expected, relative_error):
    (a_hist, a_names, a_grads), (e_hist, e_names, e_grads) = actual, expected
    assert a_names == e_names and len(a_hist) == len(e_hist) == len(a_grads) == len(e_grads)
    for it, (a, e) in enumerate(zip(a_hist, e_hist)):
        assert sorted(a) == sorted(e)
        for key in [k for k in ("loss", "kl", "grad_norm") if k in e]:
            err = relative_error(torch.tensor(a[key]), torch.tensor(e[key]))
            assert err < 1e-5, f"iteration {it} {key}: {a[key]!r} vs padded {e[key]!r} (rel err {err:.2e})"
        for key in e:  # clip ratios and advantage metrics: counts of tokens, equal up to float noise
            assert abs(a[key] - e[key]) <= 1e-5 * max(1.0, abs(e[key])), (it, key, a[key], e[key])
        errors = {n: relative_error(ga, ge) for n, ga, ge in zip(e_names, a_grads[it], e_grads[it])}
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, f"iteration {it}: worst gradient {worst} rel err {errors[worst]:.2e}"
        assert max(g.abs().max().item() for g in e_grads[it]) > 1e-4  # not trivially zero
    # the second iteration is off-policy: the ratios really moved (old log-probs are used)
    assert any(e_hist[1][k] > 0 for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"))


# --------------------------------------------------------------------------------------------------
# equivalence with the padded layout
# --------------------------------------------------------------------------------------------------
CASES = [
    ("qwen2", 1, "dapo", 0.04), ("qwen2", 0, "grpo", 0.0), ("qwen2", -1, "dr_grpo", 0.04),
    ("qwen3", 2, "dapo", 0.04), ("qwen3", 0, "bnpo", 0.04),
    ("llama", 1, "grpo", 0.04), ("llama", -1, "dapo", 0.0),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch, layer, loss_type, beta", CASES, ids=[f"{a}-l{l}-{t}-b{b}" for a, l, t, b in CASES])
def test_update_matches_padded(arch, layer, loss_type, beta, layout, tiny_model, relative_error):
    model = tiny_model(arch)
    batch = make_batch(model.config.vocab_size)
    settings = dict(batch=batch, loss_type=loss_type, beta=beta)
    expected = run_update(copy.deepcopy(model), "padded", layer, **settings)
    actual = run_update(copy.deepcopy(model), layout, layer, **settings)
    assert_updates_match(actual, expected, relative_error)
    if beta:
        assert expected[0][0]["kl"] == 0.0 and expected[0][1]["kl"] > 0  # the reference path really ran


def float64_norms(model):
    """Every RMSNorm of `model` computes weight * x / sqrt(mean(x^2) + eps) in the input's dtype."""
    def forward(norm, x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms
    for norm in norms:
        norm.forward = forward.__get__(norm)
    return model


@pytest.mark.parametrize("mode", ["single", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_layouts_equal_padded_to_1e9(layout, mode, tiny_model):
    """In float64 a layout is the padded computation up to summation order: the completion-predicting states
    (trained and reference), and the gradients of every trained weight under a fixed random loss on them,
    agree to 1e-9 relative. (The update-level tests above run the fp32 loss and hold it to 1e-5.)

    transformers' RMSNorm computes in float32 whatever the model's dtype; a shared prompt sums its G
    completions' gradients before that float32 backward, the padded layout after it, so with the stock norm
    the shared layout's gradients differ at float32 rounding (~1e-7). The norms run the same formula in
    float64 here, which leaves the layouts themselves as the only difference."""
    model = float64_norms(tiny_model("qwen2").double())
    batch = make_batch(model.config.vocab_size)
    keep = batch.completion_mask.bool()
    probe = torch.randn(*batch.completion_ids.shape, model.config.hidden_size, dtype=torch.float64)

    def states_and_grads(layout_name: str):
        policy = (olf.OneLayerPolicy(copy.deepcopy(model), layer=1) if mode == "single"
                  else olf.FullModelPolicy(copy.deepcopy(model)))
        cache = prefix_cache(policy, batch, UpdateConfig(layout=layout_name))
        states = policy.completion_states(cache)
        (states[keep] * probe[keep]).sum().backward()
        with torch.no_grad():
            reference = policy.completion_states(cache, reference=True)
        grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
        return states.detach()[keep], reference[keep], grads

    e_states, e_ref, e_grads = states_and_grads("padded")
    a_states, a_ref, a_grads = states_and_grads(layout)
    assert a_states.dtype == torch.float64 and sorted(a_grads) == sorted(e_grads)
    for name, got, want in [("states", a_states, e_states), ("reference states", a_ref, e_ref),
                            *[(n, a_grads[n], e_grads[n]) for n in e_grads]]:
        scale = want.abs().max().item()
        assert scale > 0, name
        assert (got - want).abs().max().item() <= 1e-9 * scale, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_model_matches_padded(layout, tiny_model, relative_error):
    model = tiny_model("qwen3")
    batch = make_batch(model.config.vocab_size)
    expected = run_update(copy.deepcopy(model), "padded", 0, mode="full", batch=batch, lr=0.05)
    actual = run_update(copy.deepcopy(model), layout, 0, mode="full", batch=batch, lr=0.05)
    assert_updates_match(actual, expected, relative_error)  # every parameter, embeddings and lm_head included


def test_sliding_window_layers_match_padded(tiny_model, relative_error):
    # Qwen2 with a sliding window shorter than the sequences: layers 1 and 2 mask by position distance
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in model.config.layer_types
    batch = make_batch(model.config.vocab_size)
    expected = run_update(copy.deepcopy(model), "padded", 1, batch=batch)
    for layout in LAYOUTS:
        assert_updates_match(run_update(copy.deepcopy(model), layout, 1, batch=batch), expected, relative_error)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_states_match_padded_and_masked_states_are_zero(layout, tiny_model, assert_close):
    model = tiny_model("llama")
    batch = make_batch(model.config.vocab_size)
    policy = olf.OneLayerPolicy(model, layer=1)
    padded_cache = policy.prefix_layout(PaddedLayout.of_batch(batch))
    padded = policy.completion_states(padded_cache)
    cache = prefix_cache(policy, batch, UpdateConfig(layout=layout))
    for reference in (False, True):
        packed = policy.completion_states(cache, reference=reference)
        keep = batch.completion_mask.bool()
        expected = policy.completion_states(padded_cache, reference=reference) if reference else padded
        assert packed.shape == expected.shape
        assert_close(packed[keep].detach(), expected[keep].detach(), rtol=1e-5, atol=1e-5, name=f"{layout} states")
        assert torch.equal(packed[~keep], torch.zeros_like(packed[~keep]))


# --------------------------------------------------------------------------------------------------
# the layout itself
# --------------------------------------------------------------------------------------------------
def test_shared_prompt_layout_structure():
    batch = make_batch(50)
    layout = layouts.build_layout(batch, "shared_prompt")
    # one row per group (each fits alone in the budget of the longest group)
    group_lengths = [PROMPT_LENGTHS[g] + sum(COMPLETION_LENGTHS[g * GROUP_SIZE:(g + 1) * GROUP_SIZE])
                     for g in range(len(PROMPT_LENGTHS))]
    assert layout.real_tokens == sum(group_lengths)
    assert layout.computed_tokens <= layout.input_ids.shape[0] * max(group_lengths)
    # group 0, row 0: prompt 0..6 then each completion continues at 7
    row = 0
    seg = layout.segment_ids[row]
    assert layout.position_ids[row, :7].tolist() == list(range(7))
    assert layout.position_ids[row, 7:13].tolist() == list(range(7, 13))  # completion 1 (6 tokens)
    assert layout.position_ids[row, 13:16].tolist() == [7, 8, 9]  # completion 2 (3 tokens); completion 3 is empty
    assert layout.branch_ids[row, :16].tolist() == [0] * 7 + [1] * 6 + [2] * 3
    assert (seg[:16] == seg[0]).all()
    allowed = layouts.allowed_pairs(layout)[row, 0]
    assert allowed[13, :7].all() and not allowed[13, 7:13].any() and allowed[13, 13]  # sees prompt, not sibling
    assert not allowed[:7, 7:].any()  # the prompt sees no completion
    stats = layouts.layout_stats(layout)
    assert stats["token_share"] == layout.computed_tokens / (9 * (PROMPT_LEN + COMPLETION_LEN))
    assert 0 < stats["allowed_pair_share"] < stats["attention_share"]


def test_packed_layout_structure():
    batch = make_batch(50)
    layout = layouts.build_layout(batch, "packed")
    lengths = [PROMPT_LENGTHS[r // GROUP_SIZE] + COMPLETION_LENGTHS[r] for r in range(9)]
    assert layout.real_tokens == sum(lengths)
    assert layout.input_ids.shape[1] <= PROMPT_LEN + COMPLETION_LEN
    assert int((layout.branch_ids != 0).sum()) == 0
    # positions restart at 0 in every segment
    starts = int((layout.position_ids[layout.token_mask.bool()] == 0).sum())
    assert starts == 9
    # every predicting state of a real completion token is a real token of the same segment
    flat_seg = layout.segment_ids.reshape(-1)
    assert (flat_seg[layout.state_index] >= 0).all()
    assert layout.state_index.numel() == sum(COMPLETION_LENGTHS)
    assert layouts.token_share(batch, "padded") == 1.0
    assert layouts.token_share(batch, "packed") == layout.computed_tokens / (9 * (PROMPT_LEN + COMPLETION_LEN))


def test_rows_are_the_planners_largest_first_plan():
    """Segments go into the fewest rows largest_first finds, rows in batch order, each within the budget."""
    batch = make_batch(50)
    lengths = [PROMPT_LENGTHS[r // GROUP_SIZE] + COMPLETION_LENGTHS[r] for r in range(9)]  # 13 10 7 3 8 6 7 10 11
    for budget in (None, 13, 20, 75):
        layout = layouts.build_layout(batch, "packed", token_budget=budget)
        rows = [sorted(set(r[r >= 0].tolist())) for r in layout.segment_ids]
        plan = planner.plan_microbatches(lengths, budget or PROMPT_LEN + COMPLETION_LEN, "largest_first")
        assert rows == sorted(plan, key=lambda r: r[0])
        assert layout.input_ids.shape[1] == max(sum(lengths[s] for s in r) for r in rows)
    assert layouts.build_layout(batch, "packed", token_budget=75).input_ids.shape == (1, sum(lengths))
    with pytest.raises(ValueError, match="smaller than the longest segment"):
        layouts.build_layout(batch, "packed", token_budget=12)


def random_batch(seed: int) -> tuple[RolloutBatch, int]:
    """A random batch (prompts left-padded, completions right-padded) of whole groups, one prompt per group; and
    its group size."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (), generator=gen))  # noqa: E731
    group_size, groups = draw(1, 4), draw(1, 5)
    prompt_width, completion_width = draw(1, 9), draw(0, 9)
    rows = groups * group_size
    prompt_lens = torch.randint(1, prompt_width + 1, (groups,), generator=gen).repeat_interleave(group_size)
    completion_lens = torch.randint(0, completion_width + 1, (rows,), generator=gen)
    prompt_mask = (torch.arange(prompt_width) >= prompt_width - prompt_lens[:, None]).long()
    completion_mask = (torch.arange(completion_width) < completion_lens[:, None]).long()
    prompt_ids = torch.randint(1, 100, (groups, prompt_width), generator=gen).repeat_interleave(group_size, 0)
    completion_ids = torch.randint(1, 100, (rows, completion_width), generator=gen)
    batch = RolloutBatch(prompt_ids * prompt_mask, prompt_mask, completion_ids * completion_mask, completion_mask,
                         rewards=torch.zeros(rows), group_size=group_size)
    return batch, group_size


def expected_real_tokens(batch, layout: str, group_size: int) -> list[int]:
    """The sorted token ids a layout computes: every real prompt (once per group when shared) and completion token."""
    prompts = batch.prompt_ids[batch.prompt_mask.bool()] if layout == "packed" else \
        batch.prompt_ids[::group_size][batch.prompt_mask[::group_size].bool()]
    return torch.cat([prompts, batch.completion_ids[batch.completion_mask.bool()]]).sort().values.tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_build_layout_is_unchanged_by_the_cpp_planner(layout, monkeypatch):
    """Every PackedLayout field is the same whether the indices come from the C++ op or its Python reference."""
    cases = [(make_batch(50), GROUP_SIZE, None), (make_batch(50), GROUP_SIZE, 40)]
    cases += [(*random_batch(seed), None) for seed in range(25)]
    expected = []
    with monkeypatch.context() as patch:
        patch.setattr(planner, "pack_layout", planner.pack_layout_ref)
        for batch, group_size, budget in cases:
            expected.append(layouts.build_layout(batch, layout, budget, pad_token_id=7))
    for (batch, group_size, budget), want in zip(cases, expected):
        got = layouts.build_layout(batch, layout, budget, pad_token_id=7)
        for field in dataclasses.fields(layouts.PackedLayout):
            a, e = getattr(got, field.name), getattr(want, field.name)
            if isinstance(e, torch.Tensor):
                assert a.dtype == e.dtype and a.shape == e.shape and torch.equal(a, e), field.name
            else:
                assert a == e, field.name
        # The tokens are the batch's: real ones where the token mask is 1, the pad id elsewhere.
        assert (got.input_ids[got.token_mask == 0] == 7).all()
        real = got.input_ids[got.token_mask == 1].sort().values.tolist()
        assert real == expected_real_tokens(batch, layout, group_size)


def test_build_layout_without_the_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "onelayer_fast._planner", None)  # the import of the extension fails
    with pytest.raises(ImportError, match=r"not built.*pip install -e \."):
        layouts.build_layout(make_batch(50), "packed")


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_layout_choice_is_validated(tiny_model):
    with pytest.raises(ValueError, match="layout must be one of"):
        UpdateConfig(layout="ragged")
    settings = UpdateConfig()
    object.__setattr__(settings, "layout", "ragged")  # past the frozen dataclass's own check
    with pytest.raises(ValueError, match="layout must be one of"):
        prefix_cache(olf.OneLayerPolicy(tiny_model("qwen2"), layer=1), make_batch(50), settings)
    from onelayer_fast.trainer import GRPOConfig
    assert GRPOConfig(layout="shared_prompt").layout == "shared_prompt"
    with pytest.raises(ValueError, match="layout must be one of"):
        GRPOConfig(layout="bogus")


def test_shared_prompt_needs_identical_prompts_per_group(tiny_model):
    """A batch states its prompt groups once, when it is made; a claim that does not hold is refused there,
    so no layout ever shares a prompt that differs."""
    batch = make_batch(50)
    mixed = batch.prompt_ids.clone()
    mixed[4, -1] += 1  # row 4 (group 1) differs from its siblings
    fields = dict(prompt_mask=batch.prompt_mask, completion_ids=batch.completion_ids,
                  completion_mask=batch.completion_mask, rewards=batch.rewards)
    with pytest.raises(ValueError, match=r"group 1 \(rows 3..5\) holds different prompts"):
        RolloutBatch(mixed, **fields, group_size=GROUP_SIZE)
    with pytest.raises(ValueError, match="whole groups"):
        RolloutBatch(batch.prompt_ids, **fields, group_size=2)
    ungrouped = RolloutBatch(mixed, **fields, advantages=torch.randn(9))  # rows without prompt groups
    with pytest.raises(ValueError, match="needs prompt groups"):
        layouts.build_layout(ungrouped, "shared_prompt")
    layouts.build_layout(ungrouped, "packed")  # no sharing needed


def test_unsupported_inputs_are_clear_errors(tiny_model):
    batch = make_batch(50)
    right_padded = copy.copy(batch)
    right_padded.prompt_mask = batch.prompt_mask.flip(1)
    with pytest.raises(ValueError, match="left-padded prompts"):
        layouts.build_layout(right_padded, "packed")
    holes = copy.copy(batch)
    holes.completion_mask = batch.completion_mask.clone()
    holes.completion_mask[0, 2] = 0
    with pytest.raises(ValueError, match="1 up to and including EOS"):
        layouts.build_layout(holes, "packed")
    model = tiny_model("qwen2")
    policy = olf.OneLayerPolicy(model, layer=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="sdpa"):
        prefix_cache(policy, batch, UpdateConfig(layout="packed"))


def test_eager_attention_matches_padded(tiny_model, relative_error):
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")  # eager adds the mask to the scores: an additive float mask
    assert model.config._attn_implementation == "eager"
    batch = make_batch(model.config.vocab_size)
    expected = run_update(copy.deepcopy(model), "padded", 1, batch=batch)
    for layout in LAYOUTS:
        assert_updates_match(run_update(copy.deepcopy(model), layout, 1, batch=batch), expected, relative_error)
    policy = olf.OneLayerPolicy(model, layer=1)
    cache = prefix_cache(policy, batch, UpdateConfig(layout="shared_prompt"))
    assert cache.masks["full_attention"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------
def test_trainer_shared_prompt_matches_padded(tmp_path):
    from onelayer_fast.models import load_model
    from onelayer_fast.tasks.arithmetic import ArithmeticTask
    from onelayer_fast.trainer import GRPOConfig, GRPOTrainer, RunSpec

    def losses(layout: str) -> list[dict[str, float]]:
        torch.manual_seed(0)
        model, tokenizer = load_model("tiny")
        config = GRPOConfig(max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                            learning_rate=1e-2, num_iterations=2, beta=0.04, layout=layout)
        run = RunSpec(output_dir=str(tmp_path / layout), layer=1, save_steps=100)
        return GRPOTrainer(model, tokenizer, ArithmeticTask(), config, run).train()

    padded, shared = losses("padded"), losses("shared_prompt")
    assert len(padded) == len(shared) == 2
    for step, (a, e) in enumerate(zip(shared, padded)):
        assert a["completion_length"] == e["completion_length"] and a["reward_mean"] == e["reward_mean"], step
        for key in ("loss", "kl"):
            assert abs(a[key] - e[key]) <= 1e-5 * max(abs(e[key]), 1e-8), (step, key, a[key], e[key])


# --------------------------------------------------------------------------------------------------
# layout "auto"
# --------------------------------------------------------------------------------------------------
def test_auto_layout_picks_shared_prompt_only_where_it_applies(tiny_model):
    config, cpu = tiny_model("qwen2").config, torch.device("cpu")
    batch = make_batch(50)
    assert layouts.resolve_layout("auto", batch, config, cpu) == "shared_prompt"
    assert layouts.resolve_layout("packed", batch, config, cpu) == "packed"  # explicit wins
    assert layouts.resolve_layout("auto", batch, config, torch.device("cuda")) == "padded"
    episodes = RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                            batch.rewards, advantages=torch.randn(batch.rewards.shape))  # multi-turn rows: no groups
    assert layouts.resolve_layout("auto", episodes, config, cpu) == "padded"
    right_padded = RolloutBatch(batch.prompt_ids.flip(1), batch.prompt_mask.flip(1), batch.completion_ids,
                                batch.completion_mask, batch.rewards, group_size=GROUP_SIZE)  # cannot be packed
    assert layouts.resolve_layout("auto", right_padded, config, cpu) == "padded"
    flash = copy.copy(config)
    flash._attn_implementation = "flash_attention_2"
    assert layouts.resolve_layout("auto", batch, flash, cpu) == "padded"
    with pytest.raises(ValueError, match="layout must be one of"):
        layouts.resolve_layout("ragged", batch, config, cpu)


def test_default_update_runs_the_auto_layout_with_the_padded_result(tiny_model, monkeypatch, relative_error):
    """UpdateConfig() defaults to "auto"; on CPU it plans a shared-prompt layout, and the update it runs
    gives the padded layout's losses and gradients."""
    assert UpdateConfig().layout == "auto"
    model = tiny_model("qwen2")
    batch = make_batch(model.config.vocab_size)
    planned = []
    build = layouts.build_layout
    monkeypatch.setattr(layouts, "build_layout",
                        lambda b, layout, **kw: planned.append(layout) or build(b, layout, **kw))
    auto = run_update(copy.deepcopy(model), "auto", layer=1, batch=batch)
    padded = run_update(copy.deepcopy(model), "padded", layer=1, batch=batch)
    assert planned == ["shared_prompt"]
    assert_updates_match(auto, padded, relative_error)
