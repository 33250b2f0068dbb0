"""Storage manager: durable writes, keep-last-k, shard consolidation, an LRU cache folder, a size report.

Durability rule used everywhere here: write to a temp file in the same folder -> flush + fsync ->
os.replace onto the final name -> fsync the folder. A marker written last (the same way) is what makes
an output count as finished; anything without its marker is treated as never written.

Consolidated file formats (`consolidate`):
- all shards end in `.pt` and hold a dict of tensors: the output is `torch.save` of one dict whose
  tensors are the shards' tensors concatenated along dim 0 per key, in shard order (`torch.load` it
  with weights_only=True).
- otherwise: a "frugal container": 8 bytes magic b"FRUGALC1", 8 bytes little-endian header length,
  a UTF-8 JSON header {"version": 1, "members": [{"name", "offset", "bytes"}]} and then the shard
  bytes back to back (offsets count from the end of the header). Read it with `read_container`.
The marker `<out>.done` is JSON: sha256 and size of the output, the shard paths (and, with
manifest=True, each shard's size and sha256 so a rerun never deletes a shard rewritten since).

Why one module of ~540 lines: every function here follows the one durability rule above and the
consolidate/LRU/report parts share its helpers; split it only if a second rule appears.
"""
import errno
import hashlib
import io
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

CONTAINER_MAGIC = b"FRUGALC1"
_READ_CHUNK = 1 << 20  # bytes read at a time when hashing/copying


class StorageError(OSError):
    """A storage problem (disk full, incomplete or mismatched output); the message says how to fix it."""


# ---------------------------------------------------------------- durable-write helpers

def fsync_dir(folder):
    """fsync a folder so a rename/create inside it survives a power loss (no-op where unsupported)."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename itself
        return
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write, durable):
    """The durability rule: `write(f)` into a temp file in the same folder -> flush (+ fsync) -> os.replace onto
    `path` (+ fsync of the folder); the temp file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` via temp file + os.replace (+ fsync of file and folder when durable)."""
    return _atomic_write(path, lambda f: f.write(data), durable)


class HashingWriter:
    """A write-only, unseekable file: bytes go to `file` and into a sha256 as they pass (one pass, no copy)."""

    def __init__(self, file):
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def read(self, *_):  # np.savez takes an object with `read` for a file, not a path; never called in mode "w"
        raise io.UnsupportedOperation("write-only")


def atomic_write_stream(path, write, durable: bool = True) -> tuple[int, str]:
    """Like atomic_write_bytes, for data made while it is written: `write(f)` writes into an unseekable file
    object (zipfile and np.savez accept one); returns (bytes, sha256 hex) of what was written, hashed on the way."""
    hashed = []

    def write_hashed(f):
        hashed.append(HashingWriter(f))
        write(hashed[0])
    _atomic_write(path, write_hashed, durable)
    return hashed[0].bytes, hashed[0].sha256.hexdigest()


def atomic_write_json(path, obj, durable: bool = True) -> Path:
    """Write `obj` as JSON to `path` atomically (see atomic_write_bytes)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode(), durable=durable)


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def format_bytes(n: int) -> str:
    """Human-readable size with decimal units (1 KB = 1000 B), e.g. '1.2 GB'."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path` or its nearest existing parent."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def disk_full_error(exc: BaseException) -> OSError | None:
    """The OSError ENOSPC/EDQUOT behind `exc` (itself, or in its __cause__/__context__ chain), else None.

    torch's zip writer, for one, reports a failed write as a RuntimeError whose __context__ is the ENOSPC.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def check_free_space(path, need_bytes: int, what: str, hint: str = ""):
    """Raise StorageError before writing `need_bytes` of `what` under `path` if the disk cannot hold it."""
    where = _existing_ancestor(Path(path))
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        advice = hint or "delete old runs/checkpoints or point this output to a larger disk"
        raise StorageError(
            errno.ENOSPC,
            f"not enough disk space for {what}: need {format_bytes(need_bytes)}, only "
            f"{format_bytes(free)} free on {_mount_point(where)} (writing under {path}); free space: {advice}")


# ---------------------------------------------------------------- keep-last-k

_STEP_RE = re.compile(r"step[-_]?(\d+)")
_INT_RE = re.compile(r"(\d+)")


def _step_number(name: str):
    m = _STEP_RE.search(name)
    if m:
        return int(m.group(1))
    ints = _INT_RE.findall(name)
    return int(ints[-1]) if ints else None


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def keep_last(folder, pattern: str, k: int) -> list[Path]:
    """Delete all but the newest `k` entries of `folder` matching the glob `pattern`; return the deleted.

    Newest means the highest step number in the name ('step-120', else the last integer) when every
    match has one, else the latest modification time.
    """
    if k < 0:
        raise ValueError(f"keep_last: k must be >= 0 (entries to keep), got {k}")
    if "/" in pattern or "\\" in pattern or ".." in pattern:
        raise ValueError(f"keep_last: pattern must match names inside the folder only, got {pattern!r}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    matches = list(folder.glob(pattern))
    steps = [_step_number(p.name) for p in matches]
    if matches and all(s is not None for s in steps):
        order = sorted(zip(steps, [p.stat().st_mtime_ns for p in matches], matches),
                       key=lambda t: (t[0], t[1]))
    else:
        order = sorted(((0, p.stat().st_mtime_ns, p) for p in matches), key=lambda t: t[1])
    doomed = [p for _, _, p in order[:max(0, len(order) - k)]]
    for p in doomed:
        _remove(p)
    if doomed:
        fsync_dir(folder)
    return doomed


# ---------------------------------------------------------------- consolidation

def _marker_path(out: Path) -> Path:
    return out.with_name(out.name + ".done")


def _read_marker(out: Path):
    try:
        return json.loads(_marker_path(out).read_text())
    except (OSError, ValueError):
        return None


def verify(path) -> bool:
    """True if `path` has a `<path>.done` marker whose size and sha256 match the file."""
    path = Path(path)
    marker = _read_marker(path)
    if not isinstance(marker, dict) or not path.is_file():
        return False
    if marker.get("bytes") != path.stat().st_size:
        return False
    return marker.get("sha256") == sha256_file(path)


def _write_pt(shards: list[Path], tmp: Path):
    import torch  # local: the byte-container path works without torch
    merged = None
    for shard in shards:
        try:
            data = torch.load(shard, map_location="cpu", weights_only=True)
        except Exception as e:
            raise StorageError(f"cannot read shard {shard} ({type(e).__name__}: {e}); it is corrupt or not a "
                               f"torch.save file: remove it from the list or rename it away from .pt") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) and v.dim() >= 1
                                                  for v in data.values()):
            raise StorageError(f"shard {shard} must hold a dict of tensors with a leading dim to concatenate "
                               f"along; got {type(data).__name__}. Save shards as {{name: tensor (N, ...)}}")
        if merged is None:
            merged = {key: [t] for key, t in data.items()}
        elif set(data) != set(merged):
            raise StorageError(f"shard {shard} has keys {sorted(data)} but earlier shards have {sorted(merged)}; "
                               f"all .pt shards must hold the same keys")
        else:
            for key, t in data.items():
                merged[key].append(t)
    out = {key: torch.cat(parts, dim=0) for key, parts in merged.items()}  # (sum N_i, ...) per key
    with open(tmp, "wb") as f:
        torch.save(out, f)
        f.flush()
        os.fsync(f.fileno())


def _write_container(shards: list[Path], tmp: Path):
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise StorageError(f"shards with the same file name cannot share a container: {names}; rename them")
    members, offset = [], 0
    for shard in shards:
        size = shard.stat().st_size
        members.append({"name": shard.name, "offset": offset, "bytes": size})
        offset += size
    header = json.dumps({"version": 1, "members": members}).encode()
    with open(tmp, "wb") as f:
        f.write(CONTAINER_MAGIC + struct.pack("<Q", len(header)) + header)
        for shard, member in zip(shards, members):
            copied = 0
            with open(shard, "rb") as src:
                for chunk in iter(lambda: src.read(_READ_CHUNK), b""):
                    f.write(chunk)
                    copied += len(chunk)
            if copied != member["bytes"]:
                raise StorageError(f"shard {shard} changed size while being consolidated; "
                                   f"stop the writer of this shard and rerun")
        f.flush()
        os.fsync(f.fileno())


def read_container(path) -> dict[str, bytes]:
    """Read a frugal container written by `consolidate` into {member name: bytes}."""
    with open(path, "rb") as f:
        magic = f.read(len(CONTAINER_MAGIC))
        if magic != CONTAINER_MAGIC:
            raise StorageError(f"{path} is not a frugal container (bad magic {magic!r}); "
                               f".pt consolidations are read with torch.load(weights_only=True)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = f.tell()
        out = {}
        for m in header["members"]:
            f.seek(base + m["offset"])
            out[m["name"]] = f.read(m["bytes"])
            if len(out[m["name"]]) != m["bytes"]:
                raise StorageError(f"{path} is truncated inside member {m['name']}; rebuild it from the shards")
    return out


def _finish_deletion(marker: dict, out: Path) -> None:
    """Delete the shards a verified consolidation holds, skipping any rewritten since (size or hash differs)."""
    import warnings
    folders = set()
    for entry in marker["shards"]:
        shard = Path(entry["path"])
        if not shard.exists():
            continue
        if shard.stat().st_size != entry["bytes"] or ("sha256" in entry and sha256_file(shard) != entry["sha256"]):
            warnings.warn(f"not deleting {shard}: its content changed after it was consolidated into {out}")
            continue
        _delete_shard(shard)
        folders.add(shard.parent)
    for folder in folders:
        fsync_dir(folder)


def _delete_shard(shard: Path):
    # one function so a test can simulate a crash between consolidation and deletion
    shard.unlink()


def consolidate(shards: list[Path], out: Path, manifest: bool = True) -> Path:
    """Concatenate `shards` into `out` durably, then delete them; safe to rerun after a crash at any point.

    See the module docstring for the two formats and the `<out>.done` marker; manifest=True records
    each shard's size and sha256 so a rerun only deletes shards that are byte-identical to what `out` holds.
    """
    out = Path(out)
    shards = [Path(s) for s in shards]
    resolved = [str(s.resolve()) for s in shards]
    if str(out.resolve()) in resolved:
        raise ValueError(f"consolidate: the output {out} is also listed as a shard; choose another output path")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"consolidate: a shard is listed twice in {[str(s) for s in shards]}")

    marker = _read_marker(out)
    if marker is not None:
        done = {e["path"] for e in marker.get("shards", [])}
        if out.is_file() and verify(out):
            extra = [r for r in resolved if r not in done]
            if extra:
                raise StorageError(f"{out} is already a finished consolidation of other shards and cannot take "
                                   f"{extra}; write them to a new output path")
            _finish_deletion(marker, out)  # a previous run crashed before/while deleting
            return out
        missing = [r for r in done if not Path(r).exists()]
        if missing:
            raise StorageError(f"{out} does not match its checksum marker and shards {missing} are already "
                               f"deleted; nothing was deleted now. Restore the shards from a backup or "
                               f"accept the loss by removing {_marker_path(out)}")
        _marker_path(out).unlink()  # corrupt output with all shards present: redo from the shards
        fsync_dir(out.parent)
    if not shards:
        raise ValueError("consolidate: no shards given and no finished output to complete")
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise StorageError(f"consolidate: shards not found: {missing}; nothing was written or deleted")

    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(s.stat().st_size for s in shards)
    check_free_space(out.parent, total, f"consolidated file {out}")
    fmt = "pt-concat" if all(s.suffix == ".pt" for s in shards) else "frugal-container-v1"
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        (_write_pt if fmt == "pt-concat" else _write_container)(shards, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)

    entries = []
    for s, r in zip(shards, resolved):
        entry = {"path": r, "bytes": s.stat().st_size}
        if manifest:
            entry["sha256"] = sha256_file(s)
        entries.append(entry)
    marker = {"format": fmt, "bytes": out.stat().st_size, "sha256": sha256_file(out),
              "shards": entries, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(_marker_path(out), marker)  # from here on `out` counts as finished
    _finish_deletion(marker, out)
    return out


# ---------------------------------------------------------------- LRU cache folder

_INDEX_NAME = ".lru-index.json"


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"cache item name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or os.path.isabs(name):
        raise ValueError(f"cache item name must be a plain file name (no '/', '\\', '..' or absolute path), "
                         f"got {name!r}")
    if name.startswith("."):
        raise ValueError(f"cache item names starting with '.' are reserved for the cache's own files, got {name!r}")
    return name


class LRUCache:
    """A folder of files capped at `max_bytes`; the least recently used files are evicted first.

    Recency lives in `<folder>/.lru-index.json` (a use counter, not atime/mtime, whose resolution
    is too coarse); files found without an index entry count as older than all indexed ones. One
    process writes a given cache folder at a time.
    """

    def __init__(self, folder, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"LRUCache max_bytes must be a positive int (bytes), got {max_bytes!r}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load_index()

    def _load_index(self):
        try:
            index = json.loads((self.folder / _INDEX_NAME).read_text())
            used = {str(k): int(v) for k, v in index["used"].items()}
            self._clock = int(index["clock"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            used, self._clock = {}, 0
        present = {p.name: p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        # unindexed files: older than everything indexed, ordered among themselves by mtime
        unindexed = sorted((n for n in present if n not in used), key=lambda n: present[n].stat().st_mtime_ns)
        self._used = {n: -len(unindexed) + i for i, n in enumerate(unindexed)}
        self._used.update({n: c for n, c in used.items() if n in present})

    def _save_index(self):
        atomic_write_json(self.folder / _INDEX_NAME, {"clock": self._clock, "used": self._used}, durable=False)

    def _touch(self, name):
        self._clock += 1
        self._used[name] = self._clock

    def _sizes(self) -> dict[str, int]:
        sizes = {}
        for name in list(self._used):
            try:
                sizes[name] = (self.folder / name).stat().st_size
            except FileNotFoundError:  # removed behind our back
                del self._used[name]
        return sizes

    def put(self, name: str, data: bytes) -> Path:
        """Store `data` under `name` (atomic write), evicting least-recently-used files to stay under the cap."""
        _check_name(name)
        data = bytes(data)
        if len(data) > self.max_bytes:
            raise ValueError(f"cache item {name!r} is {format_bytes(len(data))}, more than the whole cache cap "
                             f"{format_bytes(self.max_bytes)}; raise max_bytes or do not cache it")
        sizes = self._sizes()
        sizes.pop(name, None)  # replaced in place
        total = sum(sizes.values())
        for victim in sorted(sizes, key=self._used.__getitem__):
            if total + len(data) <= self.max_bytes:
                break
            (self.folder / victim).unlink(missing_ok=True)
            total -= sizes[victim]
            del self._used[victim]
        path = atomic_write_bytes(self.folder / name, data)
        self._touch(name)
        self._save_index()
        return path

    def get(self, name: str) -> bytes | None:
        """The bytes stored under `name` (marking it most recently used), or None if not cached."""
        _check_name(name)
        try:
            data = (self.folder / name).read_bytes()
        except FileNotFoundError:
            self._used.pop(name, None)
            return None
        self._touch(name)
        self._save_index()
        return data

    def __contains__(self, name) -> bool:
        return (self.folder / _check_name(name)).is_file()

    def size_bytes(self) -> int:
        """Total bytes of the cached files (the small index file is not counted)."""
        return sum(self._sizes().values())


# ---------------------------------------------------------------- report

def _tree_bytes(path: Path) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):  # symlinks counted as links, never followed
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted while walking
                pass
    return total


def storage_report(paths: dict[str, Path]) -> dict[str, int]:
    """Bytes per category: {category: recursive apparent size of its file or folder}; missing paths are 0."""
    return {category: _tree_bytes(Path(p)) for category, p in paths.items()}


_RUN_CATEGORIES = {".jsonl": "metrics", ".json": "metrics", ".csv": "metrics", ".yaml": "config", ".md": "reports",
                   ".png": "plots"}


def run_report(run_dir) -> dict[str, int]:
    """Bytes per category inside one run folder: checkpoints, metrics, config, reports, plots, other."""
    report = {}
    for path in sorted(Path(run_dir).rglob("*")):
        if not path.is_file():
            continue
        in_checkpoints = "checkpoints" in path.relative_to(run_dir).parts
        category = "checkpoints" if in_checkpoints else _RUN_CATEGORIES.get(path.suffix, "other")
        report[category] = report.get(category, 0) + path.stat().st_size
    return report


def format_report(report: dict[str, int]) -> str:
    """One line such as 'checkpoints 1.2 GB | metrics 3.1 KB | total 1.2 GB'."""
    parts = [f"{category} {format_bytes(n)}" for category, n in report.items()]
    if len(report) > 1:
        parts.append(f"total {format_bytes(sum(report.values()))}")
    return "storage: " + " | ".join(parts)


# ---------------------------------------------------------------- LRU helpers for shared cache folders

def lru_touch(cache: LRUCache, name: str) -> bool:
    """Mark `name` most recently used without reading it (a reader that reads parts of a file); False if absent."""
    _check_name(name)
    if not (cache.folder / name).is_file():
        cache._used.pop(name, None)
        return False
    cache._touch(name)
    cache._save_index()
    return True


def lru_shrink(cache: LRUCache) -> list[str]:
    """Evict least-recently-used files until the cache is within its cap (after the cap was lowered); oldest first."""
    sizes = cache._sizes()
    total = sum(sizes.values())
    evicted = []
    for victim in sorted(sizes, key=cache._used.__getitem__):
        if total <= cache.max_bytes:
            break
        (cache.folder / victim).unlink(missing_ok=True)
        total -= sizes[victim]
        del cache._used[victim]
        evicted.append(victim)
    if evicted:
        cache._save_index()
    return evicted
