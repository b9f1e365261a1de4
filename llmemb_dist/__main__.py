"""`python -m llmemb_dist <stage> <config.yaml> [key=value ...]`."""
import sys

from llmemb_dist.cli import entry

sys.exit(entry())
