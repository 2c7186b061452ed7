"""Checkpoints of the trained tensors: atomic save, strict load, resume state, merge into a full HF model.

Layout of one checkpoint (`output_dir/checkpoint-000123/`):
    layer.safetensors   the trained tensors only: the target layer's state_dict (keys relative to the
                        layer, e.g. `self_attn.q_proj.weight`) in single-layer mode, the whole model's in
                        full mode (tied aliases such as `lm_head.weight` stored once, see `_dedupe`)
    meta.json           {"format_version", "mode", "layer", "num_layers", "step", **metadata}
    optimizer.pt        torch.save({"optimizer": ..., "trainer_state": ...}) for resuming
`output_dir/latest` holds the name of the newest complete checkpoint.

Crash safety: a checkpoint is built in a `.tmp-checkpoint-*` directory, fsynced, and renamed into
place, so `checkpoint-*` directories are always complete; `latest` is replaced atomically after the
rename, so it never names a partial checkpoint. One writer per output_dir is assumed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .policy import decoder_of

FORMAT_VERSION = 1
WEIGHTS_NAME = "layer.safetensors"
META_NAME = "meta.json"
OPTIMIZER_NAME = "optimizer.pt"
LATEST_NAME = "latest"
_TMP_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_RESERVED_META_KEYS = ("format_version", "mode", "layer", "num_layers", "step")
# safetensors header key holding {dropped_key: kept_key} for tensors that share storage (tied weights).
_ALIASES_KEY = "onelayer_fast.aliases"


# ----------------------------------------------------------------------------------------- helpers

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename / new entry durable; directories cannot be opened for fsync on Windows.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / META_NAME).is_file()


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop entries that are the same tensor as an earlier entry (tied embeddings): safetensors refuses
    to write shared storage. Returns (tensors to write, {dropped_key: kept_key})."""
    kept: dict[tuple, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                 tuple(value.shape), tuple(value.stride()), value.dtype)
        if ident in kept:
            aliases[key] = kept[ident]
        else:
            kept[ident] = key
            tensors[key] = value
    return tensors, aliases


def _to_cpu_copy(value: Tensor) -> Tensor:
    # A private contiguous CPU copy: safetensors needs contiguous, non-shared tensors, and the copy
    # is independent of later in-place optimizer updates.
    return value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


# -------------------------------------------------------------------------------------------- save

def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    metadata: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write `output_dir/checkpoint-{step:06d}/` atomically, point `latest` at it, prune old ones.

    `keep_last` (>= 1) counts the new checkpoint; older ones (lower step) beyond it are deleted.
    Checkpoints with a higher step than `step` (left by an abandoned run) are never deleted.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    clash = sorted(set(metadata) & set(_RESERVED_META_KEYS))
    if clash:
        raise ValueError(f"metadata may not set the reserved keys {clash}")

    single = hasattr(policy, "layer_index")
    num_layers = len(decoder_of(policy.model).layers)
    meta = {"format_version": FORMAT_VERSION, "mode": "single" if single else "full",
            "layer": int(policy.layer_index) if single else None, "num_layers": num_layers,
            "step": step, **metadata}
    try:  # fail before touching the disk if the metadata is not JSON
        meta_text = json.dumps(meta, indent=2, sort_keys=False)
    except TypeError as err:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {err}") from err

    state = policy.target_layer.state_dict() if single else policy.model.state_dict()
    tensors, aliases = _dedupe(state)
    tensors = {k: _to_cpu_copy(v) for k, v in tensors.items()}
    header = {_ALIASES_KEY: json.dumps(aliases)} if aliases else None

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:06d}-", dir=output_dir))
    displaced: Path | None = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=header)
        (tmp / META_NAME).write_text(meta_text + "\n", encoding="utf-8")
        torch.save({"format_version": FORMAT_VERSION, "step": step,
                    "optimizer": optimizer.state_dict(), "trainer_state": trainer_state}, tmp / OPTIMIZER_NAME)
        for name in (WEIGHTS_NAME, META_NAME, OPTIMIZER_NAME):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. after resuming from an older checkpoint): move the old one aside
            # first, since a directory rename cannot replace a non-empty directory.
            displaced = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=output_dir)) / final.name
            os.rename(final, displaced)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if displaced is not None and displaced.exists() and not final.exists():
            with contextlib.suppress(OSError):  # put the old checkpoint back; keep the original error
                os.rename(displaced, final)
        raise
    _write_latest(output_dir, final.name)
    _prune(output_dir, keep_last, step)
    return final


def _write_latest(output_dir: Path, name: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}latest-", dir=output_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, output_dir / LATEST_NAME)
        _fsync_dir(output_dir)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _prune(output_dir: Path, keep_last: int, step: int) -> None:
    older = sorted((s, p) for p in output_dir.iterdir() if (s := _checkpoint_step(p)) is not None and s < step)
    for _, path in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    # Leftovers of interrupted saves (never referenced by `latest`).
    for path in output_dir.glob(f"{_TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- discovery

def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `output_dir/latest`; if that is missing or broken, the highest-step
    complete `checkpoint-*` directory; None if there is none. Temp directories are never returned."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    pointer = output_dir / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        candidate = output_dir / name
        if _CHECKPOINT_RE.match(name) and _is_complete(candidate):
            return candidate
    # `latest` lost (crash between the rename and its update) or pointing at a deleted directory.
    found = sorted((s, p) for p in output_dir.iterdir() if (s := _checkpoint_step(p)) is not None and _is_complete(p))
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or an output directory (-> its latest checkpoint), as a checked Path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: not a directory")
    is_checkpoint = (_CHECKPOINT_RE.match(path.name) is not None
                     or (path / WEIGHTS_NAME).exists() or (path / META_NAME).exists())
    if not is_checkpoint:
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path}: expected a checkpoint directory "
                                    f"(with {WEIGHTS_NAME} and {META_NAME}) or an output directory holding one")
        path = found
    missing = [name for name in (WEIGHTS_NAME, META_NAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(path) / META_NAME).read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------------------- load

def _readable_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint this version can read (ValueError for another format_version)."""
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format_version {meta.get('format_version')!r}, "
                         f"this version reads {FORMAT_VERSION}")
    return meta


def _read_tensors(path: Path) -> dict[str, Tensor]:
    file = str(path / WEIGHTS_NAME)
    tensors = load_file(file, device="cpu")
    with safe_open(file, framework="pt") as f:
        header = f.metadata() or {}
    for alias, source in json.loads(header.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[source]
    return tensors


def load_layer(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Copy the checkpoint's tensors into `model` in place (dtype and device of `model` kept); return meta.

    Strict: a different layer count, missing or unexpected keys, or shape mismatches raise ValueError
    before anything is modified.
    """
    path = resolve_checkpoint(path)
    meta = _readable_meta(path)
    layers = decoder_of(model).layers
    if meta["num_layers"] != len(layers):
        raise ValueError(f"checkpoint {path} was saved from a model with {meta['num_layers']} decoder layers, "
                         f"this model has {len(layers)}")
    if meta["mode"] == "single":
        target, where = layers[meta["layer"]], f"layer {meta['layer']}"
    elif meta["mode"] == "full":
        target, where = model, "the model"
    else:
        raise ValueError(f"checkpoint {path} has unknown mode {meta['mode']!r}")
    _copy_checkpoint_into(target, path, where, type(model).__name__)
    return meta


def load_lane_layer(layer: nn.Module, path: str | os.PathLike, layer_index: int) -> dict[str, Any]:
    """Copy a single-layer checkpoint of layer `layer_index` into `layer` (a lane's own copy of it, not
    the shared model's); return meta. Strict as load_layer."""
    path = resolve_checkpoint(path)
    meta = _readable_meta(path)
    if meta.get("mode") != "single" or meta.get("layer") != layer_index:
        raise ValueError(f"checkpoint {path} was written by a {meta.get('mode')} run of layer {meta.get('layer')}, "
                         f"not a single-layer run of layer {layer_index}")
    _copy_checkpoint_into(layer, path, f"layer {layer_index}", type(layer).__name__)
    return meta


def _copy_checkpoint_into(target: nn.Module, path: Path, where: str, owner: str) -> None:
    tensors = _read_tensors(path)
    dest = target.state_dict()  # detached views of the live parameters/buffers: copy_ writes through
    problems = []
    if missing := sorted(set(dest) - set(tensors)):
        problems.append(f"missing keys {missing}")
    if unexpected := sorted(set(tensors) - set(dest)):
        problems.append(f"unexpected keys {unexpected}")
    if shapes := [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(dest[k].shape)}"
                  for k in sorted(set(dest) & set(tensors)) if tensors[k].shape != dest[k].shape]:
        problems.append(f"shape mismatches [{'; '.join(shapes)}]")
    if not problems:
        # Keys sharing storage in the model (tied embeddings) must get equal values, or the last
        # copy would silently win.
        _, model_aliases = _dedupe(dest)
        if conflicts := sorted(k for k, src in model_aliases.items() if not torch.equal(tensors[k], tensors[src])):
            problems.append(f"tied in the model but different in the checkpoint: {conflicts}")
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {where} of {owner}: " + "; ".join(problems))

    with torch.no_grad():
        for key, value in dest.items():
            value.copy_(tensors[key])


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Load the optimizer state into `optimizer`; return (step, trainer_state)."""
    path = resolve_checkpoint(path)
    file = path / OPTIMIZER_NAME
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {OPTIMIZER_NAME}: it cannot be resumed from")
    # weights_only=False: trainer_state may hold numpy RNG states, which the safe unpickler rejects.
    # optimizer.pt is written by save_checkpoint; as with any pickle, only resume from trusted checkpoints.
    saved = torch.load(file, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])  # moves state to each param's device itself
    return int(read_meta(path)["step"]), saved["trainer_state"]


def merge_checkpoint(model: nn.Module, path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Apply the checkpoint to `model` and write it (and `tokenizer`) as a standalone HF model directory.

    Written to a temp directory next to `out_dir` and renamed, so `out_dir` is either absent or complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"merge target {out_dir} already exists and is not an empty directory")
    load_layer(model, path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        if out_dir.exists():  # empty directory (checked above)
            out_dir.rmdir()
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
