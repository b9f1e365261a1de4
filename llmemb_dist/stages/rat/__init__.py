"""Stage 3, RAT: the LLM table through a trainable adapter into a sequential recommender."""
