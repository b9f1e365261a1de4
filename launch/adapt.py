"""Carry every item of an embeddings version (today's, with new items) into the recommender's space:
python launch/adapt.py configs/default.yaml [adapt.version=v2 adapt.embeddings=v2 adapt.incremental_from=default ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.adapt.driver import adapt

if __name__ == "__main__":
    sys.exit(main("adapt", adapt))
