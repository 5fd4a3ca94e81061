"""Fine-tuning: continue training a model on new data, from one of our checkpoints or from a Hugging Face
folder (GPT-2, Llama, Mistral, Qwen2 or Qwen3, e.g. one exported by llm-export --format hf, or a downloaded
gpt2). The new data is tokenized with the model's own tokenizer, so the vocabularies match.

    python examples/04_fine_tuning.py [--tiny] [--hf-model PATH]
"""

from _common import arguments, model_keys, split_sample

from llm_training import (
    DataLoader,
    DataLoaderInput,
    DataPreparationPipeline,
    ModelInitializer,
    ModelInitializerInput,
    Trainer,
    TrainingOrchestrator,
    TrainingOrchestratorInput,
)
from llm_training.export.exporter import ExportOptions, export_checkpoint

args = arguments("04_fine_tuning", __doc__)
train_file, test_file = split_sample(args.out)
steps = 10 if args.tiny else 300

# a base model: trained here on the first half of the sample (stands for a model you already have)
DataPreparationPipeline(output_dir=args.out / "base_data", vocab_size=1024).run(input_file=str(train_file))
base = Trainer(
    data_dir=str(args.out / "base_data"), output_dir=str(args.out / "base"), **model_keys(args.tiny)
)
base_result = base.train(max_steps=steps, sample_tokens=0)
print(f"base model: validation loss {base_result.val_loss:.3f}")

# the new data, tokenized with the base model's tokenizer
new = DataPreparationPipeline(
    output_dir=args.out / "new_data", tokenizer=str(args.out / "base_data" / "vocab.json")
)
new.run(input_file=str(test_file))
loader = DataLoader().create_loader(DataLoaderInput(dataset_path=args.out / "new_data", batch_size=8))

# 1. from a checkpoint of ours: the weights (and architecture) come from the file
model = ModelInitializer().initialize(
    ModelInitializerInput(initialization={"method": "checkpoint", "path": str(base_result.final_checkpoint)})
)
tuned = TrainingOrchestrator().train(
    TrainingOrchestratorInput(model_id=model.model_id, training_config={
        "max_steps": steps // 2 or 1, "learning_rate": 0.002, "warmup_steps": 0, "output_dir": str(args.out / "tuned"),
        "sample_tokens": 0}),
    data_loader_output=loader,
)  # fmt: skip
print(f"fine-tuned from the checkpoint: validation loss on the new data {tuned.val_loss:.3f}")

# 2. from a Hugging Face folder: here the base model exported as one (pass --hf-model for another)
hf_folder = args.out / "base_hf"
export_checkpoint(
    base_result.final_checkpoint, ExportOptions(format="hf", output=str(hf_folder), overwrite=True)
)
hf_model = ModelInitializer().initialize(
    ModelInitializerInput(initialization={"method": "pretrained", "path": str(hf_folder)})
)
from_hf = TrainingOrchestrator().train(
    TrainingOrchestratorInput(model_id=hf_model.model_id, training_config={
        "max_steps": steps // 2 or 1, "learning_rate": 0.002, "warmup_steps": 0,
        "output_dir": str(args.out / "tuned_hf"), "sample_tokens": 0}),
    data_loader_output=loader,
)  # fmt: skip
print(f"fine-tuned from the Hugging Face folder: validation loss {from_hf.val_loss:.3f}")
