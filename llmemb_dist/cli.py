"""Shared entry point of the launch scripts: config from argv, logging, clear errors."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from llmemb_dist.config import Config, ConfigError, load_config, split_argv
from llmemb_dist.storage import DataError, StorageError

USAGE = "usage: python launch/{stage}.py <config.yaml> [dotted.key=value ...]"


def main(stage: str, run: Callable[[Config], object], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(stage=stage))
        return 0
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(*split_argv(argv))
        run(cfg)
    except (ConfigError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
