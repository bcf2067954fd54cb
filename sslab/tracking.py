"""Per-trial training curves where researchers look: TensorBoard event files, or Weights & Biases offline.

A tracker gets each epoch's metrics as the trainer records them (flushed, so the curves of a running study
show while it runs), then the trial's final metrics. Event files go to `results/tensorboard/<trial hash>/`;
`tensorboard --logdir results/tensorboard` shows every trial.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from sslab.config import TrialConfig
from sslab.errors import ConfigError, SslabError

TRACKERS = ("tensorboard", "wandb")
DEFAULT_LOG_DIR = Path("results")


class Tracker(Protocol):
    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None: ...
    def final(self, metrics: Mapping[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, config: TrialConfig, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard" / config.hash()))
        self.writer.add_text("config", f"`{config.record()}`")

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"epoch/{name}", value, epoch)
        self.writer.flush()

    def final(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"final/{name}", value, 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, config: TrialConfig, root: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise SslabError("--log wandb needs the wandb package: pip install 'sslab[wandb]'") from None
        folder = root / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        self.run: Any = wandb.init(
            mode="offline", dir=str(folder), name=config.hash(), config=config.record(), reinit=True
        )

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.run.log({f"epoch/{k}": v for k, v in metrics.items()}, step=epoch)

    def final(self, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"--log {', '.join(unknown)}: unknown; choose from {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


def open_trackers(names: Sequence[str], config: TrialConfig, root: Path = DEFAULT_LOG_DIR) -> list[Tracker]:
    kinds: dict[str, type[Any]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    return [kinds[name](config, root) for name in check_trackers(names)]
