"""MLflow experiment tracking that stays on this machine (``configs/mlflow.yaml``; ``pip install medmeta[mlflow]``).

``LocalMLFlowLogger`` is Lightning's ``MLFlowLogger`` with two guarantees: the store is local (a
SQLite file or a folder, by ``sqlite:`` or ``file:`` URI; any other store is refused), and MLflow's anonymous usage
telemetry, on by default since MLflow 3 and sent to mlflow-telemetry.io when ``mlflow`` is first
imported, is switched off (``MLFLOW_DISABLE_TELEMETRY=true`` unless the variable is already set),
so a run sends nothing over the network. The evaluation callback logs its files to any
``MLFlowLogger``'s run (``medmeta.evaluation.callback.log_artifacts``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import MLFlowLogger

LOCAL_SCHEMES = ("sqlite", "file")  # not a bare name: "databricks" is a remote store
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow/mlflow.db"
DEFAULT_ARTIFACTS = "runs/mlflow/artifacts"


def disable_mlflow_telemetry() -> None:
    """Switch MLflow's usage telemetry off for this process, also when ``mlflow`` was imported already."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if "mlflow.telemetry" in sys.modules:  # the client was set up at import: set it up again, now disabled
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


class LocalMLFlowLogger(MLFlowLogger):
    """An ``MLFlowLogger`` on a local store with MLflow's telemetry off.

    Args:
        experiment_name: the MLflow experiment (created on first use).
        tracking_uri: ``sqlite:///path.db`` (relative to the working folder; created with its
            folder) or ``file:path`` (MLflow 3 refuses this plain-folder store unless
            ``MLFLOW_ALLOW_FILE_STORE=true``). ``http(s)://`` and other remote stores are refused:
            use ``lightning.pytorch.loggers.MLFlowLogger`` for a tracking server.
        artifact_location: folder for the artifacts of a new experiment (made absolute by MLflow).
        run_name, tags, log_model, prefix, run_id: as in ``MLFlowLogger``.
    """

    def __init__(
        self,
        experiment_name: str = "medmeta",
        tracking_uri: str = DEFAULT_TRACKING_URI,
        artifact_location: str | None = DEFAULT_ARTIFACTS,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        run_id: str | None = None,
    ) -> None:
        scheme = urlparse(tracking_uri).scheme
        if scheme not in LOCAL_SCHEMES:
            raise ValueError(
                f"LocalMLFlowLogger keeps runs on this machine: tracking_uri must be sqlite:///FILE.db or file:FOLDER, "
                f"got {tracking_uri!r} (for a tracking server use lightning.pytorch.loggers.MLFlowLogger)"
            )
        disable_mlflow_telemetry()
        super().__init__(
            experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, tags=tags,
            log_model=log_model, prefix=prefix, artifact_location=artifact_location, run_id=run_id,
        )  # fmt: skip
