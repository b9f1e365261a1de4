"""Experiment tracking: each stage's run logs its config, its metrics per step or epoch and its final figures
to MLflow, and the same to TensorBoard event files that are published with the stage's outputs
(`<output>/<data-dir>/tensorboard/`), so they sit beside them on S3 too.

Plain MLflow and TensorBoard; nothing here knows Ray. `tracking.enabled=false` starts no run, writes no
event file and never imports mlflow.
"""
from __future__ import annotations

import logging
import numbers
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llmemb_dist import storage
from llmemb_dist.config import Config, flatten, to_dict, to_yaml

log = logging.getLogger(__name__)
TENSORBOARD_DIR = "tensorboard"  # the folder of event files inside a publication


def mlflow_uri(cfg: Config) -> str:
    """Where the runs go: tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else a file store beside the outputs.
    Local paths come back absolute, since Ray Train's controller logs from another working directory."""
    from mlflow.utils.uri import resolve_uri_if_local

    uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = "mlruns" if storage.is_s3(cfg.root) else storage.resolve(storage.join(cfg.root, "mlruns"))[1]
    return resolve_uri_if_local(uri)


@lru_cache(maxsize=None)
def _client(uri: str):
    """One MLflow client per tracking URI and process (the driver, or Ray Train's controller)."""
    # MLflow 3 refuses its file store, our default, unless asked: it stays supported, though no longer
    # developed, and the SQL store would need SQLAlchemy and Alembic on every cluster image.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # its notes on every call would drown our lines
    return mlflow.MlflowClient(uri)


_writers: dict[str, Any] = {}  # open TensorBoard writers of this process, by folder


def _writer(folder: str):
    if folder not in _writers:
        from torch.utils.tensorboard import SummaryWriter

        _writers[folder] = SummaryWriter(folder)
    return _writers[folder]


def _close_writer(folder: str) -> None:
    if folder in _writers:
        _writers.pop(folder).close()


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric figures, named as MLflow allows ("NDCG@10" becomes "NDCG_10"); flags, text and lists left out."""
    return {re.sub(r"[^\w./\- ]", "_", k): float(v) for k, v in flatten(values, "/").items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


@dataclass(frozen=True)
class Sink:
    """Where one run's metrics go. Small and picklable, so that Ray Train's controller can log to the same
    run while workers report (distributed/ray_train.py); it runs on the driver's node, so it can write the
    driver's local TensorBoard folder too."""

    mlflow_uri: str
    run_id: str
    tensorboard_dir: str  # empty: no event files

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        values = _numbers(metrics)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            _client(self.mlflow_uri).log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])
        if self.tensorboard_dir:
            writer = _writer(self.tensorboard_dir)
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()  # the controller's process may end at any moment after training


@dataclass(frozen=True)
class StepLogger:
    """Logs a worker's reported metrics at their step (the value of `step_key`), names prefixed."""

    sink: Sink
    step_key: str
    prefix: str = ""

    def __call__(self, metrics: dict[str, Any]) -> None:
        values = {f"{self.prefix}{k}": v for k, v in metrics.items() if k != self.step_key}
        try:
            self.sink.log(values, int(metrics[self.step_key]))
        except Exception as e:  # a tracking server that is down must not end a training run
            log.warning("tracking: step %s of run %s not logged: %s", metrics.get(self.step_key), self.sink.run_id, e)


class StageRun:
    """One stage's run, as the stage's driver sees it; with tracking off every call does nothing."""

    def __init__(self, sink: Sink | None = None):
        self.sink = sink

    def steps(self, step_key: str, prefix: str = "") -> StepLogger | None:
        """What training should call with each report (None when tracking is off)."""
        return self.sink and StepLogger(self.sink, step_key, prefix)

    def log_final(self, figures: dict[str, Any]) -> None:
        """The stage's final figures (nested sections flattened; non-numeric entries left out)."""
        if self.sink:
            self.sink.log(figures, step=0)

    def log_artifacts(self, folder: str | os.PathLike, path: str) -> None:
        """Files a person reads (a report, its plots) as the run's artifacts under `path`, where the MLflow
        server keeps them after the cluster that made them is gone."""
        if not self.sink:
            return
        try:
            _client(self.sink.mlflow_uri).log_artifacts(self.sink.run_id, str(folder), path)
        except Exception as e:  # a tracking server that is down must not fail a finished stage
            log.warning("tracking: artifacts %s of run %s not logged: %s", path, self.sink.run_id, e)

    def publish(self, pub: storage.Publication) -> None:
        """Names the run in the publication's manifest and adds the event files to it; call it last, after
        every log."""
        if not self.sink:
            return
        pub.info["mlflow"] = {"run_id": self.sink.run_id, "tracking_uri": self.sink.mlflow_uri}
        if self.sink.tensorboard_dir:
            _close_writer(self.sink.tensorboard_dir)
            pub.upload_dir(self.sink.tensorboard_dir, TENSORBOARD_DIR)


@contextmanager
def stage_run(cfg: Config, stage: str, name: str) -> Iterator[StageRun]:
    """An MLflow run named `<stage>-<name>` holding the resolved config as params, ended FINISHED, or
    FAILED when the stage raises."""
    if not cfg.tracking.enabled:
        yield StageRun()
        return
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    uri = mlflow_uri(cfg)
    client = _client(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run_id = client.create_run(experiment_id, run_name=f"{stage}-{name}", tags={"stage": stage}).info.run_id
    params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(to_dict(cfg)).items()]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
    log.info("tracking %s in MLflow run %s (experiment %r at %s)", stage, run_id, cfg.tracking.experiment, uri)
    with tempfile.TemporaryDirectory(prefix="tensorboard-") as folder:
        sink = Sink(uri, run_id, folder if cfg.tracking.tensorboard else "")
        if sink.tensorboard_dir:
            # Indented four spaces: TensorBoard renders text as Markdown, and this keeps the YAML as it is.
            _writer(folder).add_text("config", "\n".join("    " + line for line in to_yaml(cfg).splitlines()))
        try:
            yield StageRun(sink)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        finally:
            _close_writer(folder)
        client.set_terminated(run_id, "FINISHED")
