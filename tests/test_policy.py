"""OneLayerPolicy: cached prefix + suffix + olf.grpo_loss give the plain HF model's gradients.

The expected side is an untouched deepcopy of the model run the ordinary way (full forward, logits
materialized, log_softmax + gather) with the GRPO loss written out here from the TRL formulas; nothing
from `kernels/grpo_loss.py` is used for it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import onelayer_fast as olf

# tiny tensors: one intra-op thread is faster and immune to a busy machine (see conftest)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

STD_EPS = 1e-4
EPS_LOW, EPS_HIGH = 0.2, 0.2
GROUP_SIZE = 2
PROMPT_LEN, COMPLETION_LEN = 5, 6
PROMPT_LENGTHS = [5, 3, 4, 2, 5, 1]  # left-padded, all different from the longest
COMPLETION_LENGTHS = [6, 3, 0, 6, 1, 5]  # row 2 fully masked, rows 1, 4, 5 cut short


# --------------------------------------------------------------------------------------------------
# inputs and the plain-HF reference
# --------------------------------------------------------------------------------------------------
def make_batch(vocab: int):
    batch = len(PROMPT_LENGTHS)
    prompt_mask = (torch.arange(PROMPT_LEN).unsqueeze(0) >= PROMPT_LEN - torch.tensor(PROMPT_LENGTHS).unsqueeze(1)).long()
    prompt_ids = torch.randint(1, vocab, (batch, PROMPT_LEN)) * prompt_mask  # pad id 0 on the left
    completion_mask = (torch.arange(COMPLETION_LEN).unsqueeze(0) < torch.tensor(COMPLETION_LENGTHS).unsqueeze(1)).long()
    completion_ids = torch.randint(0, vocab, (batch, COMPLETION_LEN))
    # three groups of two: two with signal, the last one constant (zero std -> zero advantages)
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.75, 0.5, 0.5])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return input_ids, attention_mask, completion_ids, completion_mask, rewards


def hf_logps(model: nn.Module, input_ids, attention_mask, completion_ids, temperature: float = 1.0):
    """Plain HF: full forward, materialized logits, log_softmax, gather the completion tokens."""
    logits = model(input_ids, attention_mask=attention_mask,
                   position_ids=olf.position_ids_from_mask(attention_mask)).logits
    logits = logits[:, PROMPT_LEN - 1 : -1].float() / temperature  # position p predicts token p + 1
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def trl_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    adv = (rewards - mean) / (std + STD_EPS)
    return torch.where(std == 0, torch.zeros_like(adv), adv)


def trl_loss(logps, old_logps, ref_logps, advantages, mask, beta, loss_type):
    """TRL GRPOTrainer._compute_loss (1.16, default use_bias_correction_kl=True), token-level importance sampling,
    float32 as in training."""
    m = mask.float()
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    a = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if beta != 0.0:
        d = ref_logps - logps
        per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1) * coef_1
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (mask.shape[0] * mask.shape[1])
    raise AssertionError(loss_type)


def perturbed_old_logps(true_logps, spread=0.5, gap=2e-3):
    """old = true - d with d in [-spread, spread], kept away from the clip boundaries by `gap`."""
    d = (torch.rand(true_logps.shape) * 2 - 1) * spread
    for b in (math.log(1 - EPS_LOW), math.log(1 + EPS_HIGH)):
        near = (d - b).abs() < gap
        d = torch.where(near, b + 2 * gap * torch.sign(d - b + 1e-12), d)
    return true_logps - d


def perturbed_model(model: nn.Module, scale: float = 0.02) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def resolve_layer(name: str, num_layers: int) -> int:
    return {"first": 0, "middle": num_layers // 2, "last": -1}[name]


# --------------------------------------------------------------------------------------------------
# gradient equivalence
# --------------------------------------------------------------------------------------------------
def _equivalence_cases():
    cases = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, 0.04):
            for layer in ("first", "middle", "last"):
                cases.append(pytest.param("qwen2", loss_type, beta, layer, 1.0, id=f"qwen2-{loss_type}-beta{beta}-{layer}"))
    # fewer for the other architectures, but every loss type, beta and layer position appears
    for arch, picks in {
        "qwen3": [("grpo", 0.04, "first", 0.7), ("bnpo", 0.0, "middle", 1.0), ("dr_grpo", 0.04, "last", 1.0),
                  ("dapo", 0.0, "last", 0.7), ("grpo", 0.0, "middle", 1.0)],
        "llama": [("dapo", 0.04, "first", 1.0), ("grpo", 0.0, "last", 0.7), ("dr_grpo", 0.0, "middle", 1.0),
                  ("bnpo", 0.04, "last", 1.0), ("dapo", 0.04, "middle", 0.7)],
    }.items():
        for loss_type, beta, layer, temperature in picks:
            cases.append(pytest.param(arch, loss_type, beta, layer, temperature,
                                      id=f"{arch}-{loss_type}-beta{beta}-{layer}-t{temperature}"))
    return cases


@pytest.mark.parametrize("arch, loss_type, beta, layer_name, temperature", _equivalence_cases())
def test_gradients_match_plain_hf_model(arch, loss_type, beta, layer_name, temperature, tiny_model, assert_close,
                                        relative_error):
    model = tiny_model(arch)
    num_layers = model.config.num_hidden_layers
    layer = resolve_layer(layer_name, num_layers)
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_batch(model.config.vocab_size)

    untouched = copy.deepcopy(model)
    with torch.no_grad():
        true_logps = hf_logps(untouched, input_ids, attention_mask, completion_ids, temperature)
        ref_logps = hf_logps(perturbed_model(untouched), input_ids, attention_mask, completion_ids, temperature) if beta else None
    old_logps = perturbed_old_logps(true_logps)

    # expected: plain HF model, only the target layer trains, loss written out from the TRL formulas
    hf = copy.deepcopy(untouched).requires_grad_(False)
    hf_layer = hf.model.layers[layer]
    hf_layer.requires_grad_(True)
    logps = hf_logps(hf, input_ids, attention_mask, completion_ids, temperature)
    assert_close(logps.detach(), true_logps, rtol=0, atol=0, name="hf logps (deterministic)")
    expected_loss = trl_loss(logps, old_logps, ref_logps, trl_advantages(rewards, GROUP_SIZE), completion_mask, beta, loss_type)
    expected_loss.backward()
    expected = {n: p.grad for n, p in hf_layer.named_parameters()}

    # actual: cached prefix, suffix, chunked GRPO loss
    policy = olf.OneLayerPolicy(model, layer=layer)
    cache = policy.prefix(input_ids, attention_mask)
    states = policy.suffix(cache)[:, PROMPT_LEN - 1 : -1]
    result = olf.grpo_loss(
        states, policy.lm_head_weight, completion_ids, completion_mask, rewards=rewards, group_size=GROUP_SIZE,
        old_logps=old_logps, ref_logps=ref_logps, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        loss_type=loss_type, temperature=temperature,
    )
    loss, metrics = result.loss, result.metrics
    loss.backward()

    # the case is not degenerate: tokens really are clipped on both sides
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert_close(result.token_logps, true_logps * completion_mask, rtol=1e-5, atol=1e-5, name="token_logps")
    err = relative_error(loss.detach(), expected_loss.detach())
    assert err < 1e-5, f"loss {loss.item()!r} vs expected {expected_loss.item()!r}: rel err {err:.2e}"

    actual = {n: p.grad for n, p in policy.target_layer.named_parameters()}
    assert sorted(actual) == sorted(expected) and actual
    errors = {}
    for name, exp_grad in expected.items():
        assert exp_grad is not None, name
        assert actual[name] is not None, f"{name}: no gradient through the policy"
        errors[name] = relative_error(actual[name], exp_grad)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"worst parameter gradient {worst}: rel err {errors[worst]:.2e} ({errors})"
    # the gradient is not trivially zero
    assert max(g.abs().max().item() for g in expected.values()) > 1e-4
    # nothing outside the target layer received a gradient
    for name, p in policy.model.named_parameters():
        if not name.startswith(f"model.layers.{policy.layer_index}."):
            assert p.grad is None, name


# --------------------------------------------------------------------------------------------------
# the reference suffix after training
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, layer", [("qwen2", 1), ("qwen3", -2), ("llama", 0)])
def test_reference_suffix_is_the_original_model_after_training(arch, layer, tiny_model, assert_close):
    model = tiny_model(arch)
    untouched = copy.deepcopy(model)
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_batch(model.config.vocab_size)
    with torch.no_grad():
        original_logps = hf_logps(untouched, input_ids, attention_mask, completion_ids)
        ref_logps = original_logps.clone()

    policy = olf.OneLayerPolicy(model, layer=layer)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    cache = policy.prefix(input_ids, attention_mask)
    for _ in range(4):
        states = policy.suffix(cache)[:, PROMPT_LEN - 1 : -1]
        loss = olf.grpo_loss(states, policy.lm_head_weight, completion_ids, completion_mask, rewards=rewards,
                                group_size=GROUP_SIZE, ref_logps=ref_logps, beta=0.04).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    keep = completion_mask.bool()
    with torch.no_grad():
        policy_logps = olf.token_logprobs(policy.suffix(cache)[:, PROMPT_LEN - 1 : -1], policy.lm_head_weight, completion_ids)
        reference_logps = olf.token_logprobs(policy.suffix(cache, reference=True)[:, PROMPT_LEN - 1 : -1],
                                             policy.lm_head_weight, completion_ids)
        trained_hf_logps = hf_logps(model, input_ids, attention_mask, completion_ids)
    # the policy really moved away from the original model
    drift = (policy_logps - original_logps)[keep].abs().max().item()
    assert drift > 0.05, f"policy barely changed (max |delta logp| = {drift:.2e})"
    # ... while the reference suffix still is the original model
    assert_close(reference_logps[keep], original_logps[keep], rtol=1e-5, atol=1e-5, name="reference logps")
    # ... and the trained suffix is the trained model run the ordinary way
    assert_close(policy_logps[keep], trained_hf_logps[keep], rtol=1e-5, atol=1e-5, name="trained logps")
    # everything but the target layer is bit-for-bit unchanged and has no gradient
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
            assert p.grad is None, name
    reference_params = dict(policy.reference_layer.named_parameters())
    for name, p in untouched.model.layers[policy.layer_index].named_parameters():
        assert torch.equal(reference_params[name], p), name
        assert not reference_params[name].requires_grad and reference_params[name].grad is None
    assert any(not torch.equal(p, reference_params[n]) for n, p in policy.target_layer.named_parameters())


# --------------------------------------------------------------------------------------------------
# what trains, and the cached prefix
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_only_target_layer_trains(arch, tiny_model):
    model = tiny_model(arch)
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    embed_before = model.model.embed_tokens.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    policy = olf.OneLayerPolicy(model, layer=1)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("model.layers.1.") for n in trainable), trainable
    assert trainable == sorted(f"model.layers.1.{n}" for n, _ in model.model.layers[1].named_parameters())
    assert sorted(policy.trainable_parameter_names) == trainable
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in model.model.layers[1].parameters()}
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert policy.lm_head_weight is model.lm_head.weight
    assert not any(p.requires_grad for p in policy.reference_layer.parameters())

    # one training step: lm_head and embeddings are untouched, tied or not
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    states = policy.suffix(policy.prefix(input_ids, attention_mask))[:, PROMPT_LEN - 1 : -1]
    loss = olf.grpo_loss(states, policy.lm_head_weight, completion_ids, completion_mask, rewards=rewards,
                            group_size=GROUP_SIZE).loss
    loss.backward()
    optimizer.step()
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert torch.equal(model.lm_head.weight, head_before)
    assert all(p.grad is not None for p in policy.trainable_parameters())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_negative_layer_index(arch, tiny_model, assert_close):
    model = tiny_model(arch)
    num_layers = model.config.num_hidden_layers
    input_ids, attention_mask, *_ = make_batch(model.config.vocab_size)
    for negative in range(-num_layers, 0):
        positive = negative + num_layers
        neg_policy = olf.OneLayerPolicy(copy.deepcopy(model), layer=negative)
        pos_policy = olf.OneLayerPolicy(copy.deepcopy(model), layer=positive)
        assert neg_policy.layer_index == positive
        assert neg_policy.target_layer is neg_policy.model.model.layers[positive]
        assert neg_policy.trainable_parameter_names == pos_policy.trainable_parameter_names
        h_neg = neg_policy.suffix(neg_policy.prefix(input_ids, attention_mask))
        h_pos = pos_policy.suffix(pos_policy.prefix(input_ids, attention_mask))
        assert_close(h_neg.detach(), h_pos.detach(), rtol=0, atol=0, name=f"layer {negative} vs {positive}")


@pytest.mark.parametrize("arch, layer", [("qwen2", 0), ("qwen3", 2), ("llama", -1)])
def test_prefix_is_reusable(arch, layer, tiny_model, assert_close):
    model = tiny_model(arch)
    policy = olf.OneLayerPolicy(model, layer=layer)
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_batch(model.config.vocab_size)
    cache = policy.prefix(input_ids, attention_mask)
    assert cache.hidden.grad_fn is None and not cache.hidden.requires_grad
    assert cache.hidden.shape == (*input_ids.shape, model.config.hidden_size)
    hidden_before = cache.hidden.clone()

    def one_pass():
        states = policy.suffix(cache)[:, PROMPT_LEN - 1 : -1]
        loss = olf.grpo_loss(states, policy.lm_head_weight, completion_ids, completion_mask, rewards=rewards,
                                group_size=GROUP_SIZE).loss
        policy.model.zero_grad(set_to_none=True)
        loss.backward()
        return states.detach(), loss.detach(), [p.grad.clone() for p in policy.trainable_parameters()]

    first = one_pass()
    ref_states = policy.suffix(cache, reference=True)
    assert ref_states.grad_fn is None
    for _ in range(2):
        again = one_pass()
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        for g_again, g_first in zip(again[2], first[2]):
            assert torch.equal(g_again, g_first)
    assert torch.equal(cache.hidden, hidden_before)
    assert cache.hidden.grad is None
    # the cached prefix is what the plain model computes: the untrained suffix equals the full HF run
    full = model.model(input_ids, attention_mask=attention_mask,
                       position_ids=olf.position_ids_from_mask(attention_mask)).last_hidden_state
    keep = attention_mask.bool()
    assert_close(first[0], full[:, PROMPT_LEN - 1 : -1].detach(), rtol=1e-5, atol=1e-5, name="suffix vs HF")
    assert_close(ref_states[keep], full[keep].detach(), rtol=1e-5, atol=1e-5, name="reference suffix vs HF")
    # attention_mask=None means all ones
    ones = torch.ones_like(input_ids)
    assert torch.equal(policy.suffix(policy.prefix(input_ids)).detach(),
                       policy.suffix(policy.prefix(input_ids, ones)).detach())


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [3, 7, -4, -100])
def test_layer_out_of_range(layer, tiny_model):
    model = tiny_model("qwen2")  # 3 layers
    with pytest.raises(ValueError, match=r"out of range.*3 decoder layers.*-3\.\.2"):
        olf.OneLayerPolicy(model, layer=layer)


def test_layer_must_be_int(tiny_model):
    with pytest.raises(ValueError, match="must be an integer"):
        olf.OneLayerPolicy(tiny_model("qwen2"), layer=1.0)


def test_model_without_decoder_layers():
    with pytest.raises(ValueError, match="not supported"):
        olf.OneLayerPolicy(nn.Linear(4, 4), layer=0)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList()

    with pytest.raises(ValueError, match="not supported"):
        olf.OneLayerPolicy(Wrapper(), layer=0)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(ValueError, match="not supported"):
        olf.OneLayerPolicy(gpt2, layer=0)


def test_prefix_bad_inputs(tiny_model):
    policy = olf.OneLayerPolicy(tiny_model("qwen2"), layer=1)
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        policy.prefix(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        policy.prefix(ids, torch.ones(2, 4, dtype=torch.long))


def test_cache_around_a_stored_prefix_equals_a_fresh_prefix():
    """cache_around rebuilds positions and masks around a prefix output computed earlier (what the TRL backend
    carries in its batch): the suffix is the same as from prefix_layout, also with explicit position ids
    (TRL's 0 ... T-1 on every row, which differ from generate's count on left-padded rows)."""
    from conftest import build_tiny_model

    model = build_tiny_model("qwen2").double()
    policy = olf.OneLayerPolicy(model, layer=1)
    ids, mask = torch.randint(1, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    counted = olf.PaddedLayout(ids, mask, completion_start=4)
    explicit = olf.PaddedLayout(ids, mask, completion_start=4, position_ids=torch.arange(7).expand(3, 7))
    assert not torch.equal(counted.position_ids, explicit.position_ids)
    for layout in (counted, explicit):
        fresh = policy.prefix_layout(layout)
        again = policy.cache_around(layout, fresh.hidden)
        torch.testing.assert_close(policy.suffix(again), policy.suffix(fresh), rtol=0, atol=0)
    # Rotary attention sees relative positions only: a row's positions shifted by its padding give the same
    # states up to rounding (why TRL's count and generate's agree), float32 rounding here: transformers
    # computes the rotary angles in float32 even for a float64 model.
    outputs = [policy.suffix(policy.prefix_layout(layout)) for layout in (counted, explicit)]
    assert not torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0] * mask[..., None], outputs[1] * mask[..., None], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        policy.cache_around(counted, fresh.hidden[:2])
    with pytest.raises(ValueError, match="position_ids shape"):
        olf.PaddedLayout(ids, mask, position_ids=torch.arange(6).expand(3, 6))
