"""Silencing the exporters' chatter (torch.onnx's "torchvision is not installed", deprecations, gguf's
"Writing the following files"): noise to our users, who get one line per stage from us instead."""

from __future__ import annotations

import contextlib
import logging
import warnings

NOISY = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "gguf", "gguf.gguf_writer", "root")


@contextlib.contextmanager
def quiet():
    loggers = [logging.getLogger(name) for name in NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
