"""Serve top-k over HTTP on Ray Serve through an index version, reloading it when it is republished:
python launch/serve.py configs/default.yaml [index.version=default index.serve_port=8000 ...]
then POST {"history": ["50", "172"], "k": 10} to http://<index.serve_host>:<index.serve_port>/"""
import sys

from llmemb_dist.cli import main
from llmemb_dist.stages.index.serving import serve

if __name__ == "__main__":
    sys.exit(main("serve", serve))
