"""The whole system on one config: python launch/pipeline.py configs/default.yaml [key=value ...]

prepare -> SCFT -> embed -> RAT (then adapt -> index with pipeline.index=true), each stage skipped when
its output is already published from the same config and inputs; prints where the embeddings are and
the ID vs LLMEmb table.
"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.pipeline import pipeline

if __name__ == "__main__":
    sys.exit(main("pipeline", pipeline))
