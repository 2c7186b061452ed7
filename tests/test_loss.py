"""`olf.grpo_loss` against a float64 implementation of the TRL GRPOTrainer formulas written out here.

Nothing from `kernels/grpo_loss.py` is used on the expected side: advantages, importance weights,
clipping, KL, the four normalizations and the metrics are all re-derived below from the TRL code.
"""
from __future__ import annotations

import math

import pytest
import torch

import onelayer_fast as olf

# tiny tensors: one intra-op thread is faster and immune to a busy machine (see conftest)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

H, V = 48, 1013
STD_EPS = 1e-4


# --------------------------------------------------------------------------------------------------
# float64 reference (TRL GRPOTrainer._compute_loss / _generate_and_score_completions)
# --------------------------------------------------------------------------------------------------
def ref_logps64(hidden, weight, ids, temperature):
    logits = (hidden.double() @ weight.double().T) / temperature  # materialized (B, T, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def ref_entropy64(hidden, weight, temperature):
    """Entropy of softmax(logits / temperature) per token, as logsumexp(z) - sum_v softmax(z)_v z_v (TRL's
    entropy_from_logits is -sum p log p: the same number, written differently); differentiable."""
    logits = (hidden.double() @ weight.double().T) / temperature
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def ref_quantile64(values, q):
    """numpy's / torch's default (linear) quantile of a 1-d tensor, written out: sort, interpolate."""
    ordered = values.sort().values
    position = (ordered.numel() - 1) * q
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ref_advantages64(rewards, group_size, scale_rewards):
    """-> (advantages (B,), zero-std flag per row (B,))."""
    r = rewards.double()
    grouped = r.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)  # Bessel (unbiased)
    adv = r - mean
    if scale_rewards == "group":
        adv = adv / (std + STD_EPS)
    elif scale_rewards == "batch":
        adv = adv / (r.std() + STD_EPS)
    else:
        assert scale_rewards == "none"
    zero_std = grouped.eq(grouped[:, :1]).all(dim=1).repeat_interleave(group_size)  # constant groups
    adv = torch.where(zero_std, torch.zeros_like(adv), adv)
    return adv, zero_std


def ref_grpo64(
    hidden, weight, ids, mask, advantages, old_logps=None, ref_logps=None, beta=0.0, epsilon_low=0.2,
    epsilon_high=0.2, delta=None, loss_type="dapo", temperature=1.0, max_completion_length=None,
    importance_sampling_level="token", use_bias_correction_kl=True, sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
    off_policy_mask_threshold=None, top_entropy_quantile=1.0, entropy_coef=0.0, sampling_weights=None,
    sampling_logps=None,
):
    """Loss and metrics in float64; `hidden`/`weight` are float64 leaves if gradients are wanted.
    use_bias_correction_kl (TRL 1.16's default): the KL times the differentiable ratio, before the delta clamp.
    TRL 1.16's vespo, off-policy sequence mask, high-entropy token mask and entropy bonus as in its
    `_compute_loss`, `get_gamma_weights`, `get_off_policy_mask`, `get_high_entropy_mask`; the masks and vespo's
    weights come back as metrics named "_off_policy_keep", "_entropy_keep", "_phi" (for the tests' own checks).
    sampling_weights: TRL's vLLM importance-sampling ratio, multiplied into the policy term after the masks
    (vespo: its clamped log summed into the row's log-ratio, as `get_gamma_weights` does)."""
    m = mask.double()
    logps = ref_logps64(hidden, weight, ids, temperature)
    row_level = (loss_type == "vespo" or off_policy_mask_threshold is not None or top_entropy_quantile < 1
                 or entropy_coef != 0)
    entropies = ref_entropy64(hidden, weight, temperature) if row_level else None
    old = logps.detach() if old_logps is None else old_logps.double()
    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    ratio = coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    a = advantages.double().unsqueeze(1)
    metrics = {}
    if loss_type == "cispo":  # TRL 1.16: the capped ratio carries no gradient; the log-prob does
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * a * logps
    elif loss_type == "sapo":
        tau = torch.where(a > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    elif loss_type == "vespo":
        with torch.no_grad():  # phi(w) = e^lam w^k e^(-lam w) of the row's summed log-ratio, in log space
            summed = ((logps - old).clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
            if sampling_weights is not None:
                summed = summed + torch.clamp(torch.log(sampling_weights.double()), math.log(1e-8), 20.0).sum(-1, keepdim=True)
            log_w = summed.clamp(math.log(1e-8), 20.0)
            f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
            k = torch.where(a >= 0, f64(vespo_k_pos), f64(vespo_k_neg))
            lam = torch.where(a >= 0, f64(vespo_lambda_pos), f64(vespo_lambda_neg)).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi * a * logps
        metrics["vespo/phi_seq_mean"] = phi.mean()
        metrics["_phi"] = phi
    else:
        per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if off_policy_mask_threshold is not None:
        drift = (old if sampling_logps is None else sampling_logps.double()) - logps.detach()
        drift = torch.nan_to_num(drift, nan=0.0)  # TRL: tokens the sampler could not score give no evidence
        mean_drift = (drift * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        keep_rows = ((a >= 0) | (mean_drift <= off_policy_mask_threshold)).double()
        per_token_loss = per_token_loss * keep_rows
        metrics["_off_policy_keep"] = keep_rows
    entropy_keep = None
    if top_entropy_quantile < 1:
        threshold = ref_quantile64(entropies.detach()[m.bool()], 1 - top_entropy_quantile)
        entropy_keep = ((entropies.detach() * m >= threshold) & m.bool()).double()
        per_token_loss = per_token_loss * entropy_keep
        metrics["_entropy_keep"] = entropy_keep
    if sampling_weights is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * sampling_weights.double()
    if beta != 0.0:
        d = ref_logps.double() - logps
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = (kl * m).sum() / m.sum().clamp(min=1.0)
    batch, length = ids.shape
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "luspo":
        loss = (per_token_loss * m).sum(-1).mean()
    elif loss_type in ("bnpo", "dapo", "cispo", "vespo"):  # dapo: tokens of the whole generation batch == this batch
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * m).sum() / (batch * (max_completion_length or length))
    else:
        raise AssertionError(loss_type)
    if entropy_coef != 0:  # the mean entropy over the tokens the policy term acts on, whatever the loss type
        effective = m if entropy_keep is None else m * entropy_keep
        loss = loss - entropy_coef * (entropies * effective).sum() / effective.sum().clamp(min=1.0)
    if entropies is not None:
        metrics["entropy"] = (entropies.detach() * m).sum() / m.sum().clamp(min=1.0)

    def masked_batch_mean(x):
        if x.shape[1] == 1:  # sequence level: one weight per row
            return x.double().mean()
        return (x.double() * m).sum() / m.sum().clamp(min=1.0)

    with torch.no_grad():
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_batch_mean((coef_1 > epsilon_high) & (a > 0))
        elif loss_type not in ("sapo", "vespo"):
            low = (coef_1 < 1 - epsilon_low) & (a < 0)
            high = (coef_1 > 1 + epsilon_high) & (a > 0)
            metrics["clip_ratio/low_mean"] = masked_batch_mean(low)
            metrics["clip_ratio/high_mean"] = masked_batch_mean(high)
            metrics["clip_ratio/region_mean"] = masked_batch_mean(low | high)
        metrics["advantage_mean"] = advantages.double().mean()
    return loss, metrics, logps.detach()


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def make_mask(batch, length):
    """Mostly full rows, some cut short (EOS early), row 1 fully masked, row 0 full."""
    assert batch >= 3
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0] = length
    lengths[1] = 0
    lengths[2] = length // 2
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)


def make_rewards(batch, group_size):
    """Random rewards with one constant (zero-std) group and a non-representable constant value."""
    rewards = torch.randint(0, 3, (batch,)).float() + 0.1 * torch.randn(batch)
    rewards[:group_size] = 0.9  # constant group; for group sizes 3 and 6, r - mean(r) is not exactly 0 in float32
    return rewards


def nudge_off_boundaries(log_ratio, boundaries, mask, level, gap=2e-3):
    """Move log-ratios away from the clip boundaries so float32 vs float64 cannot flip a clip decision."""
    log_ratio = log_ratio.clone()
    if level == "token":
        for b in boundaries:
            near = (log_ratio - b).abs() < gap
            log_ratio = torch.where(near, b + 2 * gap * torch.sign(log_ratio - b + 1e-12), log_ratio)
        return log_ratio
    m = mask.double()
    for b in boundaries:
        row = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        shift = torch.where((row - b).abs() < gap, 3 * gap * torch.sign(row - b + 1e-12), torch.zeros_like(row))
        log_ratio = log_ratio + shift.unsqueeze(1)
    return log_ratio


def make_case(batch, length, group_size, temperature, epsilon_low, epsilon_high, delta, level, spread=0.5):
    hidden = torch.randn(batch, length, H)
    weight = torch.randn(V, H) / H**0.5 * 2.0
    ids = torch.randint(0, V, (batch, length))
    mask = make_mask(batch, length)
    true = ref_logps64(hidden, weight, ids, temperature)
    boundaries = [math.log(1 - epsilon_low), math.log(1 + epsilon_high)] + ([math.log(delta)] if delta else [])
    log_ratio = nudge_off_boundaries((torch.rand(batch, length, dtype=torch.float64) * 2 - 1) * spread,
                                     boundaries, mask, level)
    old_logps = (true - log_ratio).float()
    ref_logps = (true + 0.3 * torch.randn(batch, length, dtype=torch.float64)).float()
    rewards = make_rewards(batch, group_size)
    return hidden, weight, ids, mask, rewards, old_logps, ref_logps


def run_olf(hidden, weight, ids, mask, weight_grad=False, **kwargs):
    """-> loss, metrics with the result's token_logps added under that name (compared like a metric), grads."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_grad)
    result = olf.grpo_loss(h, w, ids, mask, **kwargs)
    result.loss.backward()
    return result.loss.detach(), {**result.metrics, "token_logps": result.token_logps}, h.grad, w.grad


def run_ref(hidden, weight, ids, mask, advantages, weight_grad=False, **kwargs):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(weight_grad)
    loss, metrics, logps = ref_grpo64(h, w, ids, mask, advantages, **kwargs)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, logps


def check_against_ref(out, ref, assert_close, relative_error, metric_names, weight_grad=False):
    loss, metrics, gh, gw = out
    e_loss, e_metrics, e_gh, e_gw, e_logps = ref
    assert torch.isfinite(loss)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, e_loss, rtol=1e-5, atol=1e-7, name="loss")
    assert relative_error(gh, e_gh) < 1e-4, f"grad hidden rel err {relative_error(gh, e_gh):.2e}"
    assert torch.isfinite(gh).all()
    if weight_grad:
        assert gw is not None
        assert relative_error(gw, e_gw) < 1e-4, f"grad weight rel err {relative_error(gw, e_gw):.2e}"
    else:
        assert gw is None
    for name in metric_names:
        assert name in metrics, f"metric {name} missing: {sorted(metrics)}"
        assert metrics[name].dim() == 0, name
        assert_close(metrics[name], e_metrics[name], rtol=1e-5, atol=1e-6, name=name)
    return e_logps


# (batch, length, group_size, temperature, epsilon_low, epsilon_high, delta, scale_rewards, max_completion_length)
CONFIGS = {
    "B6G3T7": (6, 7, 3, 1.0, 0.2, 0.2, None, "group", None),
    "B12G4T13-batch-delta": (12, 13, 4, 0.7, 0.2, 0.28, 1.5, "batch", 16),
    "B12G6T13-none": (12, 13, 6, 1.3, 0.1, 0.3, None, "none", None),
    "B6G2T13-delta": (6, 13, 2, 0.7, 0.2, 0.2, 1.3, "group", 20),
}
CLIP_METRICS = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "advantage_mean"]


def _main_cases():
    """Every loss_type x level x beta, each with two of the four configs (every config 8 times); with beta,
    the first of the two with TRL's bias-corrected KL (the default) and the second without."""
    names = list(CONFIGS)
    cases = []
    i = 0
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            for beta in (0.0, 0.04):
                for corrected, config in zip((True, False), (names[i % 4], names[(i + 2) % 4])):
                    kl = "" if not beta else ("-klcorr" if corrected else "-klplain")
                    cases.append(pytest.param(loss_type, level, beta, config, corrected,
                                              id=f"{loss_type}-{level}-beta{beta}{kl}-{config}"))
                i += 1
    return cases


@pytest.mark.parametrize("loss_type, level, beta, config, corrected", _main_cases())
def test_grpo_loss_matches_fp64_reference(loss_type, level, beta, config, corrected, assert_close, relative_error):
    batch, length, group_size, temperature, eps_low, eps_high, delta, scale_rewards, mcl = CONFIGS[config]
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(
        batch, length, group_size, temperature, eps_low, eps_high, delta, level)
    common = dict(old_logps=old_logps, ref_logps=ref_logps if beta else None, beta=beta, epsilon_low=eps_low,
                  epsilon_high=eps_high, delta=delta, loss_type=loss_type, temperature=temperature,
                  max_completion_length=mcl, importance_sampling_level=level, use_bias_correction_kl=corrected)
    out = run_olf(hidden, weight, ids, mask, rewards=rewards, group_size=group_size, scale_rewards=scale_rewards, **common)
    advantages, zero_std = ref_advantages64(rewards, group_size, scale_rewards)
    assert zero_std.any() and not zero_std.all()
    ref = run_ref(hidden, weight, ids, mask, advantages, **common)
    names = CLIP_METRICS + (["kl"] if beta else [])
    e_logps = check_against_ref(out, ref, assert_close, relative_error, names)
    metrics = out[1]
    if not beta:
        assert "kl" not in metrics
    assert_close(metrics["frac_reward_zero_std"], zero_std.double().mean(), rtol=0, atol=1e-7, name="frac_reward_zero_std")
    # token_logps: detached, the model's log-probs where unmasked, exactly zero where masked
    token_logps = metrics["token_logps"]
    assert not token_logps.requires_grad and token_logps.shape == ids.shape
    assert_close(token_logps, e_logps * mask, rtol=1e-5, atol=1e-5, name="token_logps")
    assert (token_logps[mask == 0] == 0).all()
    # the inputs really exercise clipping on both sides (token level has plenty of tokens)
    if level == "token":
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("bnpo", "sequence"), ("dr_grpo", "sequence"),
                                              ("dapo", "token")])
def test_weight_gradient_when_lm_head_trains(loss_type, level, assert_close, relative_error):
    batch, length, group_size, temperature, eps_low, eps_high, delta, scale_rewards, mcl = CONFIGS["B12G4T13-batch-delta"]
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(
        batch, length, group_size, temperature, eps_low, eps_high, delta, level)
    common = dict(old_logps=old_logps, ref_logps=ref_logps, beta=0.04, epsilon_low=eps_low, epsilon_high=eps_high,
                  delta=delta, loss_type=loss_type, temperature=temperature, max_completion_length=mcl,
                  importance_sampling_level=level)
    for backend in ("auto", "reference"):
        out = run_olf(hidden, weight, ids, mask, weight_grad=True, rewards=rewards, group_size=group_size,
                      scale_rewards=scale_rewards, backend=backend, **common)
        ref = run_ref(hidden, weight, ids, mask, ref_advantages64(rewards, group_size, scale_rewards)[0],
                      weight_grad=True, **common)
        check_against_ref(out, ref, assert_close, relative_error, CLIP_METRICS + ["kl"], weight_grad=True)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("with_old", [False, True], ids=["old_none", "old_given"])
def test_explicit_advantages(loss_type, with_old, assert_close, relative_error):
    batch, length = 6, 7
    hidden, weight, ids, mask, _, old_logps, ref_logps = make_case(batch, length, 3, 0.7, 0.2, 0.2, None, "token")
    advantages = torch.randn(batch)
    advantages[3] = 0.0
    common = dict(old_logps=old_logps if with_old else None, ref_logps=ref_logps, beta=0.04, loss_type=loss_type,
                  temperature=0.7)
    out = run_olf(hidden, weight, ids, mask, advantages=advantages, **common)
    ref = run_ref(hidden, weight, ids, mask, advantages, **common)
    check_against_ref(out, ref, assert_close, relative_error, CLIP_METRICS + ["kl"])
    metrics = out[1]
    assert "frac_reward_zero_std" not in metrics  # no rewards, no groups
    if not with_old:
        # on-policy: every ratio is exactly 1, nothing is clipped
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert metrics[name] == 0, name


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_old_logps_none_is_ratio_one(level, assert_close, relative_error):
    """old_logps=None means on-policy: the loss equals old_logps = (the current log-probs, detached)."""
    batch, length, group_size = 12, 13, 4
    hidden, weight, ids, mask, rewards, _, _ = make_case(batch, length, group_size, 1.0, 0.2, 0.2, None, level)
    common = dict(rewards=rewards, group_size=group_size, importance_sampling_level=level, loss_type="grpo")
    loss_none, m_none, gh_none, _ = run_olf(hidden, weight, ids, mask, old_logps=None, **common)
    current = m_none["token_logps"]
    loss_cur, m_cur, gh_cur, _ = run_olf(hidden, weight, ids, mask, old_logps=current, **common)
    assert_close(loss_none, loss_cur, rtol=1e-6, atol=1e-7, name="loss")
    assert_close(gh_none, gh_cur, rtol=1e-5, atol=1e-7, name="grad hidden")
    # and against the float64 reference with ratio 1
    ref = run_ref(hidden, weight, ids, mask, ref_advantages64(rewards, group_size, "group")[0], loss_type="grpo",
                  importance_sampling_level=level)
    check_against_ref((loss_none, m_none, gh_none, None), ref, assert_close, relative_error, CLIP_METRICS)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert m_none[name] == 0


@pytest.mark.parametrize("loss_type, level", [("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "token"),
                                              ("dapo", "sequence")])
def test_backends_agree(loss_type, level, assert_close):
    batch, length, group_size = 12, 13, 3
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(batch, length, group_size, 0.7, 0.2, 0.28, 1.4, level)
    common = dict(rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps, beta=0.04,
                  epsilon_high=0.28, delta=1.4, loss_type=loss_type, temperature=0.7, importance_sampling_level=level)
    results = {b: run_olf(hidden, weight, ids, mask, weight_grad=True, backend=b, **common)
               for b in ("auto", "chunked", "reference")}
    base_loss, base_metrics, base_gh, base_gw = results["reference"]
    for backend in ("auto", "chunked"):
        loss, metrics, gh, gw = results[backend]
        assert_close(loss, base_loss, rtol=1e-5, atol=1e-7, name=f"{backend} loss")
        assert_close(gh, base_gh, rtol=1e-4, atol=1e-6, name=f"{backend} grad hidden")
        assert_close(gw, base_gw, rtol=1e-4, atol=1e-6, name=f"{backend} grad weight")
        assert sorted(metrics) == sorted(base_metrics)
        for name, value in metrics.items():
            assert_close(value, base_metrics[name], rtol=1e-5, atol=1e-6, name=f"{backend} {name}")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_small_chunks_match_reference_backend(level, monkeypatch, assert_close):
    """The auto path gathers the unmasked tokens and runs them through several small chunks, the last one ragged."""
    import onelayer_fast.kernels.token_logprobs as tl

    batch, length, group_size = 12, 13, 6
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(batch, length, group_size, 0.7, 0.2, 0.2, None, level)
    chunk = next(c for c in (5, 7, 6, 9) if int(mask.sum()) % c)  # ragged last chunk
    monkeypatch.setattr(tl, "rows_per_chunk", lambda vocab_size, chunk_elements=None: chunk)
    common = dict(rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps, beta=0.04,
                  loss_type="grpo", temperature=0.7, importance_sampling_level=level)
    loss, metrics, gh, gw = run_olf(hidden, weight, ids, mask, weight_grad=True, backend="auto", **common)
    r_loss, r_metrics, r_gh, r_gw = run_olf(hidden, weight, ids, mask, weight_grad=True, backend="reference", **common)
    assert_close(loss, r_loss, rtol=1e-5, atol=1e-7, name="loss")
    assert_close(gh, r_gh, rtol=1e-4, atol=1e-6, name="grad hidden")
    assert_close(gw, r_gw, rtol=1e-4, atol=1e-6, name="grad weight")
    assert_close(metrics["token_logps"], r_metrics["token_logps"], rtol=1e-5, atol=1e-5, name="token_logps")


def test_dapo_equals_bnpo_and_dr_grpo_scaling(assert_close):
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(6, 7, 3, 1.0, 0.2, 0.2, None, "token")
    common = dict(rewards=rewards, group_size=3, old_logps=old_logps, ref_logps=ref_logps, beta=0.04)
    losses = {t: olf.grpo_loss(hidden, weight, ids, mask, loss_type=t, **common).loss for t in ("bnpo", "dapo", "dr_grpo")}
    assert losses["dapo"] == losses["bnpo"]
    # dr_grpo divides the same token sum by B * max_completion_length instead of the token count
    tokens = mask.sum().item()
    assert_close(losses["dr_grpo"], losses["bnpo"] * tokens / (6 * 7), rtol=1e-6, atol=1e-8, name="dr_grpo")
    dr_long = olf.grpo_loss(hidden, weight, ids, mask, loss_type="dr_grpo", max_completion_length=70, **common).loss
    assert_close(dr_long, losses["dr_grpo"] / 10, rtol=1e-6, atol=1e-8, name="dr_grpo max_completion_length")


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_zero_std_groups_give_zero_advantages(scale_rewards, assert_close):
    batch, length, group_size = 12, 7, 3
    hidden, weight, ids, mask, _, _, _ = make_case(batch, length, group_size, 1.0, 0.2, 0.2, None, "token")
    # groups: constant 0.9, signal, constant 0.45, signal. In float32, 0.9 - mean(0.9, 0.9, 0.9) and
    # 0.45 - mean(0.45, 0.45, 0.45) are NOT exactly zero: only an explicit zero-std rule gives exact zeros.
    rewards = torch.tensor([0.9] * 3 + [1.0, 0.0, 1.0] + [0.45] * 3 + [0.2, 0.7, 0.7])
    grouped = rewards.view(-1, group_size)
    assert ((grouped - grouped.mean(dim=1, keepdim=True))[[0, 2]] != 0).any()  # the premise
    h = hidden.clone().requires_grad_(True)
    # old_logps=None: ratio 1, so no token is clipped and every unmasked token of the signal group has a gradient
    result = olf.grpo_loss(h, weight, ids, mask, rewards=rewards, group_size=group_size,
                                  scale_rewards=scale_rewards, loss_type="grpo")
    loss, metrics = result.loss, result.metrics
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert_close(metrics["frac_reward_zero_std"], torch.tensor(0.5), rtol=0, atol=1e-7, name="frac_reward_zero_std")
    # rows of constant groups contribute nothing: their hidden gradient is exactly zero
    constant_rows = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert (h.grad[constant_rows] == 0).all()
    assert (h.grad[~constant_rows].abs().sum(-1)[mask[~constant_rows].bool()] > 0).all()
    # the advantage mean over constant groups only is exactly 0 (not rounding noise)
    c = constant_rows
    result = olf.grpo_loss(hidden[c], weight, ids[c], mask[c], rewards=rewards[c], group_size=3,
                                           scale_rewards=scale_rewards)
    only_constant, m_const = result.loss, result.metrics
    assert m_const["advantage_mean"] == 0 and only_constant == 0 and m_const["frac_reward_zero_std"] == 1
    # and the advantages are exactly zero: the loss equals that of explicit zeros there
    adv, zero_std = ref_advantages64(rewards, group_size, scale_rewards)
    assert (adv[zero_std] == 0).all()
    loss_adv = olf.grpo_loss(hidden, weight, ids, mask, advantages=adv.float(), loss_type="grpo").loss
    # The loss is a cancellation of O(1) per-token terms (advantages sum to ~0): fp32 rounding is ~1e-7.
    assert_close(loss.detach(), loss_adv, rtol=1e-6, atol=1e-7, name="loss")


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_all_groups_constant_and_all_masked(beta):
    """No signal at all: the loss is finite (zero without KL) and gradients are finite."""
    batch, length = 6, 7
    hidden, weight, ids, mask, _, old_logps, ref_logps = make_case(batch, length, 3, 1.0, 0.2, 0.2, None, "token")
    rewards = torch.tensor([0.7] * 3 + [0.1] * 3)
    h = hidden.clone().requires_grad_(True)
    result = olf.grpo_loss(h, weight, ids, mask, rewards=rewards, group_size=3, old_logps=old_logps,
                                  ref_logps=ref_logps if beta else None, beta=beta)
    loss, metrics = result.loss, result.metrics
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert metrics["frac_reward_zero_std"] == 1 and metrics["advantage_mean"] == 0
    if not beta:
        assert loss == 0 and (h.grad == 0).all()
    # every row masked: nothing to average, the loss is exactly zero, not NaN
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for backend in ("auto", "reference"):
            h = hidden.clone().requires_grad_(True)
            result = olf.grpo_loss(h, weight, ids, torch.zeros_like(mask), rewards=torch.randn(batch), group_size=3,
                                          old_logps=old_logps, ref_logps=ref_logps if beta else None, beta=beta,
                                          loss_type=loss_type, backend=backend)
            loss, metrics = result.loss, result.metrics
            loss.backward()
            assert loss == 0, (loss_type, backend)
            assert (h.grad == 0).all()
            assert all(torch.isfinite(v).all() for v in metrics.values())


def test_nonfinite_logps_at_masked_positions_are_ignored(assert_close):
    """old/ref log-probs of padding may be -inf (or anything): only unmasked positions count."""
    batch, length = 6, 7
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(batch, length, 3, 1.0, 0.2, 0.2, None, "sequence")
    pad = mask == 0
    assert pad.any()
    for level in ("token", "sequence"):
        common = dict(rewards=rewards, group_size=3, beta=0.04, loss_type="grpo", importance_sampling_level=level)
        h1 = hidden.clone().requires_grad_(True)
        loss1 = olf.grpo_loss(h1, weight, ids, mask, old_logps=old_logps, ref_logps=ref_logps, **common).loss
        loss1.backward()
        h2 = hidden.clone().requires_grad_(True)
        loss2 = olf.grpo_loss(h2, weight, ids, mask, old_logps=old_logps.masked_fill(pad, float("-inf")),
                                 ref_logps=ref_logps.masked_fill(pad, float("nan")), **common).loss
        loss2.backward()
        assert torch.isfinite(loss2) and torch.isfinite(h2.grad).all()
        assert_close(loss2, loss1.detach(), rtol=0, atol=0, name=f"{level} loss")
        assert_close(h2.grad, h1.grad, rtol=0, atol=0, name=f"{level} grad")


def test_bool_mask_and_int32_ids(assert_close):
    hidden, weight, ids, mask, rewards, old_logps, _ = make_case(6, 7, 3, 1.0, 0.2, 0.2, None, "token")
    loss_a = olf.grpo_loss(hidden, weight, ids, mask, rewards=rewards, group_size=3, old_logps=old_logps).loss
    loss_b = olf.grpo_loss(hidden, weight, ids.int(), mask.bool(), rewards=rewards, group_size=3, old_logps=old_logps).loss
    assert_close(loss_b, loss_a, rtol=0, atol=0, name="loss")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "rewards_and_advantages": ("exactly one", lambda k: k.update(advantages=torch.zeros(6))),
    "neither_rewards_nor_advantages": ("exactly one", lambda k: (k.pop("rewards"), k.pop("group_size"))),
    "batch_not_divisible": ("not divisible", lambda k: k.update(group_size=4)),
    "group_size_missing": ("group_size", lambda k: k.pop("group_size")),
    "group_size_one": ("group_size", lambda k: k.update(group_size=1)),
    "rewards_shape": ("rewards must have shape", lambda k: k.update(rewards=torch.zeros(7))),
    "nan_reward": ("NaN or inf", lambda k: k["rewards"].__setitem__(2, float("nan"))),
    "inf_reward": ("NaN or inf", lambda k: k["rewards"].__setitem__(4, float("inf"))),
    "nan_advantage": ("NaN or inf", lambda k: (k.pop("rewards"), k.pop("group_size"),
                                               k.update(advantages=torch.tensor([0.0, 1, float("nan"), 0, 0, 0])))),
    "advantages_shape": ("advantages must have shape", lambda k: (k.pop("rewards"), k.pop("group_size"),
                                                                  k.update(advantages=torch.zeros(6, 1)))),
    "beta_without_ref": ("ref_logps", lambda k: k.update(beta=0.04, ref_logps=None)),
    "negative_beta": ("beta", lambda k: k.update(beta=-0.1)),
    "mask_shape": ("completion_mask", lambda k: k.update(completion_mask=torch.ones(6, 6))),
    "old_logps_shape": ("old_logps", lambda k: k.update(old_logps=torch.zeros(6, 8))),
    "ref_logps_shape": ("ref_logps", lambda k: k.update(beta=0.04, ref_logps=torch.zeros(7, 7))),
    "hidden_size": ("hidden size", lambda k: k.update(lm_head_weight=torch.randn(V, H + 1))),
    "hidden_2d": ("hidden must be", lambda k: k.update(hidden=torch.randn(42, H))),
    "ids_shape": ("token_ids shape", lambda k: k.update(completion_ids=torch.zeros(6, 8, dtype=torch.long))),
    "loss_type": ("loss_type", lambda k: k.update(loss_type="ppo")),
    "scale_rewards": ("scale_rewards", lambda k: k.update(scale_rewards="true")),
    "importance_sampling_level": ("importance_sampling_level", lambda k: k.update(importance_sampling_level="tokens")),
    "backend": ("backend", lambda k: k.update(backend="cuda")),
    "token_id_too_large": ("vocab", lambda k: k["completion_ids"].__setitem__((3, 2), V)),
    "token_id_negative": ("vocab", lambda k: k["completion_ids"].__setitem__((0, 0), -1)),
    "temperature": ("temperature", lambda k: k.update(temperature=0.0)),
    "delta": ("delta", lambda k: k.update(delta=0.9)),
    "epsilon": ("epsilon", lambda k: k.update(epsilon_low=-0.1)),
    "max_completion_length": ("max_completion_length", lambda k: k.update(max_completion_length=0)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case):
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(6, 7, 3, 1.0, 0.2, 0.2, None, "token")
    kwargs = dict(hidden=hidden, lm_head_weight=weight, completion_ids=ids, completion_mask=mask, rewards=rewards,
                  group_size=3, old_logps=old_logps, ref_logps=ref_logps)
    olf.grpo_loss(**kwargs)  # the unmodified call is fine
    match, mutate = BAD_INPUTS[case]
    mutate(kwargs)
    with pytest.raises(ValueError, match=match):
        olf.grpo_loss(**kwargs)


def test_bias_corrected_kl_changes_the_on_policy_gradient_as_trl_does():
    """TRL 1.16 multiplies the k3 KL by the differentiable ratio c = exp(logp - old), old = logp.detach()
    on-policy: c == 1 in value, dc/dlogp = 1, so d(beta * kl * c)/dlogp = beta * (1 - e + kl), e = exp(ref - logp),
    where the plain KL gives beta * (1 - e). Checked per token (bnpo: weight 1 / tokens) in float64."""
    from onelayer_fast.kernels.grpo_loss import LossConfig, grpo_loss_from_logps

    gen = torch.Generator().manual_seed(3)
    logps = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.5 - 2.0).requires_grad_()
    ref = logps.detach() + 0.4 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[2, 4:] = 0
    zero_adv = torch.zeros(4, dtype=torch.float64)  # the surrogate adds nothing: only the KL term is left
    grads = {}
    for corrected in (True, False):
        config = LossConfig(beta=0.1, loss_type="bnpo", use_bias_correction_kl=corrected)
        loss, metrics = grpo_loss_from_logps(logps, mask, zero_adv, None, ref, config)
        (grads[corrected],) = torch.autograd.grad(loss, logps)
        e = torch.exp(ref - logps.detach())
        kl = e - (ref - logps.detach()) - 1
        assert loss.item() == pytest.approx(float(0.1 * (kl * mask).sum() / mask.sum()), rel=1e-12)  # c == 1
        assert metrics["kl"].item() == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-12)
        per_token = (1 - e + kl) if corrected else (1 - e)
        torch.testing.assert_close(grads[corrected], 0.1 * per_token * mask / mask.sum(), rtol=1e-12, atol=1e-15)
    assert (grads[True] - grads[False]).abs().max() > 1e-3  # the knob matters on-policy


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_trl_loss_types_match_fp64_formulas(loss_type, level, beta, assert_close, relative_error):
    """TRL 1.16's cispo, sapo and luspo: the chunked path (float32) against the formulas written out in float64,
    and the float64 path (reference) exactly; every gradient, the loss and the metrics TRL logs for each."""
    batch, length, group_size, temperature, eps_low, eps_high, delta, scale_rewards, mcl = CONFIGS["B12G4T13-batch-delta"]
    delta = None if loss_type != "luspo" else delta  # delta clamps the clipped surrogate only
    eps_high = 1.1 if loss_type == "cispo" else eps_high  # cispo caps the ratio itself at epsilon_high (TRL's eps_max)
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(
        batch, length, group_size, temperature, eps_low, eps_high, delta, level)
    common = dict(old_logps=old_logps, ref_logps=ref_logps if beta else None, beta=beta, epsilon_low=eps_low,
                  epsilon_high=eps_high, delta=delta, loss_type=loss_type, temperature=temperature,
                  max_completion_length=mcl, importance_sampling_level=level, sapo_temperature_pos=0.9,
                  sapo_temperature_neg=1.2)
    advantages = ref_advantages64(rewards, group_size, scale_rewards)[0]
    names = (["advantage_mean"] + (["kl"] if beta else [])
             + (["cispo_clip_ratio"] if loss_type == "cispo" else [])
             + (["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] if loss_type == "luspo" else []))
    ref = run_ref(hidden, weight, ids, mask, advantages, weight_grad=True, **common)
    out = run_olf(hidden, weight, ids, mask, weight_grad=True, rewards=rewards, group_size=group_size,
                  scale_rewards=scale_rewards, backend="chunked", **common)
    check_against_ref(out, ref, assert_close, relative_error, names, weight_grad=True)
    if loss_type == "sapo":
        assert not any(k.startswith("clip_ratio") for k in out[1])  # TRL logs no clip ratios for the soft gate
    if loss_type == "cispo":
        assert 0 < out[1]["cispo_clip_ratio"] < 1 or level == "sequence"  # the cap really bites at token level
    # float64 states (backend auto -> reference): the written-out formulas, given the same advantages; grpo_loss
    # keeps advantages and the mask's normalization weights in float32, hence ~1e-8, not 1e-15
    advantages32 = advantages.float()
    exact = run_ref(hidden, weight, ids, mask, advantages32.double(), **common)
    h = hidden.double().requires_grad_()
    f64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in common.items()}
    result = olf.grpo_loss(h, weight.double(), ids, mask, advantages=advantages32, **f64)
    result.loss.backward()
    torch.testing.assert_close(result.loss, exact[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(h.grad, exact[2], rtol=1e-6, atol=1e-12)


def test_explicit_triton_refuses_the_chunked_only_loss_types():
    hidden, weight, ids, mask, rewards, _, _ = make_case(6, 7, 3, 1.0, 0.2, 0.2, None, "token")
    with pytest.raises(ValueError, match="loss_type 'sapo'"):
        olf.grpo_loss(hidden, weight, ids, mask, rewards=rewards, group_size=3, loss_type="sapo", backend="triton")


# --------------------------------------------------------------------------------------------------
# TRL 1.16's row-level knobs: vespo, off_policy_mask_threshold, top_entropy_quantile, entropy_coef
# --------------------------------------------------------------------------------------------------
KNOB_B, KNOB_T, KNOB_H, KNOB_V, KNOB_OFF_POLICY = 6, 7, 10, 37, 0.1
# Row 1 is fully masked (make_mask), row 2 half; rows 1, 2 and 4 have negative advantages.
KNOB_ADVANTAGES = torch.tensor([0.8, -0.5, -1.1, 0.3, -0.7, 1.2])


def make_knob_case(temperature, dtype=torch.float64):
    """B=6 (groups of 3), T=7, H=10, V=37; old log-probs off-policy with row 2 (negative advantage) drifted by
    +0.3..0.5 per token (the off-policy mask must drop it) and row 4 (negative advantage) by -0.3 (kept)."""
    hidden = torch.randn(KNOB_B, KNOB_T, KNOB_H, dtype=torch.float64)
    weight = torch.randn(KNOB_V, KNOB_H, dtype=torch.float64) * 0.6
    ids = torch.randint(0, KNOB_V, (KNOB_B, KNOB_T))
    mask = make_mask(KNOB_B, KNOB_T)
    assert mask[2].sum() == KNOB_T // 2 and mask[4].sum() > 0
    true = ref_logps64(hidden, weight, ids, temperature)
    log_ratio = (torch.rand(KNOB_B, KNOB_T, dtype=torch.float64) * 2 - 1) * 0.3
    log_ratio[2] = -0.4 + 0.1 * (torch.rand(KNOB_T, dtype=torch.float64) * 2 - 1)  # drift old - new ~ +0.4
    log_ratio[4] = 0.3 + 0.05 * torch.randn(KNOB_T, dtype=torch.float64)  # drift ~ -0.3
    old_logps = true - log_ratio
    ref_logps = true + 0.3 * torch.randn(KNOB_B, KNOB_T, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), ids, mask, cast(old_logps), cast(ref_logps)


def assert_fp64_close(got, expected, backend: str) -> None:
    """(loss, hidden gradient, weight gradient) against the float64 formulas, to ~1e-9."""
    for name, value, target in zip(("loss", "grad hidden", "grad weight"), got, expected, strict=True):
        torch.testing.assert_close(value, target, rtol=1e-9, atol=1e-12, msg=f"{backend} {name}")

# name: (LossConfig knobs, advantages all zero (only the entropy bonus and the KL act))
KNOB_CASES = {
    "vespo": (dict(loss_type="vespo"), False),
    "vespo-params-beta": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                               vespo_lambda_neg=1.7, beta=0.04, temperature=0.7), False),
    "off_policy-grpo-beta": (dict(loss_type="grpo", off_policy_mask_threshold=KNOB_OFF_POLICY, beta=0.04), False),
    "off_policy-cispo-sequence": (dict(loss_type="cispo", epsilon_high=1.1, off_policy_mask_threshold=KNOB_OFF_POLICY,
                                       importance_sampling_level="sequence", temperature=1.3), False),
    "entropy_mask-dapo": (dict(loss_type="dapo", top_entropy_quantile=0.4, temperature=0.7), False),
    "entropy_mask-grpo-sequence-beta": (dict(loss_type="grpo", top_entropy_quantile=0.6, beta=0.04,
                                             importance_sampling_level="sequence"), False),
    "entropy_coef-dapo": (dict(loss_type="dapo", entropy_coef=0.05, temperature=0.7), False),
    "entropy_coef-only": (dict(loss_type="dr_grpo", entropy_coef=0.3, temperature=1.3), True),
    "entropy_mask-coef-luspo": (dict(loss_type="luspo", top_entropy_quantile=0.5, entropy_coef=0.1), False),
    "all-vespo-beta": (dict(loss_type="vespo", off_policy_mask_threshold=KNOB_OFF_POLICY, top_entropy_quantile=0.3,
                            entropy_coef=0.2, beta=0.04, temperature=0.7), False),
}


def _knob_expected(hidden, weight, ids, mask, advantages, old_logps, ref_logps, knobs):
    common = dict(knobs, old_logps=old_logps, ref_logps=ref_logps if knobs.get("beta") else None)
    return run_ref(hidden, weight, ids, mask, advantages, weight_grad=True, **common)


def _knob_metric_names(knobs):
    names = ["entropy", "advantage_mean"] + (["kl"] if knobs.get("beta") else [])
    loss_type = knobs["loss_type"]
    if loss_type == "vespo":
        names.append("vespo/phi_seq_mean")
    elif loss_type == "cispo":
        names.append("cispo_clip_ratio")
    elif loss_type != "sapo":
        names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    return names


@pytest.mark.parametrize("case", list(KNOB_CASES))
def test_row_level_knobs_match_fp64_trl_formulas(case, monkeypatch):
    """Each of TRL 1.16's vespo / off-policy mask / entropy mask / entropy bonus: backends "reference" and "chunked"
    (several small chunks, the last ragged) in float64 against the formulas written out above (`ref_grpo64`), to
    ~1e-9: the loss, the hidden and lm_head weight gradients, the metrics; with masks that really bite."""
    import onelayer_fast.kernels.token_logprobs as tl

    knobs, zero_advantages = KNOB_CASES[case]
    temperature = knobs.get("temperature", 1.0)
    hidden, weight, ids, mask, old_logps, ref_logps = make_knob_case(temperature)
    advantages = torch.zeros(KNOB_B) if zero_advantages else KNOB_ADVANTAGES.clone()  # float32 values, exact in fp64
    expected = _knob_expected(hidden, weight, ids, mask, advantages, old_logps, ref_logps, knobs)
    e_loss, e_metrics, e_gh, e_gw, _ = expected
    assert e_gh.abs().max() > 1e-3 and e_gw.abs().max() > 1e-3  # something to compare
    # the knobs are not no-ops on these inputs
    if "off_policy_mask_threshold" in knobs:
        keep = e_metrics["_off_policy_keep"].squeeze(1)
        assert keep[2] == 0 and keep[4] == 1 and keep.sum() == KNOB_B - 1  # exactly row 2 dropped
    if knobs.get("top_entropy_quantile", 1.0) < 1:
        kept, tokens = e_metrics["_entropy_keep"].sum(), mask.sum()
        assert 0 < kept < tokens, (kept, tokens)
    if knobs["loss_type"] == "vespo":
        phi = e_metrics["_phi"].squeeze(1)
        assert (phi > 0).all() and phi.max() - phi.min() > 0.1, phi
    chunk = next(c for c in (4, 5, 6, 7) if int(mask.sum()) % c)  # ragged last chunk
    monkeypatch.setattr(tl, "rows_per_chunk", lambda vocab_size, chunk_elements=None: chunk)
    names = _knob_metric_names(knobs)
    for backend in ("reference", "chunked"):
        loss, metrics, gh, gw = run_olf(hidden, weight, ids, mask, weight_grad=True, advantages=advantages,
                                        old_logps=old_logps, ref_logps=ref_logps if knobs.get("beta") else None,
                                        backend=backend, **knobs)
        assert loss.dtype == torch.float64 and gh.dtype == gw.dtype == torch.float64, backend
        assert_fp64_close((loss, gh, gw), (e_loss, e_gh, e_gw), backend)
        for name in names:
            assert name in metrics and metrics[name].dim() == 0, (backend, name, sorted(metrics))
            # the clip fractions are float32 counts (as before these knobs): exact to float32's resolution
            tol = 1e-7 if "clip_ratio" in name else 1e-9
            torch.testing.assert_close(metrics[name].double(), e_metrics[name], rtol=tol, atol=1e-12,
                                       msg=f"{backend} metric {name}")
        if knobs["loss_type"] == "vespo":  # TRL logs no clip ratios for vespo
            assert not any(k.startswith("clip_ratio") or k == "cispo_clip_ratio" for k in metrics), sorted(metrics)


def test_row_level_knobs_change_the_loss():
    """Against the same inputs without the knob: each one changes the loss (the mask drops something, the
    bonus adds something): the comparison above is not one of two identical defaults."""
    hidden, weight, ids, mask, old_logps, ref_logps = make_knob_case(1.0)
    base = dict(old_logps=old_logps, advantages=KNOB_ADVANTAGES, backend="reference")  # float64 throughout
    plain = olf.grpo_loss(hidden, weight, ids, mask, loss_type="dapo", **base).loss
    for knobs in (dict(off_policy_mask_threshold=KNOB_OFF_POLICY), dict(top_entropy_quantile=0.5),
                  dict(entropy_coef=0.1)):
        changed = olf.grpo_loss(hidden, weight, ids, mask, loss_type="dapo", **base, **knobs).loss
        assert (changed - plain).abs() > 1e-4, knobs
    # a threshold above every row's drift keeps every row: the plain loss exactly
    loose = olf.grpo_loss(hidden, weight, ids, mask, loss_type="dapo", off_policy_mask_threshold=10.0, **base).loss
    torch.testing.assert_close(loose, plain, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", ["vespo-params-beta", "off_policy-cispo-sequence", "entropy_mask-grpo-sequence-beta",
                                  "entropy_coef-only", "all-vespo-beta"])
def test_row_level_knobs_float32_chunked_matches_reference(case, assert_close, relative_error):
    """float32 states: the chunked path (never a (tokens, vocab) tensor) against the materialized reference."""
    knobs, zero_advantages = KNOB_CASES[case]
    hidden, weight, ids, mask, old_logps, ref_logps = make_knob_case(knobs.get("temperature", 1.0), torch.float32)
    advantages = torch.zeros(KNOB_B) if zero_advantages else KNOB_ADVANTAGES.clone()
    common = dict(knobs, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps if knobs.get("beta") else None)
    results = {b: run_olf(hidden, weight, ids, mask, weight_grad=True, backend=b, **common)
               for b in ("reference", "chunked", "auto")}
    r_loss, r_metrics, r_gh, r_gw = results["reference"]
    assert r_loss.dtype == torch.float32
    for backend in ("chunked", "auto"):  # auto on CPU: chunked
        loss, metrics, gh, gw = results[backend]
        assert_close(loss, r_loss, rtol=1e-5, atol=1e-6, name=f"{backend} loss")
        assert relative_error(gh, r_gh) < 1e-4 and relative_error(gw, r_gw) < 1e-4, backend
        assert sorted(metrics) == sorted(r_metrics)
        for name, value in metrics.items():
            assert_close(value, r_metrics[name], rtol=1e-5, atol=1e-6, name=f"{backend} {name}")
    # and the float64 formulas, at float32 accuracy
    expected = _knob_expected(hidden.double(), weight.double(), ids, mask, advantages, old_logps.double(),
                              ref_logps.double(), knobs)
    loss, metrics, gh, gw = results["chunked"]
    assert_close(loss, expected[0], rtol=1e-5, atol=1e-6, name="loss vs float64")
    assert relative_error(gh, expected[2]) < 1e-4 and relative_error(gw, expected[3]) < 1e-4


def test_chunked_logprobs_entropy_gradients_across_chunks():
    """`chunked_token_logprobs_entropy` (float64, chunks of 4 rows over 23, the last ragged) against autograd over
    materialized logits: values, and the hidden / weight gradients from the log-probs alone, the entropies
    alone and both; a frozen weight gets no gradient."""
    from onelayer_fast.kernels.token_logprobs import chunked_token_logprobs_entropy

    n, temperature = 23, 0.7
    hidden = torch.randn(n, KNOB_H, dtype=torch.float64)
    weight = torch.randn(KNOB_V, KNOB_H, dtype=torch.float64)
    ids = torch.randint(0, KNOB_V, (n,))
    g_logp, g_entropy = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    log_probs = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    e_logp = log_probs.gather(1, ids.unsqueeze(1)).squeeze(1)
    e_entropy = -(log_probs.exp() * log_probs).sum(-1)
    logp, entropy = chunked_token_logprobs_entropy(h, w, ids, temperature, chunk_rows=4)
    torch.testing.assert_close(logp, e_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, e_entropy, rtol=1e-12, atol=1e-12)
    for uses in ("logp", "entropy", "both"):
        def objective(lp, ent):
            return ((lp * g_logp).sum() if uses != "entropy" else 0) + ((ent * g_entropy).sum() if uses != "logp" else 0)

        want = torch.autograd.grad(objective(e_logp, e_entropy), (h, w), retain_graph=True)
        got = torch.autograd.grad(objective(logp, entropy), (h, w), retain_graph=True)
        for name, a, b in zip(("hidden", "weight"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{uses}: grad {name}")
    frozen = hidden.clone().requires_grad_()
    logp, entropy = chunked_token_logprobs_entropy(frozen, weight, ids, temperature, chunk_rows=4)
    (logp.sum() + entropy.sum()).backward()
    assert frozen.grad is not None and weight.grad is None


def test_grpo_loss_from_logps_needs_entropies_for_entropy_knobs():
    from onelayer_fast.kernels.grpo_loss import LossConfig, grpo_loss_from_logps

    logps = -torch.rand(6, 7, dtype=torch.float64)
    mask = torch.ones(6, 7)
    for knobs in (dict(top_entropy_quantile=0.5), dict(entropy_coef=0.1)):
        with pytest.raises(ValueError, match="entropies"):
            grpo_loss_from_logps(logps, mask, torch.randn(6), None, None, LossConfig(**knobs))
    # vespo and the off-policy mask need no entropies (and report none when not given)
    _, metrics = grpo_loss_from_logps(logps, mask, torch.randn(6), None, None,
                                      LossConfig(loss_type="vespo", off_policy_mask_threshold=0.1))
    assert "entropy" not in metrics and metrics["vespo/phi_seq_mean"] == 1  # on-policy: w = 1, phi(1) = 1


def test_loss_config_row_level_defaults_are_trl_defaults():
    from onelayer_fast.kernels.grpo_loss import LOSS_TYPES, TRITON_LOSS_TYPES, LossConfig

    config = LossConfig()
    assert (config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg, config.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    assert config.off_policy_mask_threshold is None and config.top_entropy_quantile == 1.0 and config.entropy_coef == 0.0
    assert config.row_level_knobs == () and not config.needs_entropy
    assert "vespo" in LOSS_TYPES and "vespo" not in TRITON_LOSS_TYPES
    knobs = LossConfig(loss_type="vespo", off_policy_mask_threshold=0.5, top_entropy_quantile=0.2,
                       entropy_coef=0.01).row_level_knobs
    assert knobs == ("loss_type='vespo'", "off_policy_mask_threshold=0.5", "top_entropy_quantile=0.2",
                     "entropy_coef=0.01")


ROW_LEVEL_BAD = {
    "vespo_sequence": ("importance_sampling_level must be 'token'", dict(loss_type="vespo",
                                                                          importance_sampling_level="sequence")),
    "quantile_below_zero": ("top_entropy_quantile", dict(top_entropy_quantile=-0.1)),
    "quantile_above_one": ("top_entropy_quantile", dict(top_entropy_quantile=1.5)),
    "quantile_nan": ("top_entropy_quantile", dict(top_entropy_quantile=float("nan"))),
    "inf_entropy_coef": ("entropy_coef", dict(entropy_coef=float("inf"))),
    "negative_off_policy_threshold": ("off_policy_mask_threshold", dict(off_policy_mask_threshold=-0.5)),
    "nan_off_policy_threshold": ("off_policy_mask_threshold", dict(off_policy_mask_threshold=float("nan"))),
    "negative_vespo_k": ("vespo_k_neg", dict(loss_type="vespo", vespo_k_neg=-1.0)),
    "negative_vespo_lambda": ("vespo_lambda_pos", dict(loss_type="vespo", vespo_lambda_pos=-3.0)),
    "nan_vespo_k": ("vespo_k_pos", dict(vespo_k_pos=float("nan"))),
}


def test_trl_edge_values_are_accepted():
    """TRL allows top_entropy_quantile 0 (only the highest-entropy token trains) and a negative entropy_coef
    (an entropy penalty): so does LossConfig, and q = 0 keeps exactly the top token of the batch."""
    from onelayer_fast.kernels.grpo_loss import LossConfig, high_entropy_mask

    LossConfig(entropy_coef=-0.1)
    LossConfig(top_entropy_quantile=0.0)
    entropies = torch.rand(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[1, 3:] = 0
    keep = high_entropy_mask(entropies, mask, 0.0)
    assert int(keep.sum()) == 1 and entropies[keep.bool()].item() == entropies[mask.bool()].max().item()


@pytest.mark.parametrize("case", list(ROW_LEVEL_BAD))
def test_row_level_bad_knobs_raise_value_error(case):
    from onelayer_fast.kernels.grpo_loss import LossConfig

    match, knobs = ROW_LEVEL_BAD[case]
    hidden, weight, ids, mask, old_logps, _ = make_knob_case(1.0, torch.float32)
    with pytest.raises(ValueError, match=match):
        LossConfig(**knobs)
    with pytest.raises(ValueError, match=match):
        olf.grpo_loss(hidden, weight, ids, mask, advantages=KNOB_ADVANTAGES, old_logps=old_logps, **knobs)


@pytest.mark.parametrize("knobs, match", [
    (dict(loss_type="vespo"), "loss_type 'vespo'"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(entropy_coef=0.01), "entropy_coef=0.01"),
])
def test_explicit_triton_refuses_the_row_level_knobs(knobs, match):
    """Raised before any kernel module is imported; "auto" on plain CPU runs them chunked."""
    hidden, weight, ids, mask, old_logps, _ = make_knob_case(1.0, torch.float32)
    with pytest.raises(ValueError, match=f"backend='triton' does not support {match}"):
        olf.grpo_loss(hidden, weight, ids, mask, advantages=KNOB_ADVANTAGES, old_logps=old_logps, backend="triton",
                      **knobs)


# --------------------------------------------------------------------------------------------------
# sampling weights (TRL's vLLM importance-sampling correction)
# --------------------------------------------------------------------------------------------------
def make_sampling_weights(shape, mask, seed=0):
    """pi_old / pi_sampler as TRL's truncate / mask modes leave it: spread over [0, 3], some exactly 0 (masked
    out by token_mask), NaN at masked positions (vLLM could not score them; they must not matter)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(shape, generator=gen, dtype=torch.float64) * 3.0
    weights[torch.rand(shape, generator=gen) < 0.15] = 0.0
    if shape == mask.shape:
        weights[~mask.bool()] = math.nan
    return weights


SAMPLING_CASES = {
    "dapo-token-beta": (dict(loss_type="dapo", beta=0.04), "token"),
    "grpo-sequence-weights": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04), "row"),
    "cispo-off-policy": (dict(loss_type="cispo", epsilon_high=1.1, off_policy_mask_threshold=KNOB_OFF_POLICY), "token"),
    "sapo-entropy-mask": (dict(loss_type="sapo", top_entropy_quantile=0.5, temperature=0.7), "token"),
    "vespo-beta": (dict(loss_type="vespo", beta=0.04), "token"),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_weights_match_fp64_trl_formulas(case, monkeypatch):
    """grpo_loss(sampling_weights=...) in float64 against TRL's formulas (`ref_grpo64`) to ~1e-9: backend
    reference, and chunked (ragged chunks) where a row-level knob takes it through its float64-capable path (the
    fused token-level op computes in float32: `test_sampling_weights_chunked_float32_matches_reference`); the
    weights really change the loss and gradient."""
    import onelayer_fast.kernels.token_logprobs as tl

    knobs, kind = SAMPLING_CASES[case]
    hidden, weight, ids, mask, old_logps, ref_logps = make_knob_case(knobs.get("temperature", 1.0))
    shape = mask.shape if kind == "token" else (KNOB_B, 1)
    weights = make_sampling_weights(shape, mask)
    common = dict(knobs, advantages=KNOB_ADVANTAGES.clone(), old_logps=old_logps,
                  ref_logps=ref_logps if knobs.get("beta") else None)
    e_loss, e_metrics, e_gh, e_gw, _ = run_ref(hidden, weight, ids, mask, weight_grad=True,
                                               sampling_weights=weights.nan_to_num(1.0), **common)
    u_loss, _, u_gh, _, _ = run_ref(hidden, weight, ids, mask, weight_grad=True, **common)
    assert (e_loss - u_loss).abs() > 1e-4 and (e_gh - u_gh).abs().max() > 1e-4  # the weights act
    chunk = next(c for c in (4, 5, 6, 7) if int(mask.sum()) % c)
    monkeypatch.setattr(tl, "rows_per_chunk", lambda vocab_size, chunk_elements=None: chunk)
    from onelayer_fast.kernels.grpo_loss import LossConfig

    row_level = LossConfig(**knobs).row_level_knobs
    for backend in ("reference", "chunked") if row_level else ("reference",):
        loss, metrics, gh, gw = run_olf(hidden, weight, ids, mask, weight_grad=True, backend=backend,
                                        sampling_weights=weights, **common)
        assert_fp64_close((loss, gh, gw), (e_loss, e_gh, e_gw), backend)
        if knobs.get("beta"):
            torch.testing.assert_close(metrics["kl"].double(), e_metrics["kl"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["token", "row"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampling_weights_chunked_float32_matches_reference(kind, level, assert_close, relative_error):
    """Float32 chunked: the fused token-level op (token level) and the sequence-level path take the weights."""
    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(6, 13, 3, 0.7, 0.2, 0.28, None, level)
    weights = make_sampling_weights(mask.shape if kind == "token" else (6, 1), mask, seed=3).float()
    advantages, _ = ref_advantages64(rewards, 3, "group")
    knobs = dict(old_logps=old_logps, ref_logps=ref_logps, beta=0.04, temperature=0.7, epsilon_high=0.28,
                 importance_sampling_level=level)
    out = run_olf(hidden, weight, ids, mask, advantages=advantages.float(), backend="chunked",
                  sampling_weights=weights, **knobs)
    ref = run_ref(hidden, weight, ids, mask, advantages, sampling_weights=weights.double().nan_to_num(1.0), **knobs)
    check_against_ref(out, ref, assert_close, relative_error, ["kl"])


def test_sampling_weights_errors():
    hidden, weight, ids, mask, old_logps, _ = make_knob_case(1.0, dtype=torch.float32)
    kwargs = dict(advantages=KNOB_ADVANTAGES.clone(), old_logps=old_logps)
    with pytest.raises(ValueError, match="sampling_weights must have shape"):
        olf.grpo_loss(hidden, weight, ids, mask, sampling_weights=torch.ones(KNOB_B, 2), **kwargs)
    bad = torch.ones(mask.shape)
    bad[0, 0] = math.nan  # row 0 is full: an unmasked position
    with pytest.raises(ValueError, match="NaN or inf at unmasked"):
        olf.grpo_loss(hidden, weight, ids, mask, sampling_weights=bad, **kwargs)
    with pytest.raises(ValueError, match="triton"):
        olf.grpo_loss(hidden, weight, ids, mask, sampling_weights=torch.ones(mask.shape), backend="triton", **kwargs)


@pytest.mark.parametrize("loss_type", ["grpo", "vespo"])
def test_off_policy_mask_measures_drift_from_the_sampler(loss_type, monkeypatch):
    """With sampling_logps (vLLM's), the off-policy mask measures the drift from them, not from old_logps (TRL
    1.16's get_off_policy_mask): float64 to ~1e-9 against the formulas, NaN sampler entries counted as no drift,
    and the mask then drops a different row than with old_logps."""
    hidden, weight, ids, mask, old_logps, ref_logps = make_knob_case(1.0)
    true = ref_logps64(hidden, weight, ids, 1.0)
    sampling = true.clone()
    sampling[4] = true[4] + 0.4  # row 4 (negative advantage) looks off-policy to the sampler only
    sampling[0, 2] = math.nan
    knobs = dict(loss_type=loss_type, off_policy_mask_threshold=KNOB_OFF_POLICY, beta=0.04,
                 advantages=KNOB_ADVANTAGES.clone(), old_logps=old_logps, ref_logps=ref_logps)
    e_loss, e_metrics, e_gh, e_gw, _ = run_ref(hidden, weight, ids, mask, weight_grad=True, sampling_logps=sampling,
                                               **knobs)
    keep = e_metrics["_off_policy_keep"].squeeze(1)
    assert keep[4] == 0 and keep[2] == 1  # unlike with old_logps (row 2 dropped, row 4 kept)
    for backend in ("reference", "chunked"):
        loss, _, gh, gw = run_olf(hidden, weight, ids, mask, weight_grad=True, backend=backend,
                                  sampling_logps=sampling, **knobs)
        assert_fp64_close((loss, gh, gw), (e_loss, e_gh, e_gw), backend)


@pytest.mark.parametrize("level, knobs", [("token", {}), ("sequence", {}), ("token", {"loss_type": "grpo", "beta": 0.04}),
                                          ("token", {"loss_type": "cispo", "epsilon_high": 1.2})],
                         ids=["fused", "sequence", "fused-grpo-beta", "fused-cispo"])
def test_entropy_metric_without_entropy_knobs(level, knobs, monkeypatch):
    """entropy_metric=True: metrics["entropy"] is the masked mean token entropy on every non-Triton path (the
    fused op takes it from its chunk, ragged chunks here), and the loss and gradients are those without it (to
    the bit, but for the sequence-level chunked path's rounding)."""
    import onelayer_fast.kernels.token_logprobs as tl

    hidden, weight, ids, mask, rewards, old_logps, ref_logps = make_case(6, 13, 3, 0.7, 0.2, 0.28, None, level)
    advantages, _ = ref_advantages64(rewards, 3, "group")
    common = dict(advantages=advantages.float(), old_logps=old_logps, ref_logps=ref_logps, temperature=0.7,
                  importance_sampling_level=level, **knobs)
    m = mask.double()
    expected = (ref_entropy64(hidden.double(), weight.double(), 0.7) * m).sum() / m.sum()
    chunk = next(c for c in (4, 5, 6, 7) if int(mask.sum()) % c)
    monkeypatch.setattr(tl, "rows_per_chunk", lambda vocab_size, chunk_elements=None: chunk)
    for backend in ("reference", "chunked"):
        plain = run_olf(hidden, weight, ids, mask, backend=backend, **common)
        loss, metrics, gh, _ = run_olf(hidden, weight, ids, mask, backend=backend, entropy_metric=True, **common)
        assert "entropy" not in plain[1]
        torch.testing.assert_close(metrics["entropy"].double(), expected, rtol=1e-5, atol=1e-6)
        if backend == "chunked" and level == "sequence":  # log-probs and entropies from one Function: its
            torch.testing.assert_close(loss, plain[0], rtol=1e-6, atol=0)  # backward rounds differently
            torch.testing.assert_close(gh, plain[2], rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(loss, plain[0]) and torch.equal(gh, plain[2]), backend
