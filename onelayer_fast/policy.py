"""Which parameters train, the cached frozen prefix, and the suffix (trainable or reference).

Single-layer mode splits a decoder-only HF causal LM at the target layer `i`:
    prefix:  embed_tokens + layers[:i]         run once per rollout batch, no autograd, cached
    suffix:  layers[i] (trainable) + layers[i+1:] (frozen) + final norm   run per pass, input grads only
The reference policy is a frozen copy of the ORIGINAL layer i alone: the rest of the network is
shared, because nothing else ever changes. Full-parameter mode (the baseline) caches nothing but the
layer inputs and runs every layer in the suffix.

Both modes and every layout (layout.py: padded, packed, shared-prompt) go through one loop over decoder
layers, `run_layers`: a layout gives the ids, positions and per-layer-type masks; the loop does not care
how the rows were laid out.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layout import Layout, PaddedLayout, layer_types


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


@dataclass
class PrefixCache:
    """What the suffix needs, computed once per rollout batch and reused by every suffix call."""

    layout: Layout
    position_embeddings: tuple[Tensor, Tensor]  # rotary (cos, sin)
    masks: dict[str, Any]  # per layer type, as the layout builds them for the model's attention implementation
    hidden: Tensor | None  # input of the first trained layer, no autograd history; None when every weight trains

    @property
    def position_ids(self) -> Tensor:
        return self.layout.position_ids


def run_layers(decoder: nn.Module, kinds: list[str], hidden: Tensor, cache: PrefixCache, start: int, stop: int,
               first_layer: nn.Module | None = None) -> Tensor:
    """The one loop over decoder layers: layers[start:stop] of `decoder` on `hidden`, with `first_layer`
    standing in for layers[start] when given (the trainable or the reference copy of the target layer)."""
    for j in range(start, stop):
        layer = first_layer if (j == start and first_layer is not None) else decoder.layers[j]
        out = layer(hidden, attention_mask=cache.masks[kinds[j]], position_ids=cache.position_ids,
                    position_embeddings=cache.position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class _LayerStackPolicy(nn.Module):
    """What both policies share: the decoder, the lm_head, the layer inputs over a layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.decoder = decoder_of(model)
        self.layer_types = layer_types(model.config)
        self.lm_head_weight = lm_head_weight_of(model)

    def _layer_inputs(self, layout: Layout, embeds: Tensor) -> PrefixCache:
        return PrefixCache(layout=layout, position_embeddings=self.decoder.rotary_emb(embeds, layout.position_ids),
                           masks=layout.attention_masks(self.model.config, embeds), hidden=None)

    def prefix(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PrefixCache:
        """input_ids, attention_mask (B, T) -> the cache over these padded rows (see `prefix_layout`)."""
        return self.prefix_layout(PaddedLayout(input_ids, attention_mask))

    def prefix_layout(self, layout: Layout) -> PrefixCache:
        raise NotImplementedError

    def suffix(self, cache: PrefixCache, reference: bool = False) -> Tensor:
        raise NotImplementedError

    def completion_states(self, cache: PrefixCache, reference: bool = False) -> Tensor:
        """(B, C, H) states that predict the completion tokens, picked out of the layout's rows."""
        return cache.layout.completion_states(self.suffix(cache, reference=reference))


class OneLayerPolicy(_LayerStackPolicy):
    """Train exactly one decoder layer of `model`; everything else is frozen.

    policy = OneLayerPolicy(model, layer=12)         # negative indices count from the top
    cache  = policy.prefix(input_ids, attention_mask)  # or policy.prefix_layout(layout)
    hidden = policy.suffix(cache)                   # (rows, T, H) after the final norm
    ref_h  = policy.suffix(cache, reference=True)   # through a frozen copy of the original layer
    """

    def __init__(self, model: nn.Module, layer: int):
        super().__init__(model)
        num_layers = len(self.decoder.layers)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an integer decoder-layer index, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is out of range for a model with {num_layers} decoder layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        self.layer_index = layer % num_layers
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
    def prefix_layout(self, layout: Layout) -> PrefixCache:
        """embed + layers[:i] over the layout's rows, without autograd; the cache holds their output."""
        # no_grad rather than inference_mode: the cached hidden becomes the input of a layer that
        # saves it for backward, which inference tensors may not be.
        embeds = self.decoder.embed_tokens(layout.input_ids)
        cache = self._layer_inputs(layout, embeds)
        cache.hidden = run_layers(self.decoder, self.layer_types, embeds, cache, 0, self.layer_index)
        return cache

    def cache_around(self, layout: Layout, hidden: Tensor) -> PrefixCache:
        """The cache over `layout` with `hidden` as the prefix output, computed earlier by `prefix_layout` on the
        same rows: positions and masks are rebuilt (cheap), the prefix layers are not run again."""
        if hidden.shape[:2] != layout.input_ids.shape:
            raise ValueError(f"prefix hidden {tuple(hidden.shape)} does not fit the layout's rows {tuple(layout.input_ids.shape)}")
        cache = self._layer_inputs(layout, hidden)  # hidden stands in for the embeddings: only dtype/device/shape count
        cache.hidden = hidden
        return cache

    def suffix(self, cache: PrefixCache, reference: bool = False) -> Tensor:
        """Target layer (or its frozen original, `reference=True`) + frozen layers above + final norm."""
        first = self.reference_layer if reference else self.target_layer
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            hidden = run_layers(self.decoder, self.layer_types, cache.hidden, cache, self.layer_index,
                                len(self.decoder.layers), first_layer=first)
            return self.decoder.norm(hidden)


class FullModelPolicy(_LayerStackPolicy):
    """Baseline with the same interface: every parameter trains, the reference is a whole-model copy.

    The cache holds only the layer inputs (positions, masks): the embedding trains too.
    """

    def __init__(self, model: nn.Module, keep_reference: bool = True):
        super().__init__(model)
        model.requires_grad_(True)
        self.reference_model = copy.deepcopy(model).requires_grad_(False).eval() if keep_reference else None
        self.trainable_parameter_names = [n for n, _ in model.named_parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def prefix_layout(self, layout: Layout) -> PrefixCache:
        with torch.no_grad():  # these embeddings only give the masks and rotary their dtype and device
            embeds = self.decoder.embed_tokens(layout.input_ids)
        return self._layer_inputs(layout, embeds)

    def suffix(self, cache: PrefixCache, reference: bool = False) -> Tensor:
        if reference and self.reference_model is None:
            raise ValueError("this FullModelPolicy was built with keep_reference=False")
        decoder = decoder_of(self.reference_model) if reference else self.decoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            hidden = decoder.embed_tokens(cache.layout.input_ids)
            hidden = run_layers(decoder, self.layer_types, hidden, cache, 0, len(decoder.layers))
            return decoder.norm(hidden)
