"""Content-keyed feature cache on disk: sharded, resumable, verified, process-safe.

Layout: <root>/features/<dataset>/<split>/<backbone>-<key>/
    x.npy, y.npy      the whole key, one .npy each (memory-mapped by readers)
    shards/<k>.json   one record per finished shard: its rows and the sha256 of its bytes
    meta.json         written last, once every shard is recorded

Writers preallocate both files, then fill shard k's rows with positioned writes, fsync,
read the rows back and hash them, and only then record the shard (atomically). A
killed extraction resumes from its recorded shards; shards can be filled by several
processes at once (a lock per shard). An entry without meta.json is never served.

The integrity rule: every shard is hashed when it is written, and again the first
time a node opens the entry (the whole entry, block by block: a few batches of
memory). That first open leaves a node-local stamp (size, mtime and inode of both
files, the digest of meta.json); later opens on the node compare the stamp with
os.stat and the .npy headers with meta.json, and read no data. A changed file
(size, mtime or inode) is hashed again; a shard that fails is reported and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

ENV_CACHE = "LAMBDA_COMPAT_CACHE"
ENV_NODE_CACHE = "LAMBDA_COMPAT_NODE_CACHE"  # optional node-local folder (e.g. NVMe) that readers copy keys to
ARRAYS = ("x", "y")
DTYPES = ("float32", "float16")  # storage precision of a cache entry's x
SHARD_ROWS = 16384  # rows per shard: the unit of resume and of parallel extraction (a multiple of the
#   extraction batch size, so a sharded pass embeds the same batches as one pass)
READ_BLOCK = 8 << 20  # bytes hashed per read


class CacheWarning(UserWarning):
    """A cache entry failed verification and will be rebuilt (or resumed)."""


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


def _stamp_dir() -> Path:
    """Node-local folder of verification stamps (never on the shared cache)."""
    return Path(tempfile.gettempdir()) / f"lambda-compat-verified-{os.getuid()}"


def _npy_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) from a .npy header, reading only the header."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return f.tell(), tuple(shape), dtype


def _hash_range(fd: int, offset: int, length: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < length:
        chunk = os.pread(fd, min(READ_BLOCK, length - done), offset + done)
        if not chunk:
            break
        h.update(chunk)
        done += len(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of an entry, number `index`."""

    index: int
    start: int
    stop: int


def shards_of(n: int, shard_rows: int) -> list[Shard]:
    """The shards of an n-row entry, `shard_rows` rows each (the last may be shorter)."""
    return [Shard(k, a, min(n, a + shard_rows)) for k, a in enumerate(range(0, n, shard_rows))]


class Corrupt(Exception):
    """One-line description of why an entry (or some of its shards) cannot be served."""

    def __init__(self, message: str, bad: Iterable[int] = (), *, whole: bool = False) -> None:
        super().__init__(message)
        self.bad, self.whole = tuple(bad), whole


@dataclass(frozen=True)
class CacheEntry:
    """One feature set on disk (see the module docstring for the layout and the integrity rule)."""

    path: Path  # the entry's directory

    @classmethod
    def for_key(cls, root: Path, backbone: str, dataset: str, split: str, key: str) -> "CacheEntry":
        return cls(root / "features" / dataset / split / f"{backbone}-{key}")

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def file(self, array: str) -> Path:
        return self.path / f"{array}.npy"

    def record_path(self, k: int) -> Path:
        return self.path / "shards" / f"{k:05d}.json"

    def lock(self, timeout: float = -1) -> FileLock:
        """Inter-process lock for the whole entry (a sibling .lock file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=timeout)

    def shard_lock(self, k: int) -> FileLock:
        """Inter-process lock for shard k."""
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.record_path(k)) + ".lock")

    # ---- reading ---------------------------------------------------------------------------
    def complete(self) -> bool:
        return self.meta_path.is_file()

    def open(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """(x, y, meta), memory-mapped read-only, if the entry is complete and verifies; None if
        it is absent. Raises `Corrupt` (one line naming the file) when something there fails."""
        try:
            return self._open()
        except FileNotFoundError:
            return None

    def _open(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        try:
            raw = self.meta_path.read_bytes()
        except FileNotFoundError:
            present = [p for p in map(self.file, ARRAYS) if p.exists()]
            if present:
                raise Corrupt(f"{self.meta_path.name} is missing in {self.path} (an unfinished extraction)") from None
            raise
        try:
            meta = json.loads(raw)
            shapes = {a: tuple(meta[f"{a}_shape"]) for a in ARRAYS}
            dtypes = {a: np.dtype(meta[f"{a}_dtype"]) for a in ARRAYS}
            shards = [Shard(k, *s["rows"]) for k, s in enumerate(meta["shards"])]
        except (ValueError, KeyError, TypeError):
            raise Corrupt(f"{self.meta_path}: unreadable", whole=True) from None
        self._check_headers(shapes, dtypes)
        digest = hashlib.sha256(raw).hexdigest()
        if self._stamp() != self._stamp_now(digest):
            bad = self.verify(shards, [meta["shards"][s.index] for s in shards])
            if bad:
                raise bad
            self.write_stamp(digest)
        x = np.load(self.file("x"), mmap_mode="r", allow_pickle=False)
        y = np.load(self.file("y"), mmap_mode="r", allow_pickle=False)
        return x, y, meta

    def _check_headers(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
        for a in ARRAYS:
            f = self.file(a)
            try:
                offset, shape, dtype = _npy_offset(f)
            except FileNotFoundError:
                raise Corrupt(f"{f}: missing", whole=True) from None
            except ValueError as err:
                raise Corrupt(f"{f}: bad header ({err})", whole=True) from None
            if shape != shapes[a] or dtype != dtypes[a]:
                raise Corrupt(f"{f}: header {shape} {dtype} differs from its meta.json", whole=True)
            want = offset + int(np.prod(shape)) * dtype.itemsize
            size = f.stat().st_size
            if size != want:
                raise Corrupt(f"{f}: {size} bytes, expected {want} (truncated or altered)", whole=True)

    def verify(self, shards: list[Shard], records: list[dict[str, Any]]) -> Corrupt | None:
        """Hash every shard's rows in both files; a Corrupt naming the first bad one, or None."""
        bad: list[int] = []
        first = ""
        for a in ARRAYS:
            f = self.file(a)
            offset, shape, dtype = _npy_offset(f)
            row = int(np.prod(shape[1:])) * dtype.itemsize
            fd = os.open(f, os.O_RDONLY)
            try:
                for s, rec in zip(shards, records):
                    if _hash_range(fd, offset + s.start * row, (s.stop - s.start) * row) != rec[f"{a}_sha256"]:
                        bad.append(s.index)
                        first = first or f"{f}: shard {s.index} (rows {s.start}-{s.stop}) checksum mismatch (altered)"
            finally:
                os.close(fd)
        return Corrupt(first, sorted(set(bad))) if bad else None

    def _stamp_file(self) -> Path:
        return _stamp_dir() / (hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:32] + ".json")

    def _stamp(self) -> Any:
        try:
            return json.loads(self._stamp_file().read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _stamp_now(self, meta_digest: str) -> Any:
        files = {}
        for a in ARRAYS:
            st = self.file(a).stat()
            files[a] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return {"meta": meta_digest, "files": files}

    def write_stamp(self, meta_digest: str | None = None) -> None:
        """Record on this node that the entry, as it is now, verified."""
        if meta_digest is None:
            meta_digest = hashlib.sha256(self.meta_path.read_bytes()).hexdigest()
        atomic_write_bytes(self._stamp_file(), json.dumps(self._stamp_now(meta_digest)).encode())

    # ---- writing ---------------------------------------------------------------------------
    def prepare(self, n: int, dim: int, dtype: str, shard_rows: int) -> list[Shard]:
        """Create (or reuse) the preallocated files for an n x dim entry; returns the shards
        still to write. Existing shard records are verified first (a resumed extraction)."""
        shards = shards_of(n, shard_rows)
        want = {"x": ((n, dim), np.dtype(dtype)), "y": ((n,), np.dtype(np.int64))}
        with self.lock():
            layout = self.path / "layout.json"
            spec = {"n": n, "dim": dim, "dtype": str(np.dtype(dtype)), "shard_rows": shard_rows}
            try:
                same = json.loads(layout.read_text()) == spec
                for a in ARRAYS:
                    offset, shape, dt = _npy_offset(self.file(a))
                    size = offset + int(np.prod(want[a][0])) * want[a][1].itemsize
                    same = same and (shape, dt) == want[a] and self.file(a).stat().st_size == size
            except (FileNotFoundError, ValueError):
                same = False
            if not same:
                for p in (self.meta_path, *map(self.file, ARRAYS), layout):
                    p.unlink(missing_ok=True)
                for rec in (self.path / "shards").glob("*.json") if (self.path / "shards").is_dir() else ():
                    rec.unlink()
                self.path.mkdir(parents=True, exist_ok=True)
                for a in ARRAYS:
                    shape, dt = want[a]
                    m = np.lib.format.open_memmap(self.file(a), mode="w+", dtype=dt, shape=shape)  # sparse
                    del m
                atomic_write_bytes(layout, json.dumps(spec).encode())
            done = self._verified_records(shards)
        return [s for s in shards if s.index not in done]

    def _verified_records(self, shards: list[Shard]) -> set[int]:
        have, records = [], []
        for s in shards:
            rec = self.record(s.index)
            if rec is not None and rec["rows"] == [s.start, s.stop]:
                have.append(s)
                records.append(rec)
        if not have:
            return set()
        bad = self.verify(have, records)
        if bad is not None:
            warnings.warn(f"feature cache: {bad}; re-extracting {len(bad.bad)} shard(s)", CacheWarning, stacklevel=4)
            for k in bad.bad:
                self.record_path(k).unlink(missing_ok=True)
        return {s.index for s in have} - set(bad.bad if bad else ())

    def record(self, k: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(k).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_shard(self, shard: Shard, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """Write the shard's rows from (x, y) batches in row order, verify them, record the shard."""
        fds, offsets, rows, hashes = {}, {}, {}, {}
        try:
            for a in ARRAYS:
                offset, shape, dtype = _npy_offset(self.file(a))
                rows[a] = (int(np.prod(shape[1:])) * dtype.itemsize, dtype)
                offsets[a] = offset + shard.start * rows[a][0]
                fds[a] = os.open(self.file(a), os.O_RDWR)
                hashes[a] = hashlib.sha256()
            at = shard.start
            for x, y in batches:
                for a, arr in (("x", x), ("y", y)):
                    data = np.ascontiguousarray(arr, dtype=rows[a][1]).tobytes()
                    os.pwrite(fds[a], data, offsets[a] + (at - shard.start) * rows[a][0])
                    hashes[a].update(data)
                at += len(y)
            if at != shard.stop:
                raise RuntimeError(f"shard {shard.index}: got rows up to {at}, expected {shard.stop}")
            record: dict[str, Any] = {"rows": [shard.start, shard.stop]}
            for a in ARRAYS:
                os.fsync(fds[a])
                back = _hash_range(fds[a], offsets[a], (shard.stop - shard.start) * rows[a][0])
                if back != hashes[a].hexdigest():
                    raise OSError(f"{self.file(a)}: shard {shard.index} reads back differently than written")
                record[f"{a}_sha256"] = back
        finally:
            for fd in fds.values():
                os.close(fd)
        atomic_write_bytes(self.record_path(shard.index), json.dumps(record).encode())
        return record

    def finish(self, meta: dict[str, Any], n_shards: int) -> dict[str, Any] | None:
        """Write meta.json once every shard is recorded; returns the stored meta (None if shards are missing)."""
        with self.lock():
            if self.meta_path.is_file():
                return json.loads(self.meta_path.read_text())
            records = [self.record(k) for k in range(n_shards)]
            if any(r is None for r in records):
                return None
            out = {**meta, "shards": records}
            for a in ARRAYS:
                _, shape, dtype = _npy_offset(self.file(a))
                out[f"{a}_shape"], out[f"{a}_dtype"] = list(shape), str(dtype)
            atomic_write_bytes(self.meta_path, json.dumps(out, indent=1, sort_keys=True).encode())
            self.write_stamp()  # every shard was hashed as it was written
            return out

    def discard(self, bad: Corrupt) -> None:
        """Forget what `bad` found wrong: the whole entry, or just its bad shards' records."""
        with self.lock():
            self.meta_path.unlink(missing_ok=True)
            if bad.whole:
                for p in (*map(self.file, ARRAYS), self.path / "layout.json"):
                    p.unlink(missing_ok=True)
            for k in bad.bad:
                self.record_path(k).unlink(missing_ok=True)


@dataclass(frozen=True)
class Features:
    """Embeddings of one data set split: x [N, D] (float32, or float16 if stored so), y int64 [N],
    and metadata. From the cache both arrays are read-only memory maps.

    `meta["from_cache"]` says whether they were served from the cache (not stored);
    `meta["path"]` is the cache entry's directory.
    """

    x: np.ndarray
    y: np.ndarray
    meta: dict[str, Any]


@dataclass(frozen=True)
class Handle:
    """A complete cache entry, by path: what a study passes around instead of arrays."""

    path: str
    rows: int
    dim: int
    dtype: str
    from_cache: bool


def open_features(handle: Handle | str | Path) -> Features:
    """The arrays of a complete entry, memory-mapped read-only (verified on this node's first open).

    With env LAMBDA_COMPAT_NODE_CACHE set (a node-local disk), the entry is first copied there,
    once per node and per version of the entry, and the copy is what gets verified and mapped:
    random batch reads then hit local disk instead of the shared file system."""
    path = Path(handle.path if isinstance(handle, Handle) else handle)
    local = node_copy(path) if os.environ.get(ENV_NODE_CACHE) else path
    got = CacheEntry(local).open()
    if got is None:
        raise FileNotFoundError(f"{path}: no complete feature-cache entry here")
    x, y, meta = got
    from_cache = handle.from_cache if isinstance(handle, Handle) else True
    return Features(x, y, {**meta, "from_cache": from_cache, "path": str(path), "opened": str(local)})


def node_copy(path: Path) -> Path:
    """The node-local copy of the complete entry at `path` under $LAMBDA_COMPAT_NODE_CACHE, made if
    missing or stale (the source's meta.json and file stats are compared). A copy that fails
    verification is removed and reported as the source's fault (`Corrupt`)."""
    root = Path(os.environ[ENV_NODE_CACHE]).expanduser()
    local = root / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    src = CacheEntry(path)
    try:
        source = {"meta": hashlib.sha256(src.meta_path.read_bytes()).hexdigest(),
                  "files": {a: [src.file(a).stat().st_size, src.file(a).stat().st_mtime_ns] for a in ARRAYS}}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no complete feature-cache entry here") from None
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        stamp = local / "source.json"
        try:
            fresh = json.loads(stamp.read_text()) == source
        except (FileNotFoundError, ValueError):
            fresh = False
        if not fresh:
            if local.exists():
                shutil.rmtree(local)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{local.name}."))
            for a in ARRAYS:
                shutil.copyfile(src.file(a), tmp / f"{a}.npy")
            shutil.copyfile(src.meta_path, tmp / "meta.json")  # last: the copy is complete
            try:
                CacheEntry(tmp).open()  # hashes every shard of the copy against the records
            except Corrupt as bad:
                shutil.rmtree(tmp)
                raise Corrupt(f"{path}: its node-local copy failed verification ({bad})") from None
            atomic_write_bytes(tmp / "source.json", json.dumps(source).encode())
            os.replace(tmp, local)
            CacheEntry(local).write_stamp()
    return local


def write_features(x: np.ndarray, y: np.ndarray, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
                   shard_rows: int = SHARD_ROWS) -> Handle:
    """Store arrays computed elsewhere as a complete, verified cache entry at `path`; its Handle.

    x is [N, D] float32 or float16, y [N] integer labels. Written shard by shard like an extraction."""
    x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or str(x.dtype) not in DTYPES:
        raise ValueError(f"need x [N, D] of {DTYPES} and y [N], got x {x.shape} {x.dtype} and y {y.shape}")
    entry = CacheEntry(Path(path))
    todo = entry.prepare(x.shape[0], x.shape[1], str(x.dtype), shard_rows)
    for s in todo:
        entry.write_shard(s, [(x[s.start:s.stop], y[s.start:s.stop])])
    stored = entry.finish(dict(meta or {}), len(shards_of(x.shape[0], shard_rows)))
    assert stored is not None
    return Handle(str(entry.path), int(x.shape[0]), int(x.shape[1]), str(x.dtype), from_cache=False)
