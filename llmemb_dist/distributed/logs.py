"""Quiet by default: a run prints our progress lines and real warnings, not Ray's, Ray Data's, Ray Train's,
DeepSpeed's and transformers' own lines (Ray Data and Ray Train still write theirs to Ray's log files);
`log.verbose=true` prints them as well.

Every process needs its share: the driver applies `quiet_process` itself, every Ray worker process of the job
runs it first (cluster.py), and `QUIET_ENV` reaches both, for the libraries that read their settings from
the environment as they load.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # its load report lists the LM head an embedding model leaves out
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars follow this too
    # Worker lines the driver leaves out. Ray Train's helper actors take their arguments through the object
    # store, and the core worker says so at error level each time one starts; DeepSpeed prints that it
    # loaded an operator.
    "RAY_DEDUP_LOGS_SKIP_REGEX": "has constructor arguments in the object store|^DeepSpeed .* built successfully",
}

LOGGER_LEVELS = {
    # "Token authentication is enabled", on every start of a local cluster: Ray's default, and ours.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Progress bars disabled" on every dataset's first run in a process: we disable them on purpose.
    "ray.data._internal.progress": logging.ERROR,
    # It keeps asking the State API whether Ray Train's controller lives, and warns each time it cannot:
    # an embedded Ray starts without the dashboard that serves that API.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def _quiet_thread_exceptions(default):
    def hook(args: threading.ExceptHookArgs) -> None:
        # Ray Data's file listing (dynamic_work_queue._signal_completion) can find its pool shut down once
        # every file is listed, and its thread dies with a traceback; the listing itself is complete.
        if not (args.exc_type is InterruptedError and getattr(args.thread, "name", "").endswith("completion-signaler")):
            default(args)

    return hook


@functools.cache  # once per process
def quiet_process() -> None:
    """Libraries' loggers and warnings in this process; our own (llmemb_dist) stay as they are."""
    import ray
    import ray.data  # it sets its loggers up as it loads: ours must come after

    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    # Only what Ray Data prints: its log file (ray-data.log) keeps every line.
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
    # Ray Train names the logger of its "Reporting training result" lines by file, outside "ray.train",
    # so its own log level misses them.
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train/v2/_internal/execution/context.py")) \
        .setLevel(logging.WARNING)
    # DeepSpeed sets its logger's level when imported (and warns that it found no GPU): a filter outlasts that.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!llmemb_dist\b)")
    threading.excepthook = _quiet_thread_exceptions(threading.excepthook)
