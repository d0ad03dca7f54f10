"""Checkpoints: atomic writes, safe loads (``weights_only=True``), resumable random state.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — nothing that needs
unpickling code — so ``torch.load(..., weights_only=True)`` reads it and a file from an untrusted
source cannot run code. Writes are atomic (:mod:`e2pa.io`): a crash leaves either the old file or
the new one, never a torn one.

Integrity: each checkpoint carries ``payload_sha256``, a SHA-256 over every value it holds (tensor
bytes, dtypes and shapes included, in a fixed key order), computed before writing and verified on
load — a flipped byte inside the weights is reported, never loaded. The state is serialised in
memory first, so a failing disk (no space, read-only, I/O error) surfaces as an :class:`OSError`
naming the checkpoint, not as an error from inside ``torch.save``. :func:`save_checkpoint` with
``keep_previous=True`` keeps the file it replaces as ``<name>.previous.pt`` (hard link, then
rename: the target name exists at every moment).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import struct
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, os_errors_name

FORMAT_VERSION = 1
CHECKSUM_KEY = "payload_sha256"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, wrong format); names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict, *, keep_previous: bool = False) -> Path:
    """Write ``state`` (plus the format version and its checksum) atomically with ``torch.save``;
    with ``keep_previous`` the file it replaces stays as :func:`previous_path`."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **state}
    payload[CHECKSUM_KEY] = payload_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory: a disk error comes from atomic_write, as an OSError naming path
    data = buffer.getbuffer()
    if keep_previous and path.is_file():
        previous = previous_path(path)
        link = previous.with_name(f".{previous.name}.link")
        with os_errors_name(previous):
            if link.exists():
                link.unlink()
            try:
                os.link(path, link)
            except OSError:  # no hard links on this file system: a copy, written atomically
                atomic_write(link, lambda f: f.write(path.read_bytes()))
            os.replace(link, previous)
    return atomic_write(path, lambda f: f.write(data))


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``last.pt`` → ``last.previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def payload_digest(state: dict) -> str:
    """SHA-256 (hex) over every entry of ``state`` except the digest itself: keys in sorted order,
    tensors as dtype + shape + raw bytes, other values by type and ``repr``."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"D" + struct.pack("<q", len(value)))
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode() + b"=")
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<q", len(value)))
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` and verify its checksum; a clear
    :class:`CheckpointError` otherwise (for a corrupt file it names the alternatives beside it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes: all unusable the same way
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})"
            f"{_alternatives(path)}"
        ) from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not an e2pa checkpoint (format_version "
            f"{state.get('format_version') if isinstance(state, dict) else None!r}, "
            f"expected {FORMAT_VERSION})"
        )
    expected = state.get(CHECKSUM_KEY)
    if expected is None:
        log.warning("checkpoint %s has no checksum (written by an older e2pa); its integrity is not verified", path)
    elif payload_digest(state) != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written "
            f"with it (damaged on disk or in transfer){_alternatives(path)}"
        )
    return state


def _alternatives(path: Path) -> str:
    """``; intact alternatives: …`` for the checkpoints beside a damaged one (best.pt, the previous one)."""
    names = [previous_path(path), path.with_name("best.pt"), previous_path(path.with_name("best.pt"))]
    found = [str(p) for p in names if p != path and p.is_file()]
    if not found:
        return ""
    return (
        "; other checkpoints in that folder: "
        + ", ".join(found)
        + (" (train --resume --resume-from previous|best uses them)" if path.name == "last.pt" else "")
    )


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generators as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
