"""tuneserve: serve a base model with LoRA adapters."""
