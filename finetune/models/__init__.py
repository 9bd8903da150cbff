"""Models: load a base (quantized with bitsandbytes, LoRA via peft), adapters on disk, and the two
built-in models: `embedded` (SmolLM2-135M-Instruct from a PyPI-shipped GGUF) and `tiny` (random,
for tests and smoke runs). Knows nothing of the training loop or the memory features."""
