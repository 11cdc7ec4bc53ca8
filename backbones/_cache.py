"""Content-keyed feature cache on disk: checksummed .npy pairs, atomic writes, file locks.

Layout: <root>/features/<dataset>/<split>/<backbone>-<key>/{x.npy, y.npy, meta.json}.
`meta.json` is written last and holds the sha256 of both arrays; an entry
without it, or whose files do not match it, is never served.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

ENV_CACHE = "LAMBDA_COMPAT_CACHE"
_ARRAYS = ("x", "y")


class CacheWarning(UserWarning):
    """A cache entry failed verification and will be rebuilt."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `cache_dir`, else env LAMBDA_COMPAT_CACHE, else ~/.cache/lambda-compat."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lambda-compat"


def content_key(material: dict[str, Any]) -> str:
    """Short sha256 hex of a JSON-able description."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CacheEntry:
    """One feature set on disk."""

    path: Path  # the entry's directory

    @classmethod
    def for_key(cls, root: Path, backbone: str, dataset: str, split: str, key: str) -> "CacheEntry":
        return cls(root / "features" / dataset / split / f"{backbone}-{key}")

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def lock(self, timeout: float = -1) -> FileLock:
        """Inter-process lock for this entry (a sibling .lock file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=timeout)

    def read(self, *, warn: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """(x, y, meta) if the entry exists and verifies, else None; with `warn`, a
        CacheWarning naming the file when something was there but failed."""
        got, problem = self._load()
        if problem and warn:
            warnings.warn(f"feature cache: {problem}; re-extracting", CacheWarning, stacklevel=3)
        return got

    def _load(self) -> tuple[tuple[np.ndarray, np.ndarray, dict[str, Any]] | None, str]:
        """(arrays and meta, "") if sound; (None, "") if absent; else (None, a one-line fault).

        Each file is read once: its bytes are checksummed, then parsed.
        """
        if not self.meta_path.is_file():
            present = [p for p in (self.path / f"{a}.npy" for a in _ARRAYS) if p.exists()]
            return None, (f"{present[0]}: its meta.json is missing" if present else "")
        try:
            meta = json.loads(self.meta_path.read_text())
            sums, shapes = dict(meta["sha256"]), (meta["x_shape"], meta["y_shape"])
        except (ValueError, KeyError, TypeError):
            return None, f"{self.meta_path}: unreadable"
        arrays = []
        for a, shape in zip(_ARRAYS, shapes):
            f = self.path / f"{a}.npy"
            try:
                data = f.read_bytes()
            except FileNotFoundError:
                return None, f"{f}: missing"
            if hashlib.sha256(data).hexdigest() != sums.get(f"{a}.npy"):
                return None, f"{f}: checksum mismatch (truncated or altered)"
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if list(arr.shape) != list(shape):
                return None, f"{f}: shape {list(arr.shape)} differs from its meta.json"
            arrays.append(arr)
        return (arrays[0], arrays[1], meta), ""

    def write(self, x: np.ndarray, y: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        """Store arrays then meta (with checksums and shapes); returns the stored meta."""
        self.meta_path.unlink(missing_ok=True)  # a crash mid-write leaves no valid entry
        sums = {}
        for a, arr in zip(_ARRAYS, (x, y)):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            data = buf.getvalue()
            atomic_write_bytes(self.path / f"{a}.npy", data)
            sums[f"{a}.npy"] = hashlib.sha256(data).hexdigest()
        meta = {**meta, "x_shape": list(x.shape), "y_shape": list(y.shape), "sha256": sums}
        atomic_write_bytes(self.meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return meta
