"""Checkpoints of the trained tensors: atomic save, strict load, resume state, merge into a full HF model.

Layout of one checkpoint (`output_dir/checkpoint-000123/`):
    layer.safetensors   the trained tensors only: the target layer's state_dict (keys relative to the
                        layer, e.g. `self_attn.q_proj.weight`) in single-layer mode, the whole model's in
                        full mode (tied aliases such as `lm_head.weight` stored once, see `_dedupe`)
    meta.json           {"format_version", "mode", "layer", "num_layers", "step", **metadata, "sha256"}
    optimizer.pt        torch.save({"optimizer": ..., "trainer_state": ...}) for resuming
`output_dir/latest` holds the name of the newest complete checkpoint.

Integrity: meta.json's "sha256" holds {file name: hex digest} of layer.safetensors and optimizer.pt, taken at
save and checked at load (read_meta hides it). `latest_checkpoint` skips a damaged checkpoint (warning with
a CorruptCheckpointWarning) for the newest intact one; loading one damaged checkpoint by its path is a
ValueError naming the file. Checkpoints written before the digests were recorded have none and still load:
they get a structural check only (a safetensors header that fits the file, a complete zip for optimizer.pt).

Crash safety: a checkpoint is built in a `.tmp-checkpoint-*` directory, fsynced, and renamed into
place, so `checkpoint-*` directories are always complete; `latest` is replaced atomically after the
rename, so it never names a partial checkpoint. One writer per output_dir is assumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
CHECKSUMS_KEY = "sha256"  # meta.json: {file name: sha256 hex digest} of the tensor files
_CHECKSUMMED = (WEIGHTS_NAME, OPTIMIZER_NAME)
_META_KEYS = ("format_version", "mode", "layer", "num_layers", "step")
_RESERVED_META_KEYS = (*_META_KEYS, CHECKSUMS_KEY)
# safetensors header key holding {dropped_key: kept_key} for tensors that share storage (tied weights).
_ALIASES_KEY = "onelayer_fast.aliases"


class CorruptCheckpointWarning(UserWarning):
    """A damaged checkpoint (or `latest` pointer) was skipped for an older intact one."""


# ----------------------------------------------------------------------------------------- helpers

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
        json.dumps(meta)
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
        torch.save({"format_version": FORMAT_VERSION, "step": step,
                    "optimizer": optimizer.state_dict(), "trainer_state": trainer_state}, tmp / OPTIMIZER_NAME)
        # Digests of the bytes as written (read back from the page cache), into meta.json, written last.
        meta_text = json.dumps({**meta, CHECKSUMS_KEY: {name: _sha256(tmp / name) for name in _CHECKSUMMED}},
                               indent=2, sort_keys=False)
        (tmp / META_NAME).write_text(meta_text + "\n", encoding="utf-8")
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


def save_layer_weights(directory: str | os.PathLike, layer: nn.Module, layer_index: int, num_layers: int,
                       step: int, metadata: dict[str, Any] | None = None) -> Path:
    """Write one trained layer as `layer.safetensors` + `meta.json` into `directory` (created if missing): what
    `load_layer` and `merge_checkpoint` read, without the optimizer state of a resumable checkpoint (for trainers
    that keep their own, such as `onelayer_fast.trl`). meta.json is written last, so its presence means the
    weights are complete."""
    metadata = dict(metadata or {})
    if clash := sorted(set(metadata) & set(_RESERVED_META_KEYS)):
        raise ValueError(f"metadata may not set the reserved keys {clash}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(layer.state_dict())
    save_file({k: _to_cpu_copy(v) for k, v in tensors.items()}, str(directory / WEIGHTS_NAME),
              metadata={_ALIASES_KEY: json.dumps(aliases)} if aliases else None)
    _fsync_file(directory / WEIGHTS_NAME)
    meta = {"format_version": FORMAT_VERSION, "mode": "single", "layer": int(layer_index), "num_layers": int(num_layers),
            "step": int(step), **metadata, CHECKSUMS_KEY: {WEIGHTS_NAME: _sha256(directory / WEIGHTS_NAME)}}
    (directory / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    _fsync_file(directory / META_NAME)
    return directory


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
    """The checkpoint named by `output_dir/latest`, else the highest-step `checkpoint-*` directory, that is
    intact (verify_checkpoint); each damaged one passed over is reported with a CorruptCheckpointWarning.
    None if there is no checkpoint; ValueError naming the damage if there are only damaged ones. Temp
    directories are never returned."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(((s, p) for p in output_dir.iterdir() if (s := _checkpoint_step(p)) is not None), reverse=True)
    candidates = [p for _, p in found]
    named = _read_latest(output_dir)
    if named is not None:  # `latest` first; it is lost only by a crash between a rename and its update
        candidates = [named] + [p for p in candidates if p != named]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except (ValueError, FileNotFoundError) as error:
            problems.append(str(error))
            warnings.warn(f"skipping checkpoint {path}: {error}", CorruptCheckpointWarning, stacklevel=2)
            continue
        return path
    if problems:
        raise ValueError(f"no intact checkpoint in {output_dir}: {'; '.join(problems)}")
    return None


def _read_latest(output_dir: Path) -> Path | None:
    """The checkpoint `output_dir/latest` names, or None (with a warning when the pointer is unreadable)."""
    pointer = output_dir / LATEST_NAME
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _CHECKPOINT_RE.match(name):
        warnings.warn(f"ignoring {pointer}: it does not hold a checkpoint name", CorruptCheckpointWarning, stacklevel=3)
        return None
    if not (output_dir / name).is_dir():
        warnings.warn(f"ignoring {pointer}: it names {name}, which does not exist", CorruptCheckpointWarning,
                      stacklevel=3)
        return None
    return output_dir / name


def verify_checkpoint(path: str | os.PathLike) -> None:
    """ValueError (FileNotFoundError for a missing file) naming the file and the damage, unless every file of
    the checkpoint at `path` is intact: a meta.json this version reads, and tensor files whose sha256 is the
    one recorded at save (reads them all: a resume reads them anyway)."""
    path = Path(path)
    meta = _readable_meta(path)
    for name in _CHECKSUMMED:
        _verify_file(path, name, meta)


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
    """The checkpoint's meta.json (without the file digests); ValueError naming the file if it is damaged."""
    meta = _load_meta(resolve_checkpoint(path))
    meta.pop(CHECKSUMS_KEY, None)
    return meta


def _load_meta(path: Path) -> dict[str, Any]:
    file = path / META_NAME
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint file {file} is corrupt: not JSON ({error})") from None
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"checkpoint file {file} is corrupt: no {', '.join(missing)}")
    if not isinstance(meta.get(CHECKSUMS_KEY, {}), dict):
        raise ValueError(f"checkpoint file {file} is corrupt: {CHECKSUMS_KEY} is not a table of digests")
    return meta


# -------------------------------------------------------------------------------------------- load

def _readable_meta(path: Path) -> dict[str, Any]:
    """meta.json (digests included) of a checkpoint this version can read (ValueError for another
    format_version or a damaged meta.json)."""
    meta = _load_meta(resolve_checkpoint(path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format_version {meta.get('format_version')!r}, "
                         f"this version reads {FORMAT_VERSION}")
    return meta


def _verify_file(path: Path, name: str, meta: dict[str, Any]) -> None:
    """ValueError naming the file unless it is the one save_checkpoint wrote (FileNotFoundError if missing)."""
    if (damage := _file_damage(path, name, meta)) is not None:
        raise ValueError(damage)


def _file_damage(path: Path, name: str, meta: dict[str, Any]) -> str | None:
    """What is wrong with one file of a checkpoint, naming it; None if it is intact."""
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {name}")
    expected = meta.get(CHECKSUMS_KEY, {}).get(name)
    if expected is not None:
        actual = _sha256(file)
        if actual == expected:
            return None
        return (f"checkpoint file {file} is corrupt: its sha256 is {actual[:16]}..., not the {expected[:16]}... "
                f"recorded at save ({file.stat().st_size} bytes)")
    # A checkpoint from before digests were recorded: catch at least a truncated or emptied file.
    try:
        if name == WEIGHTS_NAME:
            with safe_open(str(file), framework="pt"):  # checks that the header fits and the file holds its data
                pass
        elif not zipfile.is_zipfile(file):  # torch.save writes a zip; a torn one has no central directory
            return f"checkpoint file {file} is corrupt: not a complete torch.save archive"
    except (SafetensorError, OSError) as error:
        return f"checkpoint file {file} is corrupt: {error}"
    return None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    file = str(path / WEIGHTS_NAME)
    try:
        tensors = load_file(file, device="cpu")
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
        aliases = json.loads(header.get(_ALIASES_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError) as error:  # past the digest: a damaged pre-digest file
        raise ValueError(f"checkpoint file {file} is corrupt: {error}") from None
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    return tensors


def _opened_for_weights(path: str | os.PathLike) -> tuple[Path, dict[str, Any], str | None]:
    """(checkpoint directory, its meta without the digests, what is wrong with its tensor file or None)."""
    path = resolve_checkpoint(path)
    meta = _readable_meta(path)
    damage = _file_damage(path, WEIGHTS_NAME, meta)
    meta.pop(CHECKSUMS_KEY, None)
    return path, meta, damage


def load_layer(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Copy the checkpoint's tensors into `model` in place (dtype and device of `model` kept); return meta.

    Strict: a different layer count, missing or unexpected keys, or shape mismatches raise ValueError
    before anything is modified.
    """
    path, meta, damage = _opened_for_weights(path)
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
    _copy_checkpoint_into(target, path, where, type(model).__name__, damage)
    return meta


def load_lane_layer(layer: nn.Module, path: str | os.PathLike, layer_index: int) -> dict[str, Any]:
    """Copy a single-layer checkpoint of layer `layer_index` into `layer` (a lane's own copy of it, not
    the shared model's); return meta. Strict as load_layer."""
    path, meta, damage = _opened_for_weights(path)
    if meta.get("mode") != "single" or meta.get("layer") != layer_index:
        raise ValueError(f"checkpoint {path} was written by a {meta.get('mode')} run of layer {meta.get('layer')}, "
                         f"not a single-layer run of layer {layer_index}")
    _copy_checkpoint_into(layer, path, f"layer {layer_index}", type(layer).__name__, damage)
    return meta


def _copy_checkpoint_into(target: nn.Module, path: Path, where: str, owner: str, damage: str | None) -> None:
    """`damage`: what _file_damage found wrong with the tensor file. It is reported after the fit checks, so a
    file rewritten with other tensors is told as what does not fit (and that its digest differs)."""
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
        raise ValueError(f"checkpoint {path} does not fit {where} of {owner}: " + "; ".join(problems)
                         + (f" ({damage})" if damage else ""))
    if damage:
        raise ValueError(damage)

    with torch.no_grad():
        for key, value in dest.items():
            value.copy_(tensors[key])


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Load the optimizer state into `optimizer`; return (step, trainer_state)."""
    path = resolve_checkpoint(path)
    file = path / OPTIMIZER_NAME
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {OPTIMIZER_NAME}: it cannot be resumed from")
    meta = _readable_meta(path)
    _verify_file(path, OPTIMIZER_NAME, meta)
    # weights_only=False: trainer_state may hold numpy RNG states, which the safe unpickler rejects.
    # optimizer.pt is written by save_checkpoint; as with any pickle, only resume from trusted checkpoints.
    try:
        saved = torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:  # a damaged pre-digest file
        raise ValueError(f"checkpoint file {file} is corrupt: {error}") from None
    optimizer.load_state_dict(saved["optimizer"])  # moves state to each param's device itself
    return int(meta["step"]), saved["trainer_state"]


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
