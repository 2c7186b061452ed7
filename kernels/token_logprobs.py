"""Per-token log-probabilities through the lm_head, without a (tokens, vocab) tensor.

Math, for a row h (hidden_size,), lm_head weight W (vocab, hidden_size), target token y, temperature tau:
    z      = W @ h / tau                       logits, (vocab,)
    lse    = log(sum_v exp(z_v))
    logp   = z_y - lse
Backward, for an upstream gradient g = dL/dlogp:
    dL/dz  = g * (onehot(y) - softmax(z))
    dL/dh  = W^T @ dL/dz / tau                 (always)
    dL/dW  = dL/dz outer h / tau               (only when the weight requires grad)

The chunked path processes `rows_per_chunk(vocab)` token rows at a time, so about `CHUNK_ELEMENTS`
logits (at least `MIN_CHUNK_ROWS` rows of them) exist at once; the backward recomputes each chunk's logits from the saved
logsumexp instead of keeping them. `token_logprobs_ref` materializes everything and is the
reference the tests compare against.

Log-probs and entropies together (`chunked_token_logprobs_entropy`; the loss knobs that need the entropy):
    p      = softmax(z),  H = -sum_v p_v log p_v = lse - sum_v p_v z_v
    dH/dz  = -p * (log p + H)                  so, for upstream gradients g = dL/dlogp and e = dL/dH,
    dL/dz  = g * (onehot(y) - p) - e * p * (log p + H)
and dL/dh, dL/dW as above (the same 1 / tau). It keeps two chunk buffers (the logits and their softmax) and
computes in fp32, or in fp64 when the states are fp64 (so a float64 run of it is exact to ~1e-12).
`token_logprobs_entropy_ref` is its materialized reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

# About 2^22 fp32 logits = 16 MiB per chunk, but never fewer than MIN_CHUNK_ROWS token rows: at a
# 150k vocab 2^22 logits are only 27 rows, and matmuls that thin run far below the machine's matmul rate.
# 128 rows x 151936 x 4 B = 74 MiB is still ~1% of what materializing the logits of 8k tokens takes.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 128


def rows_per_chunk(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS, min_rows: int = MIN_CHUNK_ROWS) -> int:
    """How many token rows one chunk of logits holds."""
    return max(min_rows, chunk_elements // vocab_size, 1)


def token_logprobs_ref(hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference: materialized logits, log-softmax, gather. hidden (..., H), weight (V, H), token_ids (...)."""
    # At least fp32; fp64 inputs stay fp64 so the reference can also serve as a float64 oracle.
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def token_logprobs_entropy_ref(hidden: Tensor, weight: Tensor, token_ids: Tensor,
                               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Reference of the log-probs and the entropy of the temperature-scaled softmax, both differentiable
    through autograd over materialized logits. hidden (..., H), weight (V, H), token_ids (...) -> two (...)."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), entropy


def logits_into(buffer: Tensor, hidden_rows: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """Write the fp32 logits of `hidden_rows` into `buffer` (rows, vocab) and return it.

    One buffer is reused across chunks: fresh 64 MiB allocations per chunk cost page faults that
    showed up as a large share of the CPU step time.
    """
    if hidden_rows.dtype == buffer.dtype and weight.dtype == buffer.dtype:
        torch.mm(hidden_rows, weight.T, out=buffer)
    else:
        # The matmul runs in the input dtype (bf16 on GPU); the softmax statistics are always fp32
        # so that a logsumexp over ~150k entries does not swamp the target logit.
        buffer.copy_(hidden_rows @ weight.T)
    if temperature != 1.0:
        buffer.div_(temperature)
    return buffer


def softmax_stats_(logits: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place: logits -> exp(z - max). Returns (logp of the targets, logsumexp, sum of exp(z - max))."""
    target = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    peak = logits.amax(dim=1)
    sum_exp = logits.sub_(peak.unsqueeze(1)).exp_().sum(dim=1)
    lse = peak + sum_exp.log()
    return target - lse, lse, sum_exp


def softmax_stats_entropy_(logits: Tensor, token_ids: Tensor, exp_buffer: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """softmax_stats_ plus each row's entropy: logits -> z - max in place, exp(z - max) into `exp_buffer` (same
    shape). Returns (logp, logsumexp, sum of exp, entropy, exp(z - max)).
    H = log S - sum_v e_v (z_v - max) / S (the max cancels: no large terms); the row dot products run as one
    batched matmul, about as cheap as the exp pass itself (an elementwise log over the chunk costs several
    times that). The fused loss and `chunked_token_logprobs_entropy` both take their statistics here."""
    target = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    peak = logits.amax(dim=1)
    shifted = logits.sub_(peak.unsqueeze(1))
    exps = torch.exp(shifted, out=exp_buffer)
    sum_exp = exps.sum(dim=1)
    log_sum_exp = sum_exp.log()
    entropy = log_sum_exp - torch.bmm(exps.unsqueeze(1), shifted.unsqueeze(2)).view(-1) / sum_exp
    lse = peak + log_sum_exp
    return target - lse, lse, sum_exp, entropy, exps


def probs_to_grad_(probs: Tensor, token_ids: Tensor, grad_logp: Tensor, temperature: float) -> Tensor:
    """In place: softmax -> dL/dz / tau = g * (onehot - softmax) / tau."""
    scale = grad_logp.float() / temperature
    grad_z = probs.mul_(-scale.unsqueeze(1))
    grad_z[torch.arange(grad_z.shape[0], device=grad_z.device), token_ids] += scale
    return grad_z


def chunk_buffer(num_rows: int, chunk_rows: int, vocab_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(min(num_rows, chunk_rows), vocab_size, dtype=dtype, device=device)


def chunked_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, chunk_rows: int
) -> tuple[Tensor, Tensor]:
    """hidden (N, H), weight (V, H), token_ids (N,) -> (logp (N,) fp32, lse (N,) fp32)."""
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    buffer = chunk_buffer(n, chunk_rows, weight.shape[0], hidden.device)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        logits = logits_into(buffer[: stop - start], hidden[start:stop], weight, temperature)
        logp[start:stop], lse[start:stop], _ = softmax_stats_(logits, token_ids[start:stop])
    return logp, lse


def chunked_token_logprobs_backward(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    temperature: float,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Recompute each chunk's logits from the saved logsumexp; return (grad_hidden (N, H), grad_weight or None)."""
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    buffer = chunk_buffer(hidden.shape[0], chunk_rows, weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(start + chunk_rows, hidden.shape[0])
        logits = logits_into(buffer[: stop - start], hidden[start:stop], weight, temperature)
        probs = logits.sub_(lse[start:stop].unsqueeze(1)).exp_()
        grad_z = probs_to_grad_(probs, token_ids[start:stop], grad_logp[start:stop], temperature)
        accumulate_input_grads(grad_z, hidden[start:stop], weight, grad_hidden[start:stop], grad_weight)
    return grad_hidden, grad_weight


def accumulate_input_grads(grad_z: Tensor, rows: Tensor, weight: Tensor, grad_rows: Tensor, grad_weight: Tensor | None) -> None:
    """grad_rows = grad_z @ W; grad_weight += grad_z^T @ rows (when asked for; in grad_weight's dtype)."""
    grad_rows.copy_(grad_z.to(weight.dtype) @ weight)
    if grad_weight is not None:
        grad_weight.addmm_(grad_z.T.to(grad_weight.dtype), rows.to(grad_weight.dtype))


def _autograd_grads(ctx, weight: Tensor, grad_hidden: Tensor, grad_weight: Tensor | None) -> tuple:
    """What a chunked Function's backward returns for (hidden, weight, token_ids, temperature, chunk_rows): the
    hidden gradient only if asked for, the weight gradient in the weight's dtype."""
    if not ctx.needs_input_grad[0]:
        grad_hidden = None
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight, None, None, None


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Autograd wrapper of the chunked path; inputs are already flattened to (N, H) / (N,)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, chunk_rows: int) -> Tensor:
        logp, lse = chunked_token_logprobs_forward(hidden, weight, token_ids, temperature, chunk_rows)
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        grad_hidden, grad_weight = chunked_token_logprobs_backward(
            grad_logp.contiguous(),
            hidden,
            weight,
            token_ids,
            lse,
            ctx.temperature,
            ctx.chunk_rows,
            need_weight_grad=ctx.needs_input_grad[1],
        )
        return _autograd_grads(ctx, weight, grad_hidden, grad_weight)


def chunked_token_logprobs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> Tensor:
    """hidden (N, H), weight (V, H), token_ids (N,) int64 -> logp (N,) fp32, differentiable."""
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(weight.shape[0])
    return ChunkedTokenLogprobs.apply(hidden.contiguous(), weight, token_ids.contiguous(), float(temperature), chunk_rows)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 states (the softmax statistics are always at least fp32), fp64 for fp64."""
    return torch.promote_types(hidden.dtype, torch.float32)


def chunked_token_logprobs_entropy_forward(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, chunk_rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), token_ids (N,) -> (logp, entropy, lse), each (N,) in the compute dtype."""
    n, dtype = hidden.shape[0], _compute_dtype(hidden)
    logp = torch.empty(n, dtype=dtype, device=hidden.device)
    entropy = torch.empty(n, dtype=dtype, device=hidden.device)
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    buffer = chunk_buffer(n, chunk_rows, weight.shape[0], hidden.device, dtype)
    probs_buffer = torch.empty_like(buffer)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        logits = logits_into(buffer[: stop - start], hidden[start:stop], weight, temperature)
        logp[start:stop], lse[start:stop], _, entropy[start:stop], _ = softmax_stats_entropy_(
            logits, token_ids[start:stop], probs_buffer[: stop - start])
    return logp, entropy, lse


def chunked_token_logprobs_entropy_backward(
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Recompute each chunk's logits; dL/dz = g * (onehot - p) - e * p * (log p + H), then / tau into the
    hidden rows and the weight. Returns (grad_hidden (N, H), grad_weight in the compute dtype or None)."""
    n, dtype = hidden.shape[0], _compute_dtype(hidden)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight_grad else None
    buffer = chunk_buffer(n, chunk_rows, weight.shape[0], hidden.device, dtype)
    probs_buffer = torch.empty_like(buffer)
    rows = torch.arange(min(n, chunk_rows), device=hidden.device)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        ids = token_ids[start:stop]
        log_probs = logits_into(buffer[: stop - start], hidden[start:stop], weight, temperature)
        log_probs.sub_(lse[start:stop].unsqueeze(1))  # log p
        probs = torch.exp(log_probs, out=probs_buffer[: stop - start])
        g = None if grad_logp is None else grad_logp[start:stop].to(dtype)
        if grad_entropy is not None:
            # -(g + e * (log p + H)) * p, in the logits buffer
            e = grad_entropy[start:stop].to(dtype).unsqueeze(1)
            grad_z = log_probs.add_(entropy[start:stop].unsqueeze(1)).mul_(e)
            if g is not None:
                grad_z.add_(g.unsqueeze(1))
            grad_z.mul_(probs).neg_()
        else:
            grad_z = probs.mul_(-g.unsqueeze(1))
        if g is not None:
            grad_z[rows[: stop - start], ids] += g
        if temperature != 1.0:
            grad_z.div_(temperature)
        accumulate_input_grads(grad_z, hidden[start:stop], weight, grad_hidden[start:stop], grad_weight)
    return grad_hidden, grad_weight


class ChunkedTokenLogprobsEntropy(torch.autograd.Function):
    """Autograd wrapper of the chunked log-probs + entropies; inputs already flattened to (N, H) / (N,)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float, chunk_rows: int):
        logp, entropy, lse = chunked_token_logprobs_entropy_forward(hidden, weight, token_ids, temperature, chunk_rows)
        ctx.save_for_backward(hidden, weight, token_ids, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)  # an unused output (the entropy, often) costs no backward work
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, token_ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad_hidden, grad_weight = chunked_token_logprobs_entropy_backward(
            None if grad_logp is None else grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            hidden, weight, token_ids, lse, entropy, ctx.temperature, ctx.chunk_rows,
            need_weight_grad=ctx.needs_input_grad[1],
        )
        return _autograd_grads(ctx, weight, grad_hidden, grad_weight)


def chunked_token_logprobs_entropy(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """hidden (N, H), weight (V, H), token_ids (N,) int64 -> (logp (N,), entropy (N,)), both differentiable,
    fp32 (fp64 for fp64 states); never a (N, V) tensor, only two (chunk_rows, V) buffers."""
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(weight.shape[0])
    return ChunkedTokenLogprobsEntropy.apply(hidden.contiguous(), weight, token_ids.contiguous(), float(temperature),
                                             chunk_rows)
