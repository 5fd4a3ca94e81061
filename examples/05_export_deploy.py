"""Export and deploy: ONNX with int8 weights (checked against the PyTorch model on held-out text), then
served over HTTP by ModelServer and queried like an OpenAI completion endpoint.

    python examples/05_export_deploy.py [--tiny]
"""

import httpx
from _common import arguments, free_port, model_keys, split_sample

from llm_training import DataPreparationPipeline, ModelExporter, ModelExporterInput, ModelServer, Trainer

args = arguments("05_export_deploy", __doc__)
train_file, test_file = split_sample(args.out)
DataPreparationPipeline(output_dir=args.out / "prepared", vocab_size=1024).run(input_file=str(train_file))
trainer = Trainer(
    data_dir=str(args.out / "prepared"), output_dir=str(args.out / "run"), **model_keys(args.tiny)
)
result = trainer.train(max_steps=10 if args.tiny else 400, sample_tokens=0)

# ONNX, int8: the exporter checks the file in onnxruntime against the checkpoint before it is kept
exported = ModelExporter().export(ModelExporterInput(
    checkpoint_path=str(result.final_checkpoint), export_format="onnx", optimization={"quantization": "int8"},
    output_path=str(args.out / "exports" / "model.onnx"), overwrite=True, validation_data=str(test_file)))  # fmt: skip
print(f"exported {exported.export_path} ({exported.size_bytes / 1e6:.1f} MB): {exported.check}")

# serve it (in a child process here, so that this script can query it) and ask for a completion
server = ModelServer(model_path=str(exported.export_path), port=free_port()).start(block=False)
try:
    answer = httpx.post(f"{server.url}/v1/completions", json={"prompt": "def ", "max_tokens": 12}, timeout=60)
    answer.raise_for_status()
    print("completion:", repr(answer.json()["choices"][0]["text"]))
finally:
    print("server stopped with status", server.stop())
