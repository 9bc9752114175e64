"""The manifest of a ``generate`` folder: per-rank record parts, reading them back, resuming."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from ..inspection import sha256_file
from .outputs import OutputFolderError

log = logging.getLogger("medsteer")

MANIFEST = "manifest.jsonl"
_PARTS = "manifest.parts"  # per-rank records of a run in progress; folded into MANIFEST at the end

# -------------------------------------------------------------------------------- records
_KINDS = ("unsteered", "steered", "gate", "mask")


def _record_problem(record) -> str | None:
    """What makes ``record`` something other than a manifest record medsteer wrote, else ``None``."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    ids = {}
    for key in ("prompt_index", "seed"):
        value = record.get(key)
        if type(value) is not int or value < 0:
            return f"{key} is {value!r}, not an integer >= 0"
        ids[key] = value
    if not isinstance(record.get("prompt"), str):
        return f"prompt is {record.get('prompt')!r}, not a string"
    settings = record.get("settings")
    if not isinstance(settings, dict):
        return f"settings is {type(settings).__name__}, not an object"
    vectors = settings.get("vectors", [])
    if not isinstance(vectors, list) or not all(isinstance(v, dict) for v in vectors):
        return "settings.vectors is not a list of objects"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "files is not an object of image entries"
    for kind, entry in files.items():
        expected = f"images/p{ids['prompt_index']:03d}-s{ids['seed']}-{kind}.png"
        if kind not in _KINDS:
            return f"files has an unknown kind {kind!r} (known: {', '.join(_KINDS)})"
        if not isinstance(entry, dict) or entry.get("path") != expected:
            return f"files.{kind} does not name {expected!r}"
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            return f"files.{kind}.sha256 is not a sha256 hex digest"
    return None


def _read_records(path: Path, in_progress: bool) -> list[dict]:
    """The records of a manifest (``in_progress=False``) or of a run's part file.

    A part file's last line without its newline is a record cut short by a crash or a full disk:
    it is skipped and its pair redone. Any other line that is not a record medsteer wrote is an
    error naming the file and line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail and in_progress:
        log.warning("%s ends in an unfinished record (%d bytes): its pair is redone", path, len(tail))
    elif tail:
        lines.append(tail)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _record_problem(record)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            problem = f"not JSON ({type(exc).__name__})"
        if problem is not None:
            raise OutputFolderError(
                f"{str(path)}:{number}: {problem}; this is not a pair record medsteer wrote: delete that line "
                "(its pair is then generated again), or use another --out folder"
            )
        records.append(record)
    return records


def _trim_unfinished_line(path: Path) -> None:
    """Cut a part file back to its last complete line, so the next record starts on a line of its own."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        end = handle.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            start = max(0, keep - (1 << 16))
            handle.seek(start)
            chunk = handle.read(keep - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < end:
            handle.truncate(keep)


def _append_record(fd: int, line: bytes) -> None:
    """Append one record line; on a write error (full disk) cut the file back to where it was."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _existing_records(out_dir: Path) -> dict[tuple[int, int], dict]:
    found: dict[tuple[int, int], dict] = {}
    for record in _read_records(out_dir / MANIFEST, in_progress=False):
        found[(record["prompt_index"], record["seed"])] = record
    for part in sorted((out_dir / _PARTS).glob("rank-*.jsonl")):
        for record in _read_records(part, in_progress=True):
            found[(record["prompt_index"], record["seed"])] = record
    return found


def _files_intact(out_dir: Path, record: dict) -> bool:
    for entry in record["files"].values():
        path = out_dir / entry["path"]  # images/p...png: checked by _record_problem
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return False
    return True


def _settings_difference(old: dict, new: dict) -> list[str]:
    def comparable(settings: dict) -> dict:
        out = dict(settings)
        out["vectors"] = [{k: v for k, v in entry.items() if k != "file"} for entry in settings.get("vectors", [])]
        return out

    a, b = comparable(old), comparable(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
