"""Where a training run's figures go, epoch by epoch: TensorBoard, MLflow or nowhere."""

from __future__ import annotations

from pathlib import Path


class Tracker:
    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.writer = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        elif kind == "mlflow":
            import mlflow

            mlflow.set_tracking_uri((folder / "mlruns").as_uri())
            mlflow.start_run()
            self.writer = mlflow

    def log(self, values: dict, step: int) -> None:
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        elif self.kind == "mlflow":
            self.writer.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "mlflow":
            self.writer.end_run()

