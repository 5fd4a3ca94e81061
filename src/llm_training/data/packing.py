"""Sequence packing: short examples packed into full windows, with the boundaries attention needs.

Each window holds whole examples (best fit, longest first, so windows fill up; an example is never split)
and padding after them. Per window:

- ``input_ids``: the examples' ids, then ``pad_id``;
- ``labels``: the examples' labels (aligned with the ids), IGNORE_INDEX on the padding and on each example's
  first token, so that with the usual shift (predict ``labels[t + 1]`` at ``t``) no position learns to
  predict the next example's first token;
- ``position_ids``: restarting at 0 for each example (and for the padding);
- ``segment_ids``: 0, 1, ... per example in the window, -1 on the padding: a token may attend to earlier
  tokens of its own segment (block-diagonal causal attention);
- ``cu_seqlens``: the segments' boundaries, from 0 to the window's length, the padding last as a segment of
  its own (the ``cu_seqlens`` of variable-length attention kernels).

Pure numpy: no model code.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llm_training.data.chat import IGNORE_INDEX


@dataclass
class PackedWindow:
    input_ids: np.ndarray  # int64 [window]
    labels: np.ndarray  # int64 [window]
    position_ids: np.ndarray  # int64 [window]
    segment_ids: np.ndarray  # int32 [window]
    cu_seqlens: np.ndarray  # int32 [segments + 1]
    examples: list[int]  # indices of the packed examples, in window order


def pack_examples(
    input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], window: int, pad_id: int
) -> list[PackedWindow]:
    """Pack examples (``input_ids[i]`` with ``labels[i]``, each at most ``window`` long) into windows."""
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} input_ids but {len(labels)} labels")
    lengths = [len(ids) for ids in input_ids]
    for index, (ids, label) in enumerate(zip(input_ids, labels, strict=True)):
        if len(ids) != len(label) or not 0 < len(ids) <= window:
            raise ValueError(
                f"example {index}: {len(ids)} ids and {len(label)} labels for a window of {window}"
            )
    return [
        window_of([input_ids[i] for i in members], [labels[i] for i in members], members, window, pad_id)
        for members in best_fit(lengths, window)
    ]


def best_fit(lengths: Sequence[int], window: int) -> list[list[int]]:
    """Which examples go in which window (indices, ascending in each): best fit decreasing, each example,
    longest first, into the fullest window it fits. Deterministic, so a resumed run packs the same windows."""
    free: list[tuple[int, int]] = []  # (room left, window number), sorted
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[index], -1))
        if at == len(free):
            bins.append([index])
            room, number = window - lengths[index], len(bins) - 1
        else:
            room, number = free.pop(at)
            bins[number].append(index)
            room -= lengths[index]
        if room > 0:
            bisect.insort(free, (room, number))
    return [sorted(members) for members in bins]


def window_of(input_ids, labels, members: list[int], window: int, pad_id: int) -> PackedWindow:
    """One window of the examples ``input_ids``/``labels`` (in this order; ``members``: their indices)."""
    ids = np.full(window, pad_id, np.int64)
    out_labels = np.full(window, IGNORE_INDEX, np.int64)
    positions = np.zeros(window, np.int64)
    segments = np.full(window, -1, np.int32)
    bounds = [0]
    for segment, (example, label) in enumerate(zip(input_ids, labels, strict=True)):
        start, length = bounds[-1], len(example)
        stop = start + length
        ids[start:stop] = example
        out_labels[start:stop] = label
        out_labels[start] = IGNORE_INDEX  # nothing in this example predicts its first token
        positions[start:stop] = np.arange(length)
        segments[start:stop] = segment
        bounds.append(stop)
    if bounds[-1] < window:
        positions[bounds[-1] :] = np.arange(window - bounds[-1])
        bounds.append(window)
    return PackedWindow(ids, out_labels, positions, segments, np.asarray(bounds, np.int32), list(members))
