"""VICReg, NNCLR and InvaSpread in two CPU processes (gloo) compute what one process computes on the global
batch: the loss, the gradients and every piece of state after a few optimiser steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo import WORLD, run_ranks
from steps import step_context

from sslab import distributed
from sslab.config import from_mapping
from sslab.methods.base import Gather, Method, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer

GLOBAL_BATCH = 8
SIZE = 16
STEPS = 3
# Small widths keep the processes fast; the queue (12 rows) wraps around within the three steps of 8 images.
# SGD, not the methods' Adam: Adam divides by the gradient's magnitude, so the float rounding of a gradient
# that is zero in exact arithmetic (VICReg's last expander bias) would become a full step. In float64: NNCLR's
# nearest neighbour is an argmax, and float32 rounding that differs between one and two processes flipped a
# near tie on one CPU, which is a different (equally right) neighbour, not a different computation.
COMMON = {"batch_size": GLOBAL_BATCH, "sync_bn": True, "optimizer": "sgd", "lr": 0.1, "out_dim": 16}
METHODS: dict[str, dict[str, object]] = {
    "vicreg": {"head_width": 32},
    "nnclr": {"head_width": 32, "queue_size": 12, "pred_width": 16},
    "invaspread": {},
}


def _method(name: str) -> Method:
    config = from_mapping({"method": name, **COMMON, **METHODS[name]})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", 1, SIZE), num_classes=4).double()


def _views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return list(torch.randn(2, GLOBAL_BATCH, 1, SIZE, SIZE, generator=g, dtype=torch.float64))


def _train(method: Method, rows: slice, gather: Gather) -> dict:
    """STEPS optimiser steps on this process's `rows` of each global batch, as the trainer runs them."""
    optimizer = build_optimizer(method.config, method)
    method.train()
    losses, grads = [], {}
    for step in range(STEPS):
        views = [v[rows] for v in _views(step)]
        indices = torch.arange(GLOBAL_BATCH)[rows] + step * GLOBAL_BATCH
        context = step_context(step, STEPS, indices=indices, gather=gather, rows=len(indices))
        out = method(views, torch.zeros(len(indices), dtype=torch.long), context)
        optimizer.zero_grad()
        out.loss.backward()
        distributed.average_gradients(method)
        method.before_optimizer_step(context)
        grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
        optimizer.step()
        method.after_step(context)
        losses.append(distributed.all_reduce_mean(out.loss.detach()))
    return {"losses": torch.stack(losses), "grads": grads, "state": method.state_dict()}


def _worker(rank: int, device: torch.device, out: Path) -> dict:
    rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = {}
    for name in METHODS:
        method = _method(name)
        distributed.convert_sync_batchnorm(method, device)
        distributed.broadcast_module(method)
        results[name] = _train(method, rows, distributed.ProcessGather())
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("family-ranks"))


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_match_one_process_on_the_global_batch(name: str, ranks: list[dict]) -> None:
    single = _train(_method(name), slice(None), Gather())
    initial = _method(name).state_dict()
    for result in (r[name] for r in ranks):
        torch.testing.assert_close(result["losses"], single["losses"], atol=1e-5, rtol=1e-5)
        assert result["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 5
        for key, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][key], grad, atol=1e-5, rtol=1e-4, msg=key)
        assert result["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():  # weights, batch-norm statistics, NNCLR's support set
            torch.testing.assert_close(result["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    moved = [key for key, value in single["state"].items() if not torch.equal(initial[key], value)]
    assert len(moved) > 5  # the steps changed the state, so the match is not trivial
    if name == "nnclr":  # the support set took 24 rows of the global batches into its 12, wrapping around
        assert int(single["state"]["queue_filled"]) == 12 and int(single["state"]["queue_next"]) == 0
        assert "queue" in moved
