"""mlora: fine-tune many LoRA adapters at once on one shared, frozen base LLM."""

__version__ = "0.1.0"
