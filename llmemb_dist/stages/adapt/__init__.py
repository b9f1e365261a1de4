"""Stage 4, adapt: every item of an embeddings version into the recommender's space, new items included."""
