"""Plain PyTorch / transformers / peft: model loading, LoRA, pooling, losses."""
