"""Build the top-k index (FAISS) over an adapted version, checked against exact search:
python launch/index.py configs/default.yaml [index.version=v2 index.adapted=today index.kind=hnsw ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.index.driver import index

if __name__ == "__main__":
    sys.exit(main("index", index))
