"""List (or, with cleanup.remove=true, remove) what crashed jobs left under the root:
python launch/cleanup.py configs/default.yaml [cleanup.grace_hours=24 cleanup.remove=true]"""
import sys

from llmemb_dist.cleanup import cleanup
from llmemb_dist.cli import main

if __name__ == "__main__":
    sys.exit(main("cleanup", cleanup))
