"""Embed the catalog (fully, or incrementally from a previous version):
python launch/embed.py configs/default.yaml [embed.version=v2 embed.incremental_from=v1 ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.embed.driver import embed

if __name__ == "__main__":
    sys.exit(main("embed", embed))
