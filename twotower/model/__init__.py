"""The two-tower model: context cache, attention masks, time conditioning, LoRA, the model."""
