"""Stage 2, embed: every catalog item through the (fine-tuned) LLM, fully or incrementally."""
