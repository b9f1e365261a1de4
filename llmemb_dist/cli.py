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
    except OSError as e:  # a root the OS refuses: no permission, a read-only disk, a path that cannot exist
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: what {stage} had published is kept and nothing half-written is visible; run the same "
              "command again to continue (published stages are skipped, SCFT and RAT resume from their checkpoints)",
              file=sys.stderr)
        return 130
    return 0
