"""What a stage's inputs *are*, not what they are called: content hashes of the files and folders
a pipeline file names (data files, teacher and student folders, tokenizers).

A stage's fingerprint folds these in, so a data file fixed in place, or a teacher folder
overwritten at the same path, reruns the stages that read it instead of reusing stale artifacts.
Hashing a large teacher every run would cost seconds to minutes, so each file's SHA-256 is kept
in ``<artifact_root>/.content-hashes.json`` keyed by its path, size and modification time, and a
file is read again only when one of those changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from filelock import FileLock

log = logging.getLogger("flexkd")

HASH_CACHE = ".content-hashes.json"
_CHUNK = 1 << 20


def content_fingerprints(locations: dict[str, str | None], artifact_root: str) -> dict[str, str]:
    """``{field: sha256}`` for each location that is a local file or folder.

    Locations that are not on this machine's disk (``models:/...``, ``s3://...``, unset) keep
    their name as their identity: their content is versioned by whoever serves them.
    """
    cache_path = Path(artifact_root) / HASH_CACHE
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_path) + ".lock"):
            cache = _read_cache(cache_path)
            before = dict(cache)
            digests = _digests(locations, cache)
            if cache != before:
                temporary = cache_path.with_suffix(".tmp")
                temporary.write_text(json.dumps(cache, sort_keys=True))
                os.replace(temporary, cache_path)
    except OSError as error:
        # The hash cache only saves time: on storage that cannot take it (full, read-only, not a
        # folder) hash without it, and let the stage that writes there report the problem.
        log.debug("content hashes not cached under %s: %s", artifact_root, error)
        digests = _digests(locations, {})
    return digests


def _digests(locations: dict[str, str | None], cache: dict[str, str]) -> dict[str, str]:
    return {
        field: _digest(Path(location), cache) if location and Path(location).exists() else str(location)
        for field, location in locations.items()
    }


def _digest(path: Path, cache: dict[str, str]) -> str:
    if path.is_file():
        return _file_digest(path, cache)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    listing = [(str(p.relative_to(path)), _file_digest(p, cache)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _file_digest(path: Path, cache: dict[str, str]) -> str:
    status = path.stat()
    key = f"{path.resolve()}:{status.st_size}:{status.st_mtime_ns}"
    if key not in cache:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        cache[key] = digest.hexdigest()
    return cache[key]


def _read_cache(path: Path) -> dict[str, str]:
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # none yet, or cut short: rebuilt as files are read
        return {}
    return cache if isinstance(cache, dict) else {}
