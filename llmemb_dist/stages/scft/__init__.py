"""Stage 1, SCFT: contrastive LoRA fine-tuning of the base model on the item catalog."""
