"""The pretraining loop: batched on-device augmentation, mixed precision, schedule, checkpoints, progress."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab import distributed
from sslab.augment.spec import Step
from sslab.augment.view import View, parse_view
from sslab.batches import ImageParts, image_source
from sslab.config import TrialConfig
from sslab.errors import SslabError
from sslab.methods.base import Gather, Method, StepContext
from sslab.metrics import COLLAPSE_RATIO, EPOCH_SECONDS, IMAGES_PER_S, LOSS, LR, OUTPUT_STD
from sslab.optim import build_optimizer, lr_at, scaled_lr, weight_decay_at
from sslab.pipeline import PIPELINE_VERSION, derived_seed
from sslab.runtime import native_bf16_cpu, tune_allocator

READBACK_STEPS = 25  # on an accelerator: steps between reads of the loss (progress, non-finite check)
COLLAPSED_BELOW = 0.1  # a collapse ratio below this (output std < 0.1/sqrt(d)): the outputs have collapsed


class TrialFailed(SslabError):
    """Training cannot go on (non-finite loss, ...); the message is the reason stored with the trial."""


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    loss: float
    output_std: float  # mean over dims of the std of l2-normalised outputs (SimSiam Fig. 2)
    collapse_ratio: float  # output_std * sqrt(d): ~1 when healthy, ~0 when collapsed
    lr: float
    images_per_s: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # what `pretrain(measure=...)` measured

    def metrics(self) -> dict[str, float]:
        return {
            **self.extra,
            LOSS.name: self.loss,
            OUTPUT_STD.name: self.output_std,
            COLLAPSE_RATIO.name: self.collapse_ratio,
            LR.name: self.lr,
            IMAGES_PER_S.name: self.images_per_s,
            EPOCH_SECONDS.name: self.seconds,
        }


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0

    @property
    def collapsed(self) -> bool:
        return bool(self.history) and self.history[-1].collapse_ratio < COLLAPSED_BELOW

    @property
    def images_per_s(self) -> float:
        rates = [r.images_per_s for r in self.history]
        return sum(rates) / len(rates) if rates else 0.0


class Reporter(Protocol):
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def step(self, done_steps: int, loss: float, images_per_s: float) -> None: ...
    def epoch(self, record: EpochRecord) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, done_steps: int, loss: float, images_per_s: float) -> None:
        pass

    def epoch(self, record: EpochRecord) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SslabError(f"device {name} requested but CUDA is not available; use --device cpu or auto")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise SslabError("device mps requested but MPS is not available; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(
    precision: str, device: torch.device, pipeline: int = PIPELINE_VERSION
) -> torch.dtype | None:
    """The autocast dtype for a precision setting, None for full fp32; `auto` on a CPU depends on the
    shared pipeline's version (`sslab.pipeline`)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: mixed precision only where the hardware computes it natively; elsewhere it is slower than fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and pipeline >= 3 and native_bf16_cpu():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """What a trial computes in, as stored with it: fp32, bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class PrecisionWarning(UserWarning):
    """A precision that this hardware computes slowly."""


def emulated_precision_warning(precision: str, device: torch.device) -> str | None:
    """A note when bf16 was asked for on a CPU that emulates it (many times slower than fp32)."""
    if device.type != "cpu" or precision != "bf16" or native_bf16_cpu():
        return None
    return (
        "bf16 on this CPU is emulated (no AVX512-BF16 or AMX): a step takes many times as long as in "
        "fp32; --precision auto picks fp32 here"
    )


def channel_stats(images: Tensor | ImageParts) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units, shaped (1, C, 1, 1)."""
    sample = images[:: max(1, images.shape[0] // 5000)].float() / 255.0
    mean = sample.mean(dim=(0, 2, 3), keepdim=True)
    std = sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return mean, std


@dataclass(frozen=True)
class ViewPlan:
    """The views drawn per image: two global views, then `local_crops` small local crops (multi-crop)."""

    global_views: tuple[View, ...]
    local_view: View | None
    local_crops: int
    local_size: int
    base: View | None = None  # drawn once per image; every view starts from its output

    def __call__(self, x: Tensor, generator: torch.Generator) -> list[Tensor]:
        if self.base is not None:
            x = self.base(x, generator)
        views = [view(x, generator) for view in self.global_views]
        if self.local_view is not None:
            for _ in range(self.local_crops):
                crop = self.local_view(x, generator)
                if crop.shape[-1] != self.local_size:  # pipeline 1 cut local crops at the full size
                    crop = F.interpolate(crop, size=self.local_size, mode="bilinear", antialias=True)
                views.append(crop)
        return views


def plan_views(config: TrialConfig, image_size: int) -> ViewPlan:
    """Global views from --aug/--aug1/--aug2, after --base-aug's shared step; local crops reuse the first
    view's ops with a smaller crop."""
    pipeline = config.pipeline_version
    global_views = tuple(parse_view(spec, pipeline) for spec in config.view_specs)
    base = parse_view(config.base_aug, pipeline) if config.base_aug else None
    if config.local_crops == 0:
        return ViewPlan(global_views, None, 0, image_size, base)
    low, high = (float(v) for v in config.local_scale.split("-"))
    size = config.local_size or max(8, round(image_size * 3 / 7))
    crop = parse_view("crop").steps[0]
    # Pipeline 2 crops straight to the local size, as torchvision's RandomResizedCrop does.
    crop_params = {**crop.params, "scale": (low, high), "size": float(size) if pipeline >= 2 else 0.0}
    steps = [step for step in global_views[0].steps if step.op.name != "crop"]
    local = View([Step(crop.op, crop_params), *steps], pipeline)
    return ViewPlan(global_views, local, config.local_crops, size, base)


def stream_seed(config: TrialConfig, purpose: str, rank: int = 0) -> int:
    """The seed of one of a trial's random streams: derived from (seed, purpose, rank), so no two purposes,
    processes or replicate seeds share one (pipeline 1 seeded the data order with the seed and augmentation
    with seed + 1 + rank)."""
    if config.pipeline_version < 2:
        return {"order": config.seed, "augment": config.seed + 1 + rank}[purpose]
    return derived_seed(config.seed, f"{purpose}-{rank}")


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return max(1, num_images // batch_size)


def _global_rng(device: torch.device) -> dict[str, Any]:
    """The state of torch's global generators, which methods draw from (MoCo's shuffle, InstDisc's bank)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_global_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def pretrain(
    method: Method,
    config: TrialConfig,
    images: Tensor | ImageParts,
    labels: Tensor,
    device: torch.device,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    measure: Callable[[Method, EpochRecord], dict[str, float]] | None = None,
    stream: bool | None = None,
    views: Callable[[Tensor, torch.Generator], list[Tensor]] | None = None,
) -> TrainResult:
    """Pretrain `method` on uint8 `images` (N, C, H, W), one tensor or parts read in place (train and
    unlabelled); returns the per-epoch history.

    The images are held on `device` when they fit there, else streamed from host memory (`sslab.batches`;
    `stream` True or False decides instead). `views` makes each batch's views from its [0, 1] images instead
    of the config's augmentation (`benchmarks/augment_fidelity.py` trains on other pipelines' views).
    `on_epoch` runs after each epoch's checkpoint is written (the store records metrics there). `measure`
    runs before it, given the epoch's record so far (label-free metrics, a study's validation kNN): what it
    returns is kept in the record and the checkpoint, so a resumed trial replays it.
    Under torchrun `config.batch_size` is the global batch: each process trains on its own contiguous share
    of every batch, gradients are averaged over the processes, and only the main process reports progress,
    writes checkpoints and calls `on_epoch`.
    """
    main, rank = distributed.is_main(), distributed.rank()
    distributed.check_method(config.info)
    local_batch = distributed.local_batch_size(config.batch_size)  # this process's share of each batch
    reporter = (reporter if main else None) or SilentReporter()
    on_epoch = on_epoch if main else None
    tune_allocator()
    views = views or plan_views(config, images.shape[-1])
    mean, std = (t.to(device) for t in channel_stats(images))
    source = image_source(images, device, stream)
    labels = labels.to(device)
    channels_last = device.type != "mps" and method.backbone.channels_last
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if config.compile:
        method.backbone.compile()  # in place: the state dict keeps its keys, checkpoints stay loadable
    if distributed.world_size() > 1:
        if config.sync_bn:
            distributed.convert_sync_batchnorm(method, device)
        distributed.broadcast_module(method)  # every process starts from the main process's weights
    gather = distributed.ProcessGather() if distributed.world_size() > 1 else Gather()
    optimizer = build_optimizer(config, method, method.fixed_lr_parameters())
    amp_dtype = autocast_dtype(config.precision, device, config.pipeline_version)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    per_epoch = steps_per_epoch(images.shape[0], config.batch_size)
    total_steps = per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * per_epoch)
    base_lr = scaled_lr(config)
    sampler = torch.Generator().manual_seed(stream_seed(config, "order"))
    augment_rng = torch.Generator(device=device).manual_seed(stream_seed(config, "augment", rank))
    result = TrainResult()
    start_epoch = 0

    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        sampler.set_state(state["sampler"])
        rng_states = state.get("augment_rng_ranks", [])  # one per process
        rng_state = rng_states[rank] if len(rng_states) == distributed.world_size() else state["augment_rng"]
        augment_rng.set_state(rng_state.cpu() if device.type == "cpu" else rng_state)
        global_states = state.get("global_rng_ranks", [])  # torch's own generators (MoCo's shuffle, ...)
        if len(global_states) == distributed.world_size():
            _set_global_rng(global_states[rank], device)
        result.history = [EpochRecord(**r) for r in state["history"]]
        result.train_seconds = state["train_seconds"]
        start_epoch = result.resumed_from_epoch = state["epoch"]
        if on_epoch is not None:
            for record in result.history:
                on_epoch(record)

    reporter.start(total_steps, start_epoch * per_epoch)
    method.train()
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(images.shape[0], generator=sampler)
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, -1: none
        std_sum = torch.zeros((), device=device)
        method_sums: dict[str, Tensor] = {}  # the method's own diagnostics, summed over the epoch's steps
        width = 1
        lr = base_lr
        for index in range(per_epoch):
            step = epoch * per_epoch + index
            lr = lr_at(step, total_steps, warmup_steps, base_lr)
            decay = weight_decay_at(step, total_steps, config.weight_decay, config.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"] = base_lr if group.get("fixed_lr") else lr
                if group.get("decays"):
                    group["weight_decay"] = decay
            start = index * config.batch_size + rank * local_batch
            cpu_index = order[start : start + local_batch]
            if index + 1 < per_epoch:  # a streamed source gathers the next batch while this step runs
                source.prefetch(order[start + config.batch_size : start + config.batch_size + local_batch])
            batch_index = cpu_index.to(device)
            # one copy of the indices to the device: a resident source gathers with them there
            x = (
                source.batch(cpu_index if source.streamed else batch_index).float().div_(255.0)
            )  # (B, C, H, W)
            batch_views = [(view - mean) / std for view in views(x, augment_rng)]
            if channels_last:
                batch_views = [v.contiguous(memory_format=torch.channels_last) for v in batch_views]
            context = StepContext(
                progress=step / total_steps,
                progress_after=(step + 1) / total_steps,
                epochs_done=step / per_epoch,
                batch_indices=batch_index,
                num_images=images.shape[0],
                gather=gather,
                mean=mean,
                std=std,
            )
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = method(batch_views, labels[batch_index], context)
            loss = out.loss.float()
            mean_loss = distributed.all_reduce_mean(loss.detach())  # the global batch's; all processes stop
            # On an accelerator the first non-finite step is noted on the device and read back every
            # READBACK_STEPS steps, so the step never waits for the host; a CPU has nothing to wait for.
            first_bad = torch.where(~torch.isfinite(mean_loss) & (first_bad < 0), step, first_bad)
            read_back = device.type == "cpu" or (index + 1) % READBACK_STEPS == 0 or index + 1 == per_epoch
            if read_back and int(first_bad) >= 0:
                bad_step = int(first_bad)
                raise TrialFailed(
                    f"non-finite loss at epoch {bad_step // per_epoch + 1}, step {bad_step % per_epoch + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            distributed.average_gradients(method)
            scaler.unscale_(optimizer)  # the method sees true gradients (DINO clips them)
            method.before_optimizer_step(context)
            scaler.step(optimizer)
            scaler.update()
            method.after_step(context)
            with torch.no_grad():
                embedding = F.normalize(out.embedding.detach().float(), dim=1)
                width = embedding.shape[1]
                std_sum += embedding.std(dim=0).mean()
                for name, value in out.metrics.items():
                    value = torch.as_tensor(value, dtype=torch.float32, device=device).detach()
                    method_sums[name] = method_sums.get(name, torch.zeros((), device=device)) + value
                loss_sum += mean_loss
            elapsed = time.perf_counter() - epoch_start
            if read_back:
                rate = (index + 1) * config.batch_size / max(elapsed, 1e-9)
                reporter.step(step + 1, mean_loss.item(), rate)
        seconds = time.perf_counter() - epoch_start
        output_std = distributed.all_reduce_mean(std_sum / per_epoch).item()
        record = EpochRecord(
            epoch=epoch + 1,
            loss=(loss_sum / per_epoch).item(),
            output_std=output_std,
            collapse_ratio=output_std * math.sqrt(width),
            lr=lr,
            images_per_s=per_epoch * config.batch_size / seconds,
            seconds=seconds,
        )
        record.extra = {
            name: distributed.all_reduce_mean(total / per_epoch).item() for name, total in method_sums.items()
        }
        if measure is not None and main:
            record.extra.update(measure(method, record))
            method.train()
        result.history.append(record)
        result.train_seconds += seconds
        if checkpoint is not None:
            rng_states = distributed.all_gather_objects(augment_rng.get_state())
            global_states = distributed.all_gather_objects(_global_rng(device))
        if checkpoint is not None and main:
            _save_checkpoint(
                checkpoint,
                {
                    "epoch": epoch + 1,
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "sampler": sampler.get_state(),
                    "augment_rng": augment_rng.get_state(),
                    "augment_rng_ranks": rng_states,
                    "global_rng_ranks": global_states,
                    "history": [r.__dict__ for r in result.history],
                    "train_seconds": result.train_seconds,
                },
            )
        reporter.epoch(record)
        if on_epoch is not None:
            on_epoch(record)
    reporter.finish()
    method.eval()
    source.close()  # its background thread; an exception leaves it to the garbage collector
    return result
