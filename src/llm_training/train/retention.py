"""Which step checkpoints to keep: the newest ``keep_last``, the ``keep_best`` by validation loss, and always
the newest valid one. Used after each save during training and by ``llm-cleanup``.

Only ``model_step_N.pt`` files are candidates: ``model_best.pt``, ``model_final.pt`` and anything else a user
put in the folder are never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm_training.train.checkpoint import (
    CheckpointEntry,
    is_valid,
    sidecar_path,
    stale_temporaries,
    step_checkpoints,
)


@dataclass
class CleanupPlan:
    keep: list[CheckpointEntry] = field(default_factory=list)
    remove: list[CheckpointEntry] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)  # temporaries of crashed saves
    reasons: dict[Path, str] = field(default_factory=dict)  # why each kept file is kept

    @property
    def freed_bytes(self) -> int:
        return sum(e.path.stat().st_size for e in self.remove if e.path.exists()) + sum(
            p.stat().st_size for p in self.stale if p.exists()
        )


def plan_cleanup(
    checkpoint_dir: str | Path, keep_last: int | None, keep_best: int = 0, known_valid: Path | None = None
) -> CleanupPlan:
    """Decide without touching anything; ``keep_last=None`` keeps every step checkpoint. ``known_valid``: a
    checkpoint the caller has just written, so it is not read back to check its checksum."""
    entries = step_checkpoints(checkpoint_dir)
    plan = CleanupPlan(stale=stale_temporaries(checkpoint_dir))
    if keep_last is None:
        plan.keep = entries
        plan.reasons = {e.path: "retention off" for e in entries}
        return plan
    newest_first = entries[::-1]
    for e in newest_first[:keep_last]:
        plan.reasons[e.path] = f"among the {keep_last} newest"
    scored = sorted((e for e in entries if e.val_loss is not None), key=lambda e: (e.val_loss, -e.step))
    for e in scored[:keep_best]:
        plan.reasons.setdefault(e.path, f"among the {keep_best} best (validation loss {e.val_loss:.4f})")
    newest_valid = next((e for e in newest_first if e.path == known_valid or is_valid(e.path)), None)
    if newest_valid is not None:
        plan.reasons.setdefault(newest_valid.path, "newest valid checkpoint")
    plan.keep = [e for e in entries if e.path in plan.reasons]
    plan.remove = [e for e in entries if e.path not in plan.reasons]
    return plan


def apply_cleanup(plan: CleanupPlan) -> list[Path]:
    """Remove what the plan says (and the sidecars); returns the removed checkpoint and temporary files."""
    removed = []
    for e in plan.remove:
        e.path.unlink(missing_ok=True)
        sidecar_path(e.path).unlink(missing_ok=True)
        removed.append(e.path)
    for p in plan.stale:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
