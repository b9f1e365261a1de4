"""Item catalogs, interactions, prompts and sequences."""
