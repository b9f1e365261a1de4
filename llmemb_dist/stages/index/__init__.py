"""Stage 5, index: a FAISS index over an adapted version, so that top-k serving scales past a full scan."""
