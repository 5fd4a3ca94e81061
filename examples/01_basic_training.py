"""Basic training with the high-level API: prepare text, train, evaluate on held-out text, export.

python examples/01_basic_training.py           # about 3 minutes on a laptop CPU
python examples/01_basic_training.py --tiny    # seconds
"""

from _common import arguments, model_keys, split_sample

from llm_training import DataPreparationPipeline, Trainer

args = arguments("01_basic_training", __doc__)
train_file, test_file = split_sample(args.out)

# 1. raw JSON Lines -> cleaned, deduplicated, tokenized shards with a trained BPE tokenizer
DataPreparationPipeline(output_dir=args.out / "prepared", vocab_size=1024 if args.tiny else 4096).run(
    input_file=str(train_file), max_seq_length=256
)

# 2. train; keyword arguments are training.* keys, or dotted section.key names
trainer = Trainer(
    data_dir=str(args.out / "prepared"), output_dir=str(args.out / "run"), **model_keys(args.tiny)
)
result = trainer.train(
    max_steps=10 if args.tiny else 600, learning_rate=0.01, batch_size=16, sample_tokens=40
)
print(
    f"trained {result.steps} steps: validation loss {result.val_loss:.3f}, checkpoint {result.final_checkpoint}"
)

# 3. evaluate on text the model never saw
results = trainer.evaluate(test_data=str(test_file))
print(f"held-out perplexity {results['perplexity']:.2f}, {results['bits_per_byte']:.3f} bits/byte")

# 4. export for deployment (safetensors needs no extra runtime; onnx and torchscript work the same way)
exported = trainer.export(format="safetensors", output_path=str(args.out / "exports" / "model.safetensors"))
print(f"exported {exported.export_path} ({exported.size_bytes / 1e6:.1f} MB), checked: {exported.check}")
