"""Custom data: your own DataSourceConnector (here: a folder of .txt files, one document each, with a
keyword filter), prepared with the built-in cleaning, quality filter and deduplication, then trained.

    python examples/02_custom_data.py [--tiny]
"""

from dataclasses import dataclass
from pathlib import Path

from _common import arguments, model_keys, split_sample

from llm_training import (
    DataPreparationPipeline,
    DataSourceConnector,
    DataSourceConnectorOutput,
    Document,
    Trainer,
)


@dataclass
class FolderInput:
    folder: str
    must_contain: str = ""


class TextFolderSource(DataSourceConnector):
    """Every .txt file under a folder that mentions ``must_contain`` becomes one document."""

    def connect(self, input_data: FolderInput) -> DataSourceConnectorOutput:
        self.files = sorted(Path(input_data.folder).rglob("*.txt"))
        self.must_contain = input_data.must_contain
        if not self.files:
            raise ConnectionError(f"{input_data.folder}: no .txt files")
        return DataSourceConnectorOutput(connection_id=input_data.folder, status="connected",
                                         metadata={"files": len(self.files)})  # fmt: skip

    def documents(self):
        for path in self.files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if self.must_contain in text:
                yield Document(path.name, text, str(path))

    def describe(self) -> str:
        return f"text folder ({len(self.files)} files)"


args = arguments("02_custom_data", __doc__)
# a folder of text files to stand for your data: the sample's documents, one file each
train_file, _ = split_sample(args.out)
folder = args.out / "texts"
folder.mkdir(exist_ok=True)
import json  # noqa: E402  (only this demonstration's set-up needs it)

for number, line in enumerate(train_file.read_text(encoding="utf-8").splitlines()):
    (folder / f"doc_{number:04d}.txt").write_text(json.loads(line)["text"], encoding="utf-8")

source = TextFolderSource()
print("connected:", source.connect(FolderInput(str(folder), must_contain="def ")).metadata)
prepared = DataPreparationPipeline(output_dir=args.out / "prepared", vocab_size=1024 if args.tiny else 4096,
                                   deduplicate=True, min_quality=0.2).run(input_file=source, max_seq_length=256)  # fmt: skip
print("prepared:", {k: prepared.report[k] for k in ("documents_read", "dropped", "train_tokens")})

trainer = Trainer(
    data_dir=str(args.out / "prepared"), output_dir=str(args.out / "run"), **model_keys(args.tiny)
)
result = trainer.train(max_steps=10 if args.tiny else 400, sample_tokens=0)
print(f"trained {result.steps} steps on {source.describe()}: validation loss {result.val_loss:.3f}")
