"""Experiment tracking through the extras: TensorBoard event files and a W&B offline run (and an
MLflow file store) hold the run's metrics and its resolved config; a missing package is one
line naming the extra to install. Each test skips when its package is not installed."""

import importlib.util
import json

import pytest

from finetune.config import load_config
from finetune.errors import UsageError
from finetune.training.logs import check_loggers
from finetune.training.loop import main, make_fabric


def _train(out_dir, loggers, **overrides):
    cfg = load_config("tiny-lora", {"out_dir": str(out_dir), "output.progress": "false", "output.plot": "false",
                                    "train.max_steps": "2", "output.loggers": f"[{loggers}]",
                                    **{k: str(v) for k, v in overrides.items()}})
    main(make_fabric(cfg), cfg)
    return cfg


def _needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


@_needs("tensorboard")
def test_tensorboard_events_hold_metrics_and_the_resolved_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _train(tmp_path / "run", "tensorboard", **{"lora.r": 4})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "train_loss" in events.Tags()["scalars"]
    hparams = {}
    for tag, content in events.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {k: v.ListFields()[0][1] for k, v in data.session_start_info.hparams.items()}
    assert hparams["lora/r"] == 4
    assert hparams["model/name"] == "tiny"
    assert hparams["train/max_steps"] == 2
    assert hparams["resolved/micro_batch_size"] >= 1


@_needs("wandb")
def test_wandb_offline_run_has_the_config_project_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))  # nothing under the user's home
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    import wandb

    try:
        _train(tmp_path / "run", "csv,wandb", **{"output.project": "tracking-test", "output.run_name": "tiny-2"})
        run = wandb.run
        assert run is not None and run.offline
        assert run.project == "tracking-test" and run.name == "tiny-2"
        assert run.config["lora"]["r"] == 8 and run.config["model"]["name"] == "tiny"
        assert run.config["resolved"]["world_size"] == 1
        assert run.summary["train_loss"] > 0
    finally:
        wandb.finish()
    offline = list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


@_needs("mlflow")
def test_mlflow_file_store_has_params_and_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage unless told not to
    _train(tmp_path / "run", "mlflow")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file:{tmp_path / 'run' / 'mlruns'}")
    exp = client.get_experiment_by_name("finetune")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run"  # the out_dir's name
    assert run.data.params["lora/r"] == "8"
    assert "train_loss" in run.data.metrics


def test_a_missing_logger_package_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    check_loggers(["csv"])
    with pytest.raises(UsageError, match=r"tensorboard package is not installed: pip install -e '.*\[tensorboard\]'"):
        check_loggers(["csv", "tensorboard"])


def test_project_and_run_name_are_settings():
    cfg = load_config("tiny-lora", {"output.project": "p", "output.run_name": "r", "output.loggers": "[csv,mlflow]"})
    assert (cfg.output.project, cfg.output.run_name, cfg.output.loggers) == ("p", "r", ["csv", "mlflow"])
    assert json.dumps(cfg.output.__dict__)  # plain values: they go into every logger's run config
