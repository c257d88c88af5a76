"""MLflow tracking on the local disk: scalars and the evaluation files of a test run as artifacts (``.[mlflow]``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.evaluation.tracking import LocalMLFlowLogger
from tests.conftest import module_for
from tests.test_cli import QUICKSTART

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

MLFLOW_CONFIG = QUICKSTART.parent / "mlflow.yaml"
EVALUATION_FILES = {"metrics.json", "report.html", "per_episode.csv"}


def _artifacts(client: MlflowClient, run_id: str) -> tuple[set[str], Path]:
    """The names of the run's ``test/`` artifacts and the local folder holding them."""
    names = {Path(info.path).name for info in client.list_artifacts(run_id, "test")}
    return names, Path(unquote(urlparse(client.get_run(run_id).info.artifact_uri).path)) / "test"


def _check_run(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    """The MLflow run holds the test scalars of metrics.json and byte-identical copies of the evaluation files."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert run.data.metrics["test/acc_ci95"] == pytest.approx(metrics["accuracy_ci95"], abs=1e-6)
    names, folder = _artifacts(client, run_id)
    assert names == EVALUATION_FILES | set(metrics["figures"]) and len(metrics["figures"]) == 4
    for name in names:
        assert (folder / name).read_bytes() == (run_dir / name).read_bytes(), name


def test_fit_and_test_log_scalars_and_evaluation_files_to_a_local_mlflow_store(
    tiny_dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow 3 refuses its plain-folder store unless allowed; the SQLite store of configs/mlflow.yaml costs
    # ~10 s to create (schema migrations), so the slow test below uses it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    torch.manual_seed(0)
    uri = f"file:{tmp_path / 'mlruns'}"
    tracker = LocalMLFlowLogger(experiment_name="medmeta-test", tracking_uri=uri, artifact_location=None)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1, pixel_baseline=False)
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=1, q_query=2, meta_batch_size=2, eval_batch_size=4,
                              image_size=16, test_episodes=4, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(max_steps=2, logger=[CSVLogger(tmp_path, name="csv"), tracker], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    tracker.finalize("success")
    client = MlflowClient(uri)
    _check_run(client, tracker.run_id, Path(trainer.log_dir))
    assert client.get_metric_history(tracker.run_id, "train/loss")  # the fit's scalars went to the same run
    assert client.get_run(tracker.run_id).data.params  # and its hyperparameters


# MLflow's own list of variables that switch its telemetry off (CI, pytest); removed to see what a user's run does
QUIET_VARIABLES = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
                   "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                   "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
                   "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")  # fmt: skip
# run in a child process: every internet connection or name lookup is refused and recorded
NO_NETWORK = """
import atexit, json, socket, sys
attempts = []
def refuse(what):
    attempts.append(what)
    raise OSError("network refused by the test")
socket.getaddrinfo = lambda host, *args, **kwargs: refuse(f"resolve {host}")
connect = socket.socket.connect
socket.socket.connect = lambda self, address: (
    refuse(f"connect {address}") if self.family in (socket.AF_INET, socket.AF_INET6) else connect(self, address))
def report():
    telemetry = sys.modules.get("mlflow.telemetry")
    client = telemetry.get_telemetry_client() if telemetry else None
    print("NETWORK " + json.dumps({"attempts": attempts, "telemetry": client is not None}))
atexit.register(report)  # runs after MLflow's own exit handlers (registered later)
"""


def _python(code: str, *args: str, cwd: Path) -> tuple[dict[str, object], str]:
    """Run ``code`` with the network refused; what it tried and whether MLflow telemetry was on, and its output."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}
    env.update(MEDMETA_CACHE=str(cwd / "cache"), OMP_NUM_THREADS="2", COLUMNS="200")
    done = subprocess.run([sys.executable, "-c", NO_NETWORK + code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return json.loads(output.split("NETWORK ", 1)[1].splitlines()[0]), output


@pytest.mark.slow
def test_the_mlflow_config_tracks_into_sqlite_and_sends_nothing(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """``medmeta fit --config configs/quickstart.yaml --config configs/mlflow.yaml`` (test_after_fit), as documented."""
    plain, _ = _python("from lightning.pytorch.loggers import MLFlowLogger; MLFlowLogger(tracking_uri='sqlite:///p.db')",
                       cwd=tmp_path)  # fmt: skip
    # Lightning's own MLFlowLogger here: MLflow's telemetry starts (and looks up config.mlflow-telemetry.io)
    assert plain["attempts"] or plain["telemetry"], "MLflow's telemetry is off here anyway: the test would prove nothing"
    args = [
        "fit", "--config", str(QUICKSTART), "--config", str(MLFLOW_CONFIG), "--data.root", str(tiny_dicom_root),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.image_size", "16",
        "--data.val_episodes", "2", "--data.test_episodes", "4", "--data.n_way", "3", "--data.q_query", "2",
        "--data.split_ratios", "[0.5, 0.25, 0.25]", "--model.backbone.class_path", "conv4",
        "--model.backbone.init_args.hidden_channels", "8", "--model.algorithm.init_args.inner_steps", "1",
        "--model.algorithm.init_args.eval_inner_steps", "1",
    ]  # fmt: skip
    network, output = _python("from medmeta.cli import main; sys.exit(main(sys.argv[1:]))", *args, cwd=tmp_path)
    assert network == {"attempts": [], "telemetry": False}, output[-3000:]
    run_dir = tmp_path / "runs" / "mlflow" / "version_0"
    assert (run_dir / "report.html").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medmeta").experiment_id])
    _check_run(client, run.info.run_id, run_dir)
    assert (tmp_path / "runs" / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "test" / "report.html").is_file()


def test_a_remote_tracking_server_is_refused() -> None:
    for uri in ("http://tracking.example.org:5000", "https://x", "databricks", "postgresql://db/mlflow"):
        with pytest.raises(ValueError, match="keeps runs on this machine"):
            LocalMLFlowLogger(tracking_uri=uri)
