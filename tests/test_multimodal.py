"""Text and image: a captioning task drawn by the test (shapes and colours with Pillow) that the model learns
better than chance on the CPU, the preprocessor's numbers, bad images, resume, and the safetensors export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_user_error, run_cli, set_flags
from llm_training.errors import DataError
from llm_training.monitor.files import step_losses
from llm_training.multimodal.data import ImageTextOptions, prepare_image_text

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
# chance: a caption is "a <colour> <shape>" + end-of-text; guessing colour and shape costs ln 4 + ln 3 nats
CHANCE_LOSS = (np.log(4) + np.log(3)) / 4
TRAIN = ["-m", "llm_training.cli.train"]


def draw(shape: str, color: tuple, rng: random.Random, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    r = rng.randint(7, 12)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        pen.rectangle([x - r, y - r, x + r, y + r], fill=color)
    else:
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    return image


def captions(folder, count: int, seed: int = 0):
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        draw(shape, COLORS[color], rng).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"text": f"a {color} {shape}", "image": f"images/{i}.png"}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(**extra) -> list[str]:
    values = {"vision.image_size": 32, "vision.patch_size": 8, "vision.hidden_size": 64, "model.max_seq_length": 32,
              "model.num_layers": 2, "model.hidden_size": 64, "data.vocab_size": 300, "training.batch_size": 32,
              "training.learning_rate": 3e-3, "training.optimizer": "adamw", "training.eval_interval": 1000,
              "training.sample_tokens": 8, "logging.progress_bar": False, **extra}  # fmt: skip
    return set_flags(values)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return captions(tmp_path_factory.mktemp("shapes"), 400)


@pytest.fixture(scope="module")
def trained(shapes):
    out = shapes.parent / "run"
    proc = run_cli([*TRAIN, "--output-dir", str(out), *settings(**{"data.input_file": str(shapes),
                                                                   "training.num_epochs": 14})], shapes.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_captions_are_learned_better_than_chance(trained):
    out, proc = trained
    ends = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in ends if r["event"] == "eval_end"][-1]
    assert final["val_loss"] < 0.75 * CHANCE_LOSS, (final, CHANCE_LOSS)
    # generation from images the model has not trained on: it names colour and shape far above chance (1/12)
    from llm_training.train.artifacts import load_trained

    model = load_trained(out / "checkpoints" / "model_final.pt")
    rng, hits, total = random.Random(99), 0, 48
    pixels, truth = [], []
    for _ in range(total):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        pixels.append(np.asarray(draw(shape, COLORS[color], rng)))
        truth.append(f"a {color} {shape}")
    ids = model.model.caption(torch.from_numpy(np.stack(pixels)), model.tokenizer.eot_id, 8)
    hits = sum(model.tokenizer.decode(row).strip() == want for row, want in zip(ids, truth, strict=True))
    assert hits / total > 3 / 12, hits
    assert proc.stdout.strip().splitlines()[-1].strip().startswith("a ")  # the run's sample: a caption


def test_preprocessor_gives_the_guides_numbers(tmp_path):
    from llm_training import MultiModalPreprocessor

    path = tmp_path / "red.png"
    draw("square", COLORS["red"], random.Random(1), size=50).save(path)
    out = MultiModalPreprocessor().preprocess("a red square", path)
    image = out["image_tensor"]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    white = (torch.tensor([1.0, 1.0, 1.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(image[:, 0, 0], white, atol=1e-5)  # a white corner, normalised as the guide does
    assert out["text_tokens"].tolist() == list(b"a red square")  # no tokenizer: UTF-8 bytes
    custom = MultiModalPreprocessor(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(custom.image_tensor(path)[:, 0, 0], torch.ones(3))
    with pytest.raises(DataError, match="no such image file"):
        custom.image_tensor(tmp_path / "missing.png")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    both = [MultiModalPreprocessor(backend=b).image_tensor(path) for b in ("numpy", "torchvision")]
    assert torch.allclose(both[0], both[1], atol=0.05)


def test_bad_images_are_skipped_and_counted_or_fail_on_request(tmp_path):
    good = captions(tmp_path, 6)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("LAB", (8, 8)).save(tmp_path / "images" / "lab.tif")  # a colour space with no RGB meaning here
    with open(good, "a") as handle:
        handle.write(json.dumps({"text": "a missing one", "image": "images/nope.png"}) + "\n")
        handle.write(json.dumps({"text": "a broken one", "image": "images/broken.png"}) + "\n")
        handle.write(json.dumps({"text": "a lab one", "image": "images/lab.tif"}) + "\n")
        handle.write(json.dumps({"text": "no image field"}) + "\n")
        handle.write("{not json\n")
    # an image by URL, from a real HTTP server on loopback
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(good, "a") as handle:
        url = f"http://127.0.0.1:{server.server_address[1]}/images/0.png"
        handle.write(json.dumps({"text": "a fetched one", "image": url}) + "\n")
    try:
        report = prepare_image_text(good, tmp_path / "out", ImageTextOptions(vocab_size=280, image_size=32))
    finally:
        server.shutdown()
    assert report["pairs"] == 7
    assert report["skipped"] == {
        "image_missing": 1,
        "image_corrupt": 1,
        "image_mode": 1,
        "missing_field": 1,
        "invalid_json": 1,
    }
    with pytest.raises(DataError, match=r"captions.jsonl:7: .*nope.png: no such image file.*on_error=fail"):
        prepare_image_text(good, tmp_path / "out2", ImageTextOptions(image_size=32, on_error="fail"))
    assert not (tmp_path / "out2").exists()  # nothing half-written
    proc = run_cli([*TRAIN, "--output-dir", str(tmp_path / "run"),
                    *settings(**{"data.input_file": str(good), "data.on_error": "fail"})], tmp_path)  # fmt: skip
    assert_user_error(proc, "captions.jsonl:7", "on_error=fail")


def test_resume_of_a_text_and_image_run_continues_exactly(shapes, tmp_path):
    def train(out, epochs, *extra):
        flags = settings(**{"data.input_file": str(shapes), "training.num_epochs": epochs, "training.log_interval": 1,
                            "training.sample_tokens": 0, "checkpoint.async_save": False})  # fmt: skip
        proc = run_cli([*TRAIN, "--output-dir", str(out), *flags, *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train(tmp_path / "straight", 2)
    train(tmp_path / "split", 1)
    train(tmp_path / "split", 2, "--resume", "auto")
    straight, split = (
        step_losses(tmp_path / "straight" / "metrics.jsonl"),
        step_losses(tmp_path / "split" / "metrics.jsonl"),
    )
    assert straight.keys() == split.keys() and len(straight) > 10
    # the CPU in fp32 is exact; a GPU in bf16 (with its non-deterministic kernels) agrees to rounding noise
    tolerance = 1e-4 if not torch.cuda.is_available() else 3e-2
    worst = max(abs(straight[s] - split[s]) for s in straight)
    assert worst < tolerance, (worst, straight, split)


def test_weights_export_and_reload(trained, tmp_path):
    from llm_training.multimodal.export import load_weights

    out, _ = trained
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(out / "checkpoints" / "model_final.pt"),
                    "--format", "safetensors", "--output", str(tmp_path / "mm.safetensors")], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tokenizer = load_weights(tmp_path / "mm.safetensors")
    image = torch.from_numpy(np.array(draw("circle", COLORS["blue"], random.Random(5))))[None]
    assert tokenizer.decode(model.caption(image, tokenizer.eot_id, 8)[0]).strip().startswith("a ")
    onnx = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(out / "checkpoints" / "model_final.pt"),
                    "--format", "onnx", "--output", str(tmp_path / "mm.onnx")], tmp_path)  # fmt: skip
    assert_user_error(onnx, "text-and-image model", "safetensors")


def test_python_api_and_a_pretrained_vision_encoder_from_a_local_folder(trained, tmp_path):
    """Trainer takes the same multi-modal config; vision.pretrained loads a Hugging Face vision model (here a
    small random ViT saved by transformers, standing for a downloaded one)."""
    transformers = pytest.importorskip("transformers")
    from llm_training import Trainer

    folder = tmp_path / "vit"
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
    transformers.ViTModel(config).save_pretrained(folder)
    prepared = trained[0] / "prepared_data"  # what the trained fixture's llm-train prepared
    keys = {"vision.pretrained": str(folder), "vision.image_size": 32, "model.max_seq_length": 32,
            "model.num_layers": 1, "model.hidden_size": 32, "model.num_attention_heads": 2}  # fmt: skip
    trainer = Trainer(data_dir=str(prepared), output_dir=str(tmp_path / "run"), **keys)
    result = trainer.train(max_steps=3, batch_size=8, sample_tokens=4, optimizer="adamw")
    assert result.status == "completed" and result.steps == 3
    from llm_training.train.artifacts import load_trained

    model = load_trained(result.final_checkpoint).model
    assert type(model.vision.model).__name__ == "ViTModel"


def test_the_guides_multimodal_snippet(tmp_path):
    """The guide's class (it imports ours, then defines its own of the same name, which calls a tokenize() it
    does not define, and torchvision): defined as written, then run with our tokenize where torchvision is."""
    from test_guide import run

    import llm_training as lib

    ns = run("Multi-Modal Training", {})
    guide_class = ns["MultiModalPreprocessor"]
    assert guide_class is not lib.MultiModalPreprocessor
    pytest.importorskip("torchvision", reason="the guide's snippet uses torchvision (no CPU build here)")
    path = tmp_path / "shape.png"
    draw("circle", COLORS["green"], random.Random(3), size=64).save(path)
    guide = guide_class()
    guide.tokenize = lib.MultiModalPreprocessor().tokenize
    theirs = guide.preprocess("a green circle", str(path))
    ours = lib.MultiModalPreprocessor(backend="numpy").preprocess("a green circle", path)
    assert theirs["image_tensor"].shape == ours["image_tensor"].shape == (3, 224, 224)
    assert torch.allclose(theirs["image_tensor"], ours["image_tensor"], atol=0.05)


def test_llm_evaluate_scores_captions_of_new_images(trained, tmp_path):
    out, _ = trained
    test = captions(tmp_path, 36, seed=123)  # images and captions the model never saw
    checkpoint = str(out / "checkpoints" / "model_final.pt")
    proc = run_cli(["-m", "llm_training.cli.evaluate", "--model-path", checkpoint, "--test-data", str(test),
                    "--output", str(tmp_path / "scores.json")], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["pairs"] == 36 and scores["caption_loss"] < CHANCE_LOSS
    assert scores["caption_exact_match"] > 3 / 12 and scores["perplexity"] > 1
    (tmp_path / "plain.txt").write_text("some text without images\n")
    assert_user_error(run_cli(["-m", "llm_training.cli.evaluate", "--model-path", checkpoint, "--test-data",
                               str(tmp_path / "plain.txt")], tmp_path), "reads an image before its text")  # fmt: skip
