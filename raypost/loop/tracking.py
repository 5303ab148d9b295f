"""Each round's record to TensorBoard or MLflow, the step being the round (`loop.tracking`).

The same backends as training (`tracking: {backend, dir}`), so one `tensorboard --logdir` or
`mlflow ui` shows a loop's rounds beside its trainings. A resumed loop logs to the same MLflow run
(its id is kept in the tracking dir) and logs only the rounds it finishes itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raypost.training.config import TrackingBlock


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a round record, flat: accuracy, per group, teacher spend, seconds per phase."""
    metrics = {"accuracy": record["accuracy"], "accuracy_ci95_low": record["accuracy_ci95"][0],
               "accuracy_ci95_high": record["accuracy_ci95"][1]}
    for group, values in (record.get("per_group") or {}).items():
        metrics[f"accuracy/group_{group}"] = values["accuracy"]
    for scope in ("teacher_round", "teacher_total", "judge_round"):
        for key, value in (record.get(scope) or {}).items():
            metrics[f"{scope}/{key}"] = value
    for key, value in (record.get("seconds") or {}).items():
        metrics[f"seconds/{key}"] = value
    for key in ("kept", "rejected", "train_rows", "train_steps", "train_loss", "pool_accuracy", "pairs", "rollouts"):
        if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool):
            metrics[key] = record[key]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RoundTracker:
    def __init__(self, block: TrackingBlock, run_dir: Path, name: str):
        self.backend = block.backend
        self.dir = Path(block.dir) if block.dir else run_dir / "tracking"
        self.name = name
        self._writer = None
        self._mlflow_run = None
        if self.backend == "mlflow":
            try:
                import mlflow  # noqa: F401
            except ImportError:
                from raypost.config import RecipeError

                raise RecipeError("loop.tracking.backend: mlflow is not installed (pip install 'raypost[tracking]')") \
                    from None

    def log(self, record: dict[str, Any]) -> None:
        if self.backend == "none":
            return
        metrics, step = round_metrics(record), int(record["round"])
        if self.backend == "tensorboard":
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.dir / self.name))
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
            return
        client, run_id = self._mlflow()
        for key, value in metrics.items():
            client.log_metric(run_id, key.replace("/", "."), value, step=step)

    def _mlflow(self):
        import os

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.dir.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.dir.resolve().as_uri())
        if self._mlflow_run is None:
            saved = self.dir / "loop_run.json"
            if saved.exists():
                self._mlflow_run = json.loads(saved.read_text())["run_id"]
            else:
                experiment = client.get_experiment_by_name("raypost-loop")
                experiment_id = experiment.experiment_id if experiment else client.create_experiment("raypost-loop")
                self._mlflow_run = client.create_run(experiment_id, run_name=self.name).info.run_id
                saved.write_text(json.dumps({"run_id": self._mlflow_run}))
        return client, self._mlflow_run

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
