"""Lanes: a lane trained inside a many-lane batch gets exactly the update of its layer trained alone.

The expected side is the plain single-layer path (OneLayerPolicy + grpo_update, itself held to a plain HF
model in test_policy.py) on the lane's own rollouts; the actual side is LanePolicy + lanes_update over the
rows of every lane at once. Loss, metrics, gradients and updated weights must agree: to rel 1e-10 in
float64 (the "reference" loss backend, which keeps float64), to rel 1e-5 in float32.
"""
from __future__ import annotations

import copy

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast.batch import RolloutBatch
from onelayer_fast.kernels.grpo_loss import LossConfig
from onelayer_fast.lanes import Lane, LanePolicy, lane_rows, resolve_lanes, stack_batches
from onelayer_fast import rollout as olf_rollout
from onelayer_fast.update import UpdateConfig, grpo_update, lanes_update

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GROUP_SIZE = 3
GROUPS = 2


def make_batch(vocab: int, generator: torch.Generator, prompt_width: int, completion_width: int) -> RolloutBatch:
    """Random rollouts: left-padded prompts of random lengths, completions cut at random lengths."""
    rows = GROUPS * GROUP_SIZE
    prompt_lengths = torch.randint(1, prompt_width + 1, (GROUPS, 1), generator=generator)
    prompt_mask = (torch.arange(prompt_width) >= prompt_width - prompt_lengths).long()
    prompt_ids = torch.randint(1, vocab, (GROUPS, prompt_width), generator=generator) * prompt_mask
    completion_lengths = torch.randint(0, completion_width + 1, (rows, 1), generator=generator)
    completion_lengths[0] = completion_width  # the widest row fills the width
    completion_mask = (torch.arange(completion_width) < completion_lengths).long()
    completion_ids = torch.randint(1, vocab, (rows, completion_width), generator=generator) * completion_mask
    rewards = torch.rand(rows, generator=generator, dtype=torch.float64).float()
    return RolloutBatch(prompt_ids.repeat_interleave(GROUP_SIZE, 0), prompt_mask.repeat_interleave(GROUP_SIZE, 0),
                        completion_ids, completion_mask, rewards, group_size=GROUP_SIZE)


def config(layout: str, beta: float, backend: str) -> UpdateConfig:
    loss = LossConfig(beta=beta, epsilon_low=0.1, epsilon_high=0.1, loss_type="dapo")
    return UpdateConfig(loss=loss, num_iterations=2, max_grad_norm=0.5, loss_backend=backend, layout=layout)


def optimizer_for(params, lr: float) -> torch.optim.Optimizer:
    """AdamW in float64. In float32, SGD with momentum: Adam divides each gradient component by its own
    magnitude, so float32 noise in a near-zero component becomes a visible step, and the next iteration's
    gradients inherit it; SGD moves the weights linearly in the gradient, so equal gradients stay equal."""
    params = list(params)
    if params[0].dtype == torch.float64:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr * 1000, momentum=0.9)


class Recorder:
    """The gradients of `params` at every optimizer step (after clipping)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params):
        self.params, self.grads = list(params), []
        optimizer.register_step_pre_hook(lambda *_: self.grads.append([p.grad.detach().clone() for p in self.params]))


def run_alone(model, lane: Lane, batch: RolloutBatch, update: UpdateConfig, lr: float):
    policy = olf.OneLayerPolicy(model, layer=lane.layer)
    optimizer = optimizer_for(policy.trainable_parameters(), lane.learning_rate or lr)
    recorder = Recorder(optimizer, policy.trainable_parameters())
    history = grpo_update(policy, optimizer, batch, update)
    return history, recorder.grads, [p.detach().clone() for p in policy.trainable_parameters()]


def run_lanes(model, lanes: list[Lane], batches: dict[Lane, RolloutBatch], update: UpdateConfig, lr: float):
    policy = LanePolicy(model, lanes)
    optimizers = [optimizer_for(policy.trainable_parameters(k), lane.learning_rate or lr) for k, lane in enumerate(policy.lanes)]
    recorders = [Recorder(o, policy.trainable_parameters(k)) for k, o in enumerate(optimizers)]
    batch = stack_batches([batches[lane] for lane in policy.lanes])
    history = lanes_update(policy, optimizers, batch, update)
    weights = [[p.detach().clone() for p in policy.trainable_parameters(k)] for k in range(policy.num_lanes)]
    return {lane: (history[k], recorders[k].grads, weights[k]) for k, lane in enumerate(policy.lanes)}


def lane_set(num_layers: int) -> list[Lane]:
    """First and last layer, and two lanes on one middle layer with different learning rates."""
    middle = num_layers // 2
    return [Lane(middle, learning_rate=3e-5), Lane(0), Lane(-1), Lane(middle, learning_rate=3e-4)]


CASES = [("qwen2", "padded", 0.04), ("qwen2", "packed", 0.0), ("qwen2", "shared_prompt", 0.04),
         ("qwen3", "padded", 0.0), ("qwen3", "shared_prompt", 0.04), ("qwen3", "packed", 0.04),
         ("llama", "padded", 0.04), ("llama", "packed", 0.04), ("llama", "shared_prompt", 0.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("arch, layout, beta", CASES, ids=[f"{a}-{l}-b{b}" for a, l, b in CASES])
def test_lane_update_equals_alone(arch, layout, beta, dtype, tiny_model, relative_error):
    model = tiny_model(arch).to(dtype)
    num_layers = model.config.num_hidden_layers
    lanes = resolve_lanes(lane_set(num_layers), num_layers)
    generator = torch.Generator().manual_seed(7)
    # Each lane its own rollouts, of different widths: the lane batch pads them to common widths.
    batches = {lane: make_batch(model.config.vocab_size, generator, 4 + k, 3 + 2 * k) for k, lane in enumerate(lanes)}
    update = config(layout, beta, "reference" if dtype == torch.float64 else "chunked")
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    lr = 1e-4
    together = run_lanes(copy.deepcopy(model), lanes, batches, update, lr)
    for lane in lanes:
        e_hist, e_grads, e_weights = run_alone(copy.deepcopy(model), lane, batches[lane], update, lr)
        a_hist, a_grads, a_weights = together[lane]
        assert len(a_hist) == len(e_hist) == 2
        for it, (a, e) in enumerate(zip(a_hist, e_hist)):
            assert sorted(a) == sorted(e)
            for key in e:
                assert abs(a[key] - e[key]) <= tolerance * max(1.0, abs(e[key])), (lane, it, key, a[key], e[key])
            for ga, ge in zip(a_grads[it], e_grads[it]):
                assert relative_error(ga, ge) < tolerance, (lane, it)
            assert max(g.abs().max().item() for g in e_grads[it]) > 1e-5  # not trivially zero
        for wa, we in zip(a_weights, e_weights):
            assert relative_error(wa, we) < tolerance, lane
    # the two lanes on one layer moved differently (their learning rates differ)
    middle = [lane for lane in lanes if lane.layer == num_layers // 2]
    assert not torch.equal(together[middle[0]][2][0], together[middle[1]][2][0])


def test_reference_suffix_is_the_shared_original(tiny_model, assert_close):
    model = tiny_model("qwen3").double()
    original = copy.deepcopy(model)
    policy = LanePolicy(model, [Lane(1), Lane(3)])
    with torch.no_grad():
        for k in range(policy.num_lanes):
            for p in policy.trainable_parameters(k):
                p.add_(0.1)  # the lanes' copies moved; the shared model must not
    generator = torch.Generator().manual_seed(0)
    batches = [make_batch(model.config.vocab_size, generator, 5, 4) for _ in policy.lanes]
    batch = stack_batches(batches)
    cache = policy.prefix_lanes(batch, "padded")
    reference = policy.completion_states(cache, reference=True)
    trained = policy.completion_states(cache)
    plain = olf.OneLayerPolicy(original, layer=1)
    rows = batches[0].batch_size
    for k in range(policy.num_lanes):
        alone = plain.completion_states(plain.prefix_layout(olf.PaddedLayout.of_batch(lane_rows(batch, k, rows))))
        assert_close(reference[k * rows:(k + 1) * rows], alone, rtol=1e-10, atol=1e-12)
        assert (trained[k * rows:(k + 1) * rows] - alone).abs().max() > 1e-3
    for p, q in zip(model.parameters(), original.parameters()):
        assert torch.equal(p, q)


def test_bad_lanes(tiny_model):
    model = tiny_model("qwen2")  # 3 layers
    with pytest.raises(ValueError, match="at least one lane"):
        LanePolicy(model, [])
    with pytest.raises(ValueError, match="out of range"):
        LanePolicy(model, [Lane(3)])
    with pytest.raises(ValueError, match="out of range"):
        LanePolicy(model, [Lane(-4)])
    with pytest.raises(ValueError, match="duplicate lane"):
        LanePolicy(model, [Lane(1), Lane(-2)])  # -2 is layer 1 of 3
    with pytest.raises(ValueError, match="integer"):
        LanePolicy(model, [Lane(1.0)])
    with pytest.raises(ValueError, match="learning_rate"):
        LanePolicy(model, [Lane(1, learning_rate=0.0)])
    policy = LanePolicy(model, [Lane(0), Lane(1), Lane(2)])
    generator = torch.Generator().manual_seed(0)
    two_groups = make_batch(model.config.vocab_size, generator, 4, 3)
    with pytest.raises(ValueError, match="same number of whole prompt groups"):
        policy.prefix_lanes(stack_batches([two_groups, two_groups]), "padded")  # 4 groups for 3 lanes


def test_lane_order_is_deepest_first(tiny_model):
    policy = LanePolicy(tiny_model("qwen3"), [Lane(1), Lane(3), Lane(0), Lane(3, learning_rate=1e-3)])
    assert [lane.layer for lane in policy.lanes] == [3, 3, 1, 0]
    assert list(policy.lanes_at(3)) == [0, 1] and list(policy.lanes_at(2)) == [] and policy.lanes_above(0) == 3


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def perturbed_lanes(model, lanes: list[Lane], scale: float = 0.05) -> LanePolicy:
    """A LanePolicy whose lanes' layers have moved away from the shared originals (as after training)."""
    policy = LanePolicy(model, lanes)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k in range(policy.num_lanes):
            for p in policy.trainable_parameters(k):
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
    return policy


def lane_prompts(vocab: int, lanes: int, groups: int, group_size: int, generator: torch.Generator):
    """Left-padded prompts, `groups` per lane, each repeated group_size times; lanes get different prompts."""
    width = 6
    lengths = torch.randint(1, width + 1, (lanes * groups, 1), generator=generator)
    mask = (torch.arange(width) >= width - lengths).long()
    ids = torch.randint(3, vocab, (lanes * groups, width), generator=generator) * mask
    return ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generation_in_lanes_equals_alone(arch, sampled, tiny_model):
    model = tiny_model(arch).double()
    layers = model.config.num_hidden_layers
    policy = perturbed_lanes(model, [Lane(1), Lane(0), Lane(layers - 1), Lane(1, learning_rate=1e-3)])
    group_size, groups = 3, 2
    generator = torch.Generator().manual_seed(11)
    ids, mask = lane_prompts(model.config.vocab_size, policy.num_lanes, groups, group_size, generator)
    seeds = (5, 6, 7, 8)
    kwargs = dict(max_new_tokens=7, eos_token_id=1, pad_token_id=0, temperature=0.9, top_p=0.95, group_size=group_size)
    keys = olf_rollout.DrawKeys(seeds, step=4) if sampled else None
    together, together_mask = olf_rollout.generate_lanes(policy, ids, mask, keys=keys, **kwargs)
    rows = groups * group_size
    distinct = set()
    for k in range(policy.num_lanes):
        own = slice(k * rows, (k + 1) * rows)
        alone_keys = olf_rollout.DrawKeys((seeds[k],), step=4) if sampled else None
        alone, alone_mask = olf_rollout.generate_lanes(policy.subset([k]), ids[own], mask[own], keys=alone_keys, **kwargs)
        width = alone.shape[1]
        assert torch.equal(together_mask[own, :width], alone_mask) and not together_mask[own, width:].any()
        assert torch.equal(together[own, :width], alone), k
        distinct.add(tuple(alone.flatten().tolist()))
    assert len(distinct) == policy.num_lanes  # the lanes really generate different tokens


@pytest.mark.parametrize("sampled", [False, True])
def test_generation_in_lanes_equals_alone_when_rows_finish_early(sampled, tiny_model):
    """Rows that sample EOS leave the lane batch (and its KV caches) at once: with an EOS that is frequent,
    rows and whole lanes finish at different steps, and every lane still gets exactly its tokens alone."""
    model = tiny_model("qwen2").double()
    layers = model.config.num_hidden_layers
    policy = perturbed_lanes(model, [Lane(1), Lane(0), Lane(layers - 1), Lane(1, learning_rate=1e-3)])
    group_size, groups, new_tokens = 3, 2, 9
    ids, mask = lane_prompts(model.config.vocab_size, policy.num_lanes, groups, group_size,
                             torch.Generator().manual_seed(12))
    seeds = (5, 6, 7, 8)
    keys = (lambda s: olf_rollout.DrawKeys(s, step=2)) if sampled else (lambda s: None)
    kwargs = dict(max_new_tokens=new_tokens, pad_token_id=0, temperature=1.5, group_size=group_size)
    # EOS: the token the lanes emit most when nothing stops them, so that many rows stop early
    free, _ = olf_rollout.generate_lanes(policy, ids, mask, keys=keys(seeds), eos_token_id=-1, **kwargs)
    eos = int(free.flatten().mode().values)
    together, together_mask = olf_rollout.generate_lanes(policy, ids, mask, keys=keys(seeds), eos_token_id=eos, **kwargs)
    lengths = together_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3 and int(lengths.min()) < together.shape[1]  # rows stop at different steps
    rows = groups * group_size
    for k in range(policy.num_lanes):
        own = slice(k * rows, (k + 1) * rows)
        alone, alone_mask = olf_rollout.generate_lanes(policy.subset([k]), ids[own], mask[own], keys=keys((seeds[k],)),
                                                       eos_token_id=eos, **kwargs)
        width = alone.shape[1]
        assert torch.equal(together_mask[own, :width], alone_mask) and not together_mask[own, width:].any()
        assert torch.equal(together[own, :width], alone), k


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_lane_greedy_generation_matches_hf_generate(arch, tiny_model):
    """A lane alone decodes greedily as HF generate does on the model with the lane's layer put in."""
    model = tiny_model(arch).double()
    policy = perturbed_lanes(model, [Lane(1)])
    generator = torch.Generator().manual_seed(2)
    ids, mask = lane_prompts(model.config.vocab_size, 1, 4, 1, generator)
    ours, ours_mask = olf_rollout.generate_lanes(policy, ids, mask, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    edited = copy.deepcopy(model)
    edited.model.layers[1].load_state_dict(policy.lane_layers[0].state_dict())
    theirs, theirs_mask = olf_rollout.sample_completions(edited, ids, mask, 6, eos_token_id=1, pad_token_id=0, do_sample=False)
    width = ours.shape[1]
    assert torch.equal(ours, theirs[:, :width]) and torch.equal(ours_mask, theirs_mask[:, :width])
    assert not theirs_mask[:, width:].any()


def test_sampling_follows_seed_and_step(tiny_model):
    model = tiny_model("qwen3").double()
    policy = perturbed_lanes(model, [Lane(2)])
    ids, mask = lane_prompts(model.config.vocab_size, 1, 2, 4, torch.Generator().manual_seed(0))
    draw = lambda seed, step: olf_rollout.generate_lanes(  # noqa: E731
        policy, ids, mask, 8, eos_token_id=1, pad_token_id=0, keys=olf_rollout.DrawKeys((seed,), step), group_size=4)[0]
    assert torch.equal(draw(1, 0), draw(1, 0))
    assert not torch.equal(draw(1, 0), draw(2, 0)) and not torch.equal(draw(1, 0), draw(1, 1))
    tokens = draw(1, 0)
    assert len({tuple(r) for r in tokens.tolist()}) > 1  # rows of one group differ
