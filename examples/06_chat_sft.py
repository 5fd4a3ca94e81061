"""Chat fine-tuning (SFT): teach a model to answer in turns, with the loss on the assistant's replies only,
then export it to Hugging Face with its chat template and chat with it through transformers.

Without --model, a small base model is trained here first (on the built-in sample) and given the built-in
ChatML template, whose two markup tokens are added to its tokenizer and embeddings. With --model, any
Hugging Face folder (gpt2, llama, mistral, qwen2, qwen3) or checkpoint of this project is fine-tuned; an
instruct model keeps its own template. Without --data, the chat file pairs consecutive lines of the sample
(user: a line, assistant: the next), one JSON object a line in the OpenAI messages format.

    python examples/06_chat_sft.py [--tiny] [--model PATH] [--data chat.jsonl]
    llm-finetune --model PATH --data chat.jsonl --chat-template chatml --output-dir sft   # the same, as a command
"""

import gzip
import json

from _common import arguments, model_keys, split_sample

from llm_training import DataPreparationPipeline, Trainer
from llm_training.data.sources import sample_data_path
from llm_training.export.exporter import ExportOptions, export_checkpoint


def flags(p):
    p.add_argument("--model", help="A Hugging Face model folder or a .pt checkpoint to fine-tune.")
    p.add_argument("--data", help="A chat file (.jsonl: messages, sharegpt, prompt/completion or alpaca).")


args = arguments("06_chat_sft", __doc__, flags)
steps = 10 if args.tiny else 300

model = args.model
if model is None:  # a base model to start from (stands for one you already have)
    train_file, _ = split_sample(args.out)
    DataPreparationPipeline(output_dir=args.out / "base_data", vocab_size=1024).run(
        input_file=str(train_file)
    )
    base = Trainer(
        data_dir=str(args.out / "base_data"), output_dir=str(args.out / "base"), **model_keys(args.tiny)
    )
    model = str(base.train(max_steps=steps, sample_tokens=0).final_checkpoint)
    print(f"base model: {model}")

data = args.data
if data is None:
    with gzip.open(sample_data_path(), "rt", encoding="utf-8") as handle:
        text = "\n".join(json.loads(line)["text"] for line in handle if line.strip())
    lines = [line.strip() for line in text.splitlines() if 20 < len(line.strip()) < 200][:600]
    data = args.out / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for user, reply in zip(lines[0::2], lines[1::2], strict=False):
            chat = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            handle.write(json.dumps({"messages": chat}) + "\n")

# the same job as llm-finetune: the data is encoded with the model's tokenizer into sft/prepared_chat
template = None if args.model else "chatml"  # a model of yours with a template of its own keeps it
result = Trainer(output_dir=str(args.out / "sft")).finetune(
    model=model, data=str(data), chat_template=template, max_steps=steps, learning_rate=1e-3 if args.tiny else 3e-4,
    eval_interval=max(1, steps // 5), batch_size=8, sample_tokens=24,
)  # fmt: skip
print(f"fine-tuned {result.steps} steps: assistant-token validation loss {result.first_val_loss:.3f} -> "
      f"{result.val_loss:.3f}")  # fmt: skip
print("sample:", result.sample[-300:])

# a Hugging Face folder that transformers loads, with the chat template in its tokenizer files
exported = export_checkpoint(result.final_checkpoint, ExportOptions(format="hf", output=str(args.out / "hf"),
                                                                    overwrite=True))  # fmt: skip
print(f"exported {exported.export_path}")
try:
    from transformers import AutoTokenizer
except ImportError:
    print("pip install 'llm-training[export]' to load the export with transformers")
else:
    tokenizer = AutoTokenizer.from_pretrained(exported.export_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    print(f"the export's chat template renders: {prompt!r}")
