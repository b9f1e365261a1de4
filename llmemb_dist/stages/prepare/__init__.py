"""Stage 0, prepare: import a raw dataset into the sharded catalog and interactions."""
