"""Timestamps as int64 seconds, read batch by batch: the unit is told, or decided over the whole file.

`auto` takes the coarsest unit that puts the latest timestamp before 2100; a finer one needs every
timestamp past 1973 in it, or the column mixes units (or counts something other than time) and is refused.
A scan keeps only what these checks need (the latest value, and the first row that fails each check), so
a file of any length is read in batches. Errors name the file, the line (or the row of a Parquet file) and
the value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist.storage import DataError

UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000}
LATEST = 4_102_444_800  # 2100-01-01 in seconds: no interaction happens later
MODERN = 100_000_000  # 1973 in seconds: a millisecond or microsecond clock of real events is past it


class TimestampScan:
    """Fed every batch of a timestamp column in file order (`add`), then tells the unit (`unit`)."""

    def __init__(self, source: Path | str, position: Callable[[int], str], unit: str) -> None:
        """`position` names a row of the column, counted from 0 over every batch: `line 12`."""
        self.source, self.position, self.told = source, position, unit
        self.rows = 0
        self.latest: tuple[float, int, str] | None = None  # (value, row, text)
        # per unit, the first (row, text) below 1970 or past 2100 in it, and the first before 1973 in it
        self.out_of_range: dict[str, tuple[int, str]] = {}
        self.early: dict[str, tuple[int, str]] = {}

    def add(self, text: pa.Array) -> None:
        numeric = numbers(text)
        bad = np.isnan(numeric) | ~np.isfinite(numeric)
        if bad.any():
            row = int(bad.argmax())
            raise DataError(f"{self.source}: {self.position(self.rows + row)}: timestamp {text[row].as_py()!r} is not "
                            "a number")
        if len(numeric):
            row = int(numeric.argmax())
            if self.latest is None or numeric[row] > self.latest[0]:
                self.latest = (float(numeric[row]), self.rows + row, text[row].as_py())
        for unit, per in UNIT_PER_SECOND.items():
            seconds = numeric / per
            self._first(self.out_of_range, unit, (seconds < 0) | (seconds > LATEST), text)
            self._first(self.early, unit, seconds < MODERN, text)
        self.rows += len(numeric)

    def unit(self) -> str:
        """The unit, after every batch was added; refuses a column no unit fits, or one that mixes them."""
        unit = self.told if self.told != "auto" else self._guess()
        if unit in self.out_of_range:
            row, text = self.out_of_range[unit]
            raise DataError(f"{self.source}: {self.position(row)}: timestamp {text!r} is no time between 1970 and "
                            f"2100 in {unit} (dataset.timestamp_unit={unit})")
        return unit

    def _guess(self) -> str:
        if self.latest is None:
            return "s"
        value, row, text = self.latest
        unit = next((u for u, per in UNIT_PER_SECOND.items() if value / per <= LATEST), None)
        if unit is None:
            raise DataError(f"{self.source}: {self.position(row)}: timestamp {text!r} is past 2100 even in "
                            "microseconds; set dataset.timestamp_unit if it is a time")
        if unit != "s" and unit in self.early:
            early_row, early_text = self.early[unit]
            raise DataError(f"{self.source}: timestamps mix units: {self.position(row)} has {text!r} (in {unit}) and "
                            f"{self.position(early_row)} {early_text!r}; set dataset.timestamp_unit (s, ms or us)")
        return unit

    def _first(self, found: dict[str, tuple[int, str]], unit: str, bad: np.ndarray, text: pa.Array) -> None:
        if unit not in found and bad.any():
            row = int(bad.argmax())
            found[unit] = (self.rows + row, text[row].as_py())


def to_seconds(text: pa.Array, unit: str) -> np.ndarray:
    """A checked batch (see TimestampScan) as int64 seconds, cut to the second."""
    return np.floor(numbers(text) / UNIT_PER_SECOND[unit]).astype(np.int64)


def numbers(text: pa.Array) -> np.ndarray:
    """The text as float64; a value that is no number becomes NaN."""
    try:  # Arrow's cast parses without a Python object per value
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # some value is no number: pandas tells which (NaN), at Python speed
        return pd.to_numeric(text.to_pandas(), errors="coerce").to_numpy(dtype=np.float64)
