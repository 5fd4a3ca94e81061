"""The checkpoint format: one ``.pt`` file and a ``.pt.json`` sidecar with its SHA-256.

A checkpoint is a dict of tensors and plain values (model, optimizer, schedule, step, epoch, loader position,
RNG states, the resolved config and the tokenizer), read with ``weights_only=True`` so that opening one never
runs code. Writing goes to a hidden temporary name, is flushed to disk and renamed, and the checksum computed
while writing goes to the sidecar last: a crash at any moment leaves every earlier checkpoint as it was, and a
file that was damaged afterwards is caught on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_training.errors import UserError
from llm_training.fileio import fsync_dir, new_temp
from llm_training.limits import json_loads

log = logging.getLogger("llm_training.checkpoint")

CHECKPOINT_VERSION = 2
_STEP_FILE = re.compile(r"^model_step_(\d+)\.pt$")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")
_HASH_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint that cannot be read: missing, truncated, corrupted or not ours."""


# --------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, as values ``weights_only`` loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- writing


class _HashingWriter:
    """A file wrapper that hashes what passes through, so the checksum costs no second read."""

    def __init__(self, handle) -> None:
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch's zip writer masks it with its own error on the way out

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _open_tmp(path: Path):
    """The file a checkpoint is first written to (tests replace this to simulate a full disk)."""
    return open(path, "wb")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_checkpoint(path: str | Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` atomically with a checksum sidecar; ``meta`` (step, validation loss...) goes there too.

    A crash mid-write leaves the previous file under ``path`` (if any) untouched; on an error the temporary
    file is removed and the error raised, so no partial checkpoint is ever left under a real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fresh names (O_EXCL), so a planted symlink is never followed; the pid lets resume clear stale ones
    side, side_tmp, tmp = sidecar_path(path), None, new_temp(path, f".tmp-{os.getpid()}")
    try:
        with _open_tmp(tmp) as handle:
            writer = _HashingWriter(handle)
            try:
                torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        record = {
            "format": "llm_training checkpoint",
            "version": CHECKPOINT_VERSION,
            "file": path.name,
            "sha256": writer.sha256.hexdigest(),
            "bytes": writer.size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(meta or {}),
        }
        side_tmp = new_temp(side, f".tmp-{os.getpid()}")
        with open(side_tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        side.unlink(missing_ok=True)  # never pair new weights with an old checksum
        os.replace(tmp, path)
        os.replace(side_tmp, side)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if side_tmp is not None:
            side_tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------- reading


_SIDECAR_LIMIT = 1 << 20  # a real one is a few hundred bytes; a bigger file is not ours
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sidecar_problem(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the sidecar's record, None), (None, None) when there is none, or (None, what is wrong with it): a
    damaged sidecar (not JSON, not an object, fields of the wrong type, huge) never vouches for a file."""
    side = sidecar_path(path)
    try:
        if side.stat().st_size > _SIDECAR_LIMIT:
            return None, f"its checksum file {side.name} is damaged (over {_SIDECAR_LIMIT:,} bytes)"
        record = json_loads(side.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"its checksum file {side.name} cannot be read ({exc.strerror or exc})"
    except ValueError:  # not UTF-8 or not JSON
        return None, f"its checksum file {side.name} is damaged (not JSON)"
    if not isinstance(record, dict):
        return None, f"its checksum file {side.name} is damaged (not a JSON object)"
    wrong = [
        key
        for key, ok in (
            ("sha256", isinstance(record.get("sha256"), str) and _SHA256.match(record["sha256"])),
            ("bytes", "bytes" not in record or _count(record["bytes"])),
            ("step", "step" not in record or _count(record["step"])),
            ("val_loss", record.get("val_loss") is None or isinstance(record["val_loss"], (int, float))),
        )
        if not ok
    ]
    if wrong:
        return None, f"its checksum file {side.name} is damaged ({', '.join(wrong)} missing or not valid)"
    return record, None


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar's record; None when it is missing or damaged."""
    return sidecar_problem(path)[0]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def archive_problem(path: str | Path) -> str | None:
    """None when every member of the zip archive reads back with its CRC-32 (a ``torch.save`` archive
    records one per tensor and for the pickle), streamed; else what is wrong. Checks a checkpoint whose
    sidecar is missing: one flipped byte anywhere in the data is caught."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:  # zipfile checks the CRC-32 at the member's end
                    while member.read(_HASH_CHUNK):
                        pass
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc) or "header" in str(exc).lower():
            return f"corrupted: {str(exc).strip()[:200]} (a zip member does not match its checksum)"
        return (
            "not a readable checkpoint (not a whole zip archive as torch.save writes: truncated, or "
            "another file)"
        )
    except (EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error) as exc:
        return f"corrupted: the archive cannot be read ({str(exc).strip()[:200] or type(exc).__name__})"
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the file matches its sidecar, or (without one) every member matches its CRC-32; else what
    is wrong, in a few words."""
    path = Path(path)
    record, problem = sidecar_problem(path)
    if problem:
        return problem
    if record is None:
        return archive_problem(path)
    size = path.stat().st_size
    if size != record.get("bytes", size):
        return f"truncated or extended: {size:,} bytes, its checksum file says {record['bytes']:,}"
    if file_sha256(path) != record["sha256"]:
        return "corrupted: its SHA-256 does not match its checksum file"
    return None


def _is_torchscript(path: Path) -> bool:
    """Whether the archive at ``path`` is a TorchScript one (code and constants, which only
    ``torch.jit.load`` reads): looked at only to say so in an error, never to load it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Read a checkpoint without running any code from it (``weights_only=True``), checking its checksum."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file such as {path}/model_final.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = verify_checkpoint(path) if verify else None
    if problem and problem.startswith("not a readable checkpoint"):
        raise CheckpointError(f"{path}: {problem}")
    if problem and problem.startswith("its checksum file"):
        raise CheckpointError(
            f"{path}: {problem}; if the checkpoint itself is intact, delete {sidecar_path(path).name} to "
            "have it checked by its archive's CRC-32s, else resume from an earlier checkpoint"
        )
    if problem:
        raise CheckpointError(
            f"{path}: {problem}; resume from an earlier checkpoint (--resume auto finds one)"
        )
    if _is_torchscript(path):  # torch.load would refuse it with a warning and a paragraph
        raise CheckpointError(
            f"{path}: a TorchScript archive, not a checkpoint of this tool; if you trust it (loading "
            "TorchScript runs its code), pass --format torchscript"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure of the (restricted) unpickler: the file is not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an llm_training checkpoint (no model or config inside)")
    return state


def checkpoint_tokenizer(path: str | Path) -> str | None:
    """The tokenizer JSON a checkpoint was trained with, read cheaply (the tensors memory-mapped, not read,
    nothing verified: a check before a run, whose own load verifies); None if it cannot be read."""
    import warnings

    if _is_torchscript(Path(path)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a checkpoint: the run's own load says so
        return None
    value = state.get("tokenizer_json") if isinstance(state, dict) else None
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------------------------- listing


@dataclass
class CheckpointEntry:
    path: Path
    step: int
    meta: dict[str, Any] | None  # the sidecar, None when missing

    @property
    def val_loss(self) -> float | None:
        value = (self.meta or {}).get("val_loss")
        return float(value) if value is not None else None


def _entry(path: Path, step: int | None = None) -> CheckpointEntry:
    meta = read_sidecar(path)
    if step is None:
        step = int((meta or {}).get("step", -1))
    return CheckpointEntry(path, step, meta)


def step_checkpoints(checkpoint_dir: str | Path) -> list[CheckpointEntry]:
    """The ``model_step_N.pt`` files of a folder, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [_entry(p, int(m.group(1))) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, key=lambda e: e.step)


def resume_candidates(checkpoint_dir: str | Path) -> list[CheckpointEntry]:
    """Checkpoints a run can continue from, newest first: step files and ``model_final.pt``."""
    entries = step_checkpoints(checkpoint_dir)
    final = Path(checkpoint_dir) / "model_final.pt"
    if final.is_file():
        entries.append(_entry(final))
    return sorted(entries, key=lambda e: e.step, reverse=True)


def is_valid(path: str | Path) -> bool:
    try:
        return verify_checkpoint(path) is None and zipfile.is_zipfile(path)
    except OSError:
        return False


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes its checksum (a damaged newer one is skipped), or None."""
    for entry in resume_candidates(checkpoint_dir):
        if is_valid(entry.path):
            return entry.path
    return None


def stale_temporaries(checkpoint_dir: str | Path) -> list[Path]:
    """Half-written files left by a process that no longer runs (a crash or kill during a save)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    stale = []
    for p in folder.iterdir():
        m = _TMP_FILE.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(p)
    return stale


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_resume(
    resume: str | Path, checkpoint_dir: str | Path, warn: Callable[[str], None] | None = None
) -> tuple[Path | None, dict[str, Any] | None]:
    """Resolve ``--resume``: a path is loaded (an error if it cannot be); "auto" loads the newest checkpoint
    of ``checkpoint_dir`` that loads, or gives (None, None). Each damaged checkpoint skipped, and starting
    from the beginning because every one is damaged, is told to ``warn`` (the console), else logged."""
    if str(resume) != "auto":
        return Path(resume), load_checkpoint(resume)
    say = warn or log.warning
    skipped = []
    for entry in resume_candidates(checkpoint_dir):
        try:
            state = load_checkpoint(entry.path)
        except CheckpointError as exc:
            skipped.append(entry.path.name)
            say(f"resume auto: skipping {str(exc).split('; ')[0]}")  # its advice is what happens next
            continue
        if skipped:
            say(f"resume auto: continuing from {entry.path} (step {state.get('step', '?')}), not the damaged "
                f"{', '.join(skipped)}")  # fmt: skip
        return entry.path, state
    if skipped:
        say(f"resume auto: every checkpoint in {checkpoint_dir} is damaged ({', '.join(skipped)}); "
            "training starts from step 0")  # fmt: skip
    return None, None
