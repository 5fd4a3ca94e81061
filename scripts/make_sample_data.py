"""Rebuild src/llm_training/sample_data/python_reference.jsonl.gz from this Python's ``pydoc_data.topics``.

The topics are the Python Language Reference as shipped with CPython (PSF licence). Run once per release;
the committed file is what every install trains on, so results do not depend on the local Python version.
"""

import gzip
import json
from pathlib import Path
from pydoc_data.topics import topics

target = (
    Path(__file__).resolve().parents[1] / "src" / "llm_training" / "sample_data" / "python_reference.jsonl.gz"
)
with gzip.GzipFile(target, "wb", mtime=0) as raw:
    for name in sorted(topics):
        raw.write(
            (json.dumps({"id": f"python_reference/{name}", "text": topics[name]}) + "\n").encode("utf-8")
        )
print(f"wrote {target} ({target.stat().st_size:,} bytes, {len(topics)} documents)")
