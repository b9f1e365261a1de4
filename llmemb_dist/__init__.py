"""llmemb-dist: LLMEmb item embeddings (SCFT, catalog embedding, RAT) on Ray + DeepSpeed."""

__version__ = "0.1.0"
