"""Train the collaborative SASRec and the LLMEmb recommender, publish the adapted item embeddings:
python launch/rat.py configs/default.yaml [key=value ...]"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.rat.driver import rat

if __name__ == "__main__":
    sys.exit(main("rat", rat))
