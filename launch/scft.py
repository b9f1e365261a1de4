"""SCFT on Ray Train + DeepSpeed: python launch/scft.py configs/default.yaml [key=value ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.scft.driver import scft

if __name__ == "__main__":
    sys.exit(main("scft", scft))
