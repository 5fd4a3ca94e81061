"""Memory-mapped token shards and a resumable loader of (input_ids, labels) windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llm_training.data.prepare import read_manifest
from llm_training.errors import DataError


class TokenDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens over the shards of one manifest."""

    def __init__(self, manifest_path: str | Path, seq_len: int) -> None:
        self.manifest = read_manifest(manifest_path)
        root = Path(self.manifest["_dir"])
        dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                raise DataError(
                    f"shard missing: {path} (listed in {root / (self.manifest['split'] + '.json')})"
                )
            expected = shard["num_tokens"] * dtype.itemsize
            if path.stat().st_size != expected:
                raise DataError(
                    f"{path}: {path.stat().st_size} bytes, manifest says {expected}; prepare the data again"
                )
            if shard["num_tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.num_tokens = sum(len(s) for s in self.shards)
        # a validation set shorter than the context still gives one (shorter) window
        longest = max((len(s) for s in self.shards), default=0)
        self.seq_len = max(1, min(seq_len, longest - 1))
        counts = [max(0, (len(s) - 1) // self.seq_len) for s in self.shards]
        self._starts = np.cumsum([0, *counts])
        self.num_windows = int(self._starts[-1])
        if self.num_windows == 0:
            raise DataError(f"{manifest_path}: too few tokens ({self.num_tokens}) for one training window")

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["num_bytes"] / max(1, self.manifest["num_tokens"])

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        offset = (index - int(self._starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][offset : offset + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def open_split(manifest_path: str | Path, kind: str, what: str, names: tuple[str, ...]) -> tuple[dict, dict]:
    """A split of prepared data of ``kind`` held as arrays (image-text, chat): its manifest and its
    ``<split>_<name>.npy`` files, memory-mapped (``offsets`` read whole: every batch looks them up)."""
    manifest = read_manifest(manifest_path)
    if manifest.get("kind") != kind:
        raise DataError(f"{manifest_path}: not {what}")
    root, split = Path(manifest["_dir"]), manifest["split"]
    try:
        arrays = {name: np.load(root / f"{split}_{name}.npy", mmap_mode="r") for name in names}
    except (OSError, ValueError) as exc:
        raise DataError(f"{root}: {what} files missing or damaged ({exc}); prepare the data again") from None
    if "offsets" in arrays:
        arrays["offsets"] = np.asarray(arrays["offsets"])
    return manifest, arrays


class BatchLoader:
    """Epochs of shuffled windows, split across ranks, that can stop and resume at any batch.

    ``state_dict()`` holds the epoch and the next batch; the order is a pure function of (seed, epoch), so a
    resumed run sees exactly the batches the uninterrupted run would have seen.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise DataError(
                f"{dataset.num_windows} windows of {dataset.seq_len} tokens cannot fill one batch of {batch_size} "
                f"on {world_size} process(es); lower training.batch_size or model.max_seq_length, or add data"
            )

    def _order(self, epoch: int) -> np.ndarray:
        n = self.dataset.num_windows
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = self.dataset.num_windows // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        """Batches of the current epoch from the saved position; advances to the next epoch at the end."""
        order = self._order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            batch = self.dataset.batch(order[start : start + self.batch_size])
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped; with another batch size or number of processes, continue at the
        same window of the epoch (to the batch), so only the exact order of later batches changes."""
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        saved = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
        if saved != self.batch_size * self.world_size:
            self.position = self.position * saved // (self.batch_size * self.world_size)
