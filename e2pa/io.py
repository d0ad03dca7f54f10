"""Atomic file writes: a crash leaves the old file or the new one, never a torn one.

Every file e2pa writes for a user (checkpoints, metrics, reports, pictures, predictions) goes
through here or through :func:`e2pa.data.nifti.save_volume`: write a temporary file in the target's
folder, flush it to disk, rename it over the target.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class OutputExistsError(FileExistsError):
    """An output would overwrite a file the user has; the message says how to allow it."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, overwrite: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename onto ``path``.

    With ``overwrite=False`` an existing ``path`` raises :class:`OutputExistsError` and is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def atomic_save_figure(figure: Any, path: str | os.PathLike, *, overwrite: bool = True, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: figure.savefig(f, format=fmt, **savefig_kwargs), overwrite=overwrite)


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows of dicts as CSV text (columns: ``fieldnames`` or the first row's keys)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
