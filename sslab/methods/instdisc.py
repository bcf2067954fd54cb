"""Instance Discrimination (Wu et al. 2018): every image is its own class, with a memory bank and NCE.

v = normalize(W f(x)) (128-d, one linear layer). The memory bank holds one v_i per training image; each
step scores v against its own entry v_i and m noise entries drawn uniformly from the bank, with the NCE
objective and a normaliser Z estimated once on the first batch (Sec. 3.2). After the step the entries of
the batch get the proximal update v_i <- normalize(m v_i + (1 - m) v) (m = `bank_momentum`).
With `instdisc.bank_init = "first-visit"` an entry starts as the first feature computed for its image
instead of a random vector: the paper's random start costs nothing over 200 epochs, but in a run of a few
epochs the whole first epoch would pull each image towards a random target.
The paper draws one augmented view per image: only the first view is used.

The step context gives the training set size (for the bank) and the rows of the batch in the training set.
Across processes every process keeps the whole bank and writes the rows of the global batch into it; the
noise of the global batch is drawn alike in every process, each scoring its own rows, and Z is estimated
from the noise of the global batch: together the processes compute what one computes on the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import instdisc_nce_from_cosines, instdisc_partition_from_cosines
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting

# Score against the whole bank while it has at most this many rows per noise draw (n <= 32 m, i.e. up to
# 131,072 images at m = 4096); beyond, gather the drawn entries.
_MATMUL_BANK_ROWS_PER_DRAW = 32


class InstDiscSettings(MethodSettings):
    name = "instdisc"
    paper = "Wu et al. 2018, Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
    shared_defaults = {"head": 1, "lr": 0.03}  # 128-d output of one linear layer, as in the paper
    multiprocess = True  # tests/test_distributed_methods.py

    temperature = Setting(0.07, "NCE temperature tau", "InstDisc", above=0)
    negatives = Setting(4096, "noise samples m per positive", "InstDisc", minimum=1)
    bank_momentum = Setting(0.5, "proximal update of the memory bank", "InstDisc", minimum=0, maximum=1)
    # first-visit: measured on 3,000 embedded images x 2 epochs, the random start ends 6 points below the
    # random-init probe.
    bank_init = Setting(
        "first-visit",
        "memory bank at the start: random (the paper) | first-visit",
        "measured here",
        choices=("random", "first-visit"),
    )


@register(InstDiscSettings)
class InstDisc(Method):
    head: Head
    bank: Tensor  # (n, D) memory bank, one entry per training image
    z: Tensor  # () normaliser Z, 0 until estimated
    steps: Tensor  # () steps taken, seeds the noise draws
    visited: Tensor  # (n,) entries written so far

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.register_buffer("bank", torch.zeros(0, self.head.out_dim))  # (n, D), allocated on first use
        self.register_buffer("z", torch.zeros((), dtype=torch.float64))  # Z; 0 until estimated
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # seeds the noise draws
        self.register_buffer("visited", torch.zeros(0, dtype=torch.bool))  # (n,) entries written so far
        self._pending: tuple[Tensor, Tensor] | None = None

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        s, gather = self.settings, step.gather
        index = step.batch_indices  # (N,)
        v = F.normalize(self.head(self.backbone(views[0])), dim=1)  # (N, D)
        if self.bank.shape[0] != step.num_images:
            bank = torch.randn(step.num_images, v.shape[1], device=v.device, dtype=self.bank.dtype)
            bank = F.normalize(bank, dim=1)
            self.bank = gather.sum(bank if gather.rank == 0 else torch.zeros_like(bank))  # the main one's
            self.visited = torch.zeros(step.num_images, dtype=torch.bool, device=v.device)
        index_all, v_all = gather(index), gather(v.detach())  # (M,), (M, D): rows of the global batch
        if s.bank_init == "first-visit":
            new = ~self.visited[index_all]  # (M,)
            self.bank[index_all[new]] = v_all[new].to(self.bank.dtype)
            self.visited[index_all] = True
        n_data, m = self.bank.shape[0], s.negatives
        generator = torch.Generator(v.device).manual_seed(self.config.seed * 1_000_003 + int(self.steps))
        noise = torch.randint(n_data, (len(index_all), m), device=v.device, generator=generator)  # P_n = 1/n
        noise = noise[gather.offset(len(index)) :][: len(index)]  # this process's rows (N, m)
        with torch.autocast(v.device.type, enabled=False):  # cosines / 0.07 need more than bf16's 3 digits
            v32 = v.to(torch.promote_types(v.dtype, torch.float32))
            noise_cosines = self.noise_cosines(v32, noise)  # (N, m)
            positive_cosines = (v32 * self.bank[index]).sum(dim=1)  # (N,)
        if self.z <= 0:  # from the noise of the global batch
            self.z.fill_(
                instdisc_partition_from_cosines(gather(noise_cosines.detach()), n_data, s.temperature)
            )
        loss = instdisc_nce_from_cosines(
            positive_cosines, noise_cosines, n_data, float(self.z), s.temperature
        )
        self._pending = (index_all, v_all)
        return StepOutput(loss=loss, embedding=v)

    def noise_cosines(self, v: Tensor, noise: Tensor) -> Tensor:
        """Cosines v_n . bank[noise_nj] (N, m) of unit features (N, D) with their noise draws (N, m).

        Gathering the (N, m, D) entries (256 x 4096 x 128 floats, 0.5 GB, per step) is memory-bound; while
        the bank has at most `_MATMUL_BANK_ROWS_PER_DRAW` rows per draw, scoring v against every entry in
        one matrix product and picking the drawn columns is several times faster (benchmarks/methods.py).
        """
        if self.bank.shape[0] <= _MATMUL_BANK_ROWS_PER_DRAW * noise.shape[1]:
            return (v @ self.bank.T).gather(1, noise)  # (N, n) -> (N, m)
        return torch.einsum("nd,nmd->nm", v, self.bank[noise])

    @torch.no_grad()
    def after_step(self, step: StepContext) -> None:
        if self._pending is None:
            return
        index, v = self._pending
        m = self.settings.bank_momentum
        self.bank[index] = F.normalize(m * self.bank[index] + (1 - m) * v.to(self.bank.dtype), dim=1)
        self.steps.add_(1)
        self._pending = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        bank = state_dict.get(prefix + "bank")
        if bank is not None:  # the bank is sized by the data: take the checkpoint's shape
            self.bank = torch.empty_like(bank, device=self.bank.device)
            self.visited = torch.empty(len(bank), dtype=torch.bool, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
