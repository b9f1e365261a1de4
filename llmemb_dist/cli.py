"""The command line: `llmemb <stage> <config.yaml> [key=value ...]` (also `python -m llmemb_dist`), and the
launch scripts' shared entry point (`python launch/<stage>.py ...`, the Ray job entrypoints): config from
argv, logging, clear errors."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from typing import Callable

from llmemb_dist.config import Config, ConfigError, flatten, key_help, load_config, split_argv, to_dict
from llmemb_dist.storage import DataError, StorageError

# stage -> (module, function): imported only when run, so `--help` starts at once
STAGES = {
    "prepare": ("llmemb_dist.stages.prepare.driver", "prepare"),
    "scft": ("llmemb_dist.stages.scft.driver", "scft"),
    "embed": ("llmemb_dist.stages.embed.driver", "embed"),
    "rat": ("llmemb_dist.stages.rat.driver", "rat"),
    "adapt": ("llmemb_dist.stages.adapt.driver", "adapt"),
    "index": ("llmemb_dist.stages.index.driver", "index"),
    "serve": ("llmemb_dist.stages.index.serving", "serve"),
    "pipeline": ("llmemb_dist.stages.pipeline", "pipeline"),
    "cleanup": ("llmemb_dist.cleanup", "cleanup"),
}
USAGE = ("usage: llmemb {stage} <config.yaml> [dotted.key=value ...]   (or python launch/{stage}.py ...)\n"
         "  configs/default.yaml is the embedded default; every key below can be overridden as key=value")


def help_text(stage: str) -> str:
    rows = key_help()
    width = max(len(k) for k, *_ in rows)
    lines = [USAGE.format(stage=stage), "", "config keys (type, default: meaning):"]
    lines += [f"  {key:<{width}}  {kind}, default {default}: {meaning}" for key, kind, default, meaning in rows]
    return "\n".join(lines)


def changed_keys(cfg: Config) -> str:
    """The resolved values that differ from the built-in defaults, as key=value."""
    mine, default = flatten(to_dict(cfg)), flatten(dataclasses.asdict(Config()))
    return " ".join(f"{k}={v}" for k, v in mine.items() if v != default[k]) or "(all defaults)"


def main(stage: str, run: Callable[[Config], object], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(stage))
        return 0
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s")
    try:
        path, overrides = split_argv(argv)
        if path is None:
            raise ConfigError(f"a config file is needed first: llmemb {stage} <config.yaml> [dotted.key=value ...] "
                              "(configs/default.yaml is the embedded default)")
        cfg = load_config(path, overrides)
        logging.getLogger("llmemb_dist").info("%s with %s: %s", stage, path, changed_keys(cfg))
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


def entry(argv: list[str] | None = None) -> int:
    """`llmemb <stage> ...`: the installed command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: llmemb {{{'|'.join(STAGES)}}} <config.yaml> [dotted.key=value ...]; llmemb <stage> --help "
              "lists every key", file=sys.stderr if argv else sys.stdout)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    module, function = STAGES[argv[0]]
    return main(argv[0], getattr(importlib.import_module(module), function), argv[1:])
