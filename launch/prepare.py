"""Import a raw dataset into sharded Parquet: python launch/prepare.py configs/default.yaml [key=value ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.prepare.driver import prepare

if __name__ == "__main__":
    sys.exit(main("prepare", prepare))
