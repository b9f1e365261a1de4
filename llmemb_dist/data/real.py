"""Where the real public datasets that may not be redistributed are found (tests and benchmarks only).

MovieLens-100K ships inside the recbole wheel; amazon-toys and ml-latest-small do not ship with the
repository. They are looked up in one folder, `$LLMEMB_DATA_DIR`, or `../shared/data` beside the
clone where that exists, one subfolder per dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "LLMEMB_DATA_DIR"
# Set (to anything but "" or "0") where the datasets must be there, as in CI: an absence fails, not skips.
REQUIRE_ENV = "LLMEMB_REQUIRE_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def real_dataset(name: str) -> Path | None:
    """The dataset's folder, or None where it is absent."""
    folder = data_dir() / name
    return folder if folder.is_dir() else None


def missing_reason(name: str) -> str:
    return (f"real dataset {name!r} not found in {data_dir()} (set {DATA_DIR_ENV} to the folder that holds "
            f"{name}/; see the README's Data section)")


def dataset_or_exit(name: str) -> Path:
    """A benchmark's dataset folder; without it the benchmark stops with the reason (exit 2) rather than
    measuring something else."""
    folder = real_dataset(name)
    if folder is None:
        raise SystemExit(f"error: {missing_reason(name)}")
    return folder
