"""Building and loading base models: tiny Llamas and tokenizers built in-process, real checkpoints (HF, GGUF, 4-bit),
the memory planner."""
