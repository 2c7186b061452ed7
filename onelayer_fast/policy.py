"""Which parameters train, the cached frozen prefix, and the suffix (trainable or reference).

Single-layer mode splits a decoder-only HF causal LM at the target layer `i`:
    prefix:  embed_tokens + layers[:i]         run once per rollout batch, no autograd, cached
    suffix:  layers[i] (trainable) + layers[i+1:] (frozen) + final norm   run per pass, input grads only
The reference policy is a frozen copy of the ORIGINAL layer i alone: the rest of the network is
shared, because nothing else ever changes.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # transformers >= 4.53 builds masks per attention implementation
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
except ImportError:  # pragma: no cover - exercised only on old transformers
    create_causal_mask = create_sliding_window_causal_mask = None


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding `layers`, `embed_tokens`, `norm`, `rotary_emb` (model.model for Qwen/Llama)."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList) or len(inner.layers) == 0:
        raise ValueError(
            f"{type(model).__name__} is not supported: expected a causal LM with decoder layers at "
            "`model.model.layers` (Qwen2/2.5, Qwen3, Llama, Mistral)"
        )
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            raise ValueError(f"{type(model).__name__} is not supported: its decoder has no `{name}`")
    return inner


def lm_head_weight_of(model: nn.Module) -> Tensor:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__} is not supported: expected a bias-free linear lm_head")
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        raise ValueError(f"{type(model).__name__} is not supported: logit soft-capping / scaling is not implemented")
    return head.weight


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions as `generate` counts them for left-padded prompts: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _mask_kwargs_name() -> str:
    # transformers renamed `past_key_values` to `cache` in the mask builders during 5.x.
    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def attention_masks(config: Any, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> dict[str, Any]:
    """Per layer type ("full_attention", "sliding_attention") the mask object the layers expect."""
    kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": attention_mask,
              "position_ids": position_ids, _mask_kwargs_name(): None}
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types(config):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


@dataclass
class PrefixCache:
    """What the suffix needs, computed once per rollout batch and reused by every suffix call."""

    hidden: Tensor  # (B, T, H) input of the target layer, no autograd history
    attention_mask: Tensor  # (B, T) 1 for real tokens
    position_ids: Tensor  # (B, T)
    position_embeddings: tuple[Tensor, Tensor]  # rotary (cos, sin)
    masks: dict[str, Any]  # per layer type, as built by transformers for the model's attention implementation


def run_layer(layer: nn.Module, hidden: Tensor, cache: PrefixCache, layer_type: str) -> Tensor:
    out = layer(
        hidden,
        attention_mask=cache.masks[layer_type],
        position_ids=cache.position_ids,
        position_embeddings=cache.position_embeddings,
    )
    return out[0] if isinstance(out, tuple) else out


class OneLayerPolicy(nn.Module):
    """Train exactly one decoder layer of `model`; everything else is frozen.

    policy = OneLayerPolicy(model, layer=12)   # negative indices count from the top
    cache  = policy.prefix(input_ids, attention_mask)
    hidden = policy.suffix(cache)                   # (B, T, H) after the final norm
    ref_h  = policy.suffix(cache, reference=True)   # through a frozen copy of the original layer
    """

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        self.model = model
        self.decoder = decoder_of(model)
        num_layers = len(self.decoder.layers)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an integer decoder-layer index, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is out of range for a model with {num_layers} decoder layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        self.layer_index = layer % num_layers
        self.layer_types = layer_types(model.config)
        self.lm_head_weight = lm_head_weight_of(model)
        model.requires_grad_(False)
        self.target_layer.requires_grad_(True)
        # The reference is the original target layer alone; it never trains.
        self.reference_layer = copy.deepcopy(self.target_layer).requires_grad_(False).eval()
        prefix = f"model.layers.{self.layer_index}."
        self.trainable_parameter_names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(n.startswith(prefix) for n in self.trainable_parameter_names), self.trainable_parameter_names

    @property
    def target_layer(self) -> nn.Module:
        return self.decoder.layers[self.layer_index]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.target_layer.parameters())

    @torch.no_grad()
    def prefix(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PrefixCache:
        """input_ids, attention_mask (B, T) -> PrefixCache holding layers[:i]'s output. No autograd."""
        # no_grad rather than inference_mode: the cached hidden becomes the input of a layer that
        # saves it for backward, which inference tensors may not be.
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        embeds = self.decoder.embed_tokens(input_ids)
        position_ids = position_ids_from_mask(attention_mask)
        cache = PrefixCache(
            hidden=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=self.decoder.rotary_emb(embeds, position_ids),
            masks=attention_masks(self.model.config, embeds, attention_mask, position_ids),
        )
        hidden = embeds
        for j in range(self.layer_index):
            hidden = run_layer(self.decoder.layers[j], hidden, cache, self.layer_types[j])
        cache.hidden = hidden
        return cache

    def suffix(self, cache: PrefixCache, reference: bool = False) -> Tensor:
        """Target layer (or its frozen original, `reference=True`) + frozen layers above + final norm."""
        if reference:
            with torch.no_grad():
                return self._run_suffix(cache, self.reference_layer)
        return self._run_suffix(cache, self.target_layer)

    def _run_suffix(self, cache: PrefixCache, first_layer: nn.Module) -> Tensor:
        hidden = run_layer(first_layer, cache.hidden, cache, self.layer_types[self.layer_index])
        for j in range(self.layer_index + 1, len(self.decoder.layers)):
            hidden = run_layer(self.decoder.layers[j], hidden, cache, self.layer_types[j])
        return self.decoder.norm(hidden)


@dataclass
class FullCache:
    """Full-parameter mode caches nothing but the inputs: every layer trains."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor


class FullModelPolicy(nn.Module):
    """Baseline with the same interface: every parameter trains, the reference is a whole-model copy."""

    def __init__(self, model: nn.Module, keep_reference: bool = True):
        super().__init__()
        self.model = model
        self.decoder = decoder_of(model)
        self.lm_head_weight = lm_head_weight_of(model)
        model.requires_grad_(True)
        self.reference_model = copy.deepcopy(model).requires_grad_(False).eval() if keep_reference else None
        self.trainable_parameter_names = [n for n, _ in model.named_parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def prefix(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> FullCache:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return FullCache(input_ids, attention_mask, position_ids_from_mask(attention_mask))

    def suffix(self, cache: FullCache, reference: bool = False) -> Tensor:
        if reference:
            if self.reference_model is None:
                raise ValueError("this FullModelPolicy was built with keep_reference=False")
            with torch.no_grad():
                return decoder_of(self.reference_model)(
                    input_ids=cache.input_ids, attention_mask=cache.attention_mask, position_ids=cache.position_ids
                ).last_hidden_state
        return self.decoder(
            input_ids=cache.input_ids, attention_mask=cache.attention_mask, position_ids=cache.position_ids
        ).last_hidden_state
