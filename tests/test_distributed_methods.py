"""Every method marked `multiprocess`: two CPU processes (gloo) train as one process on the global batch.

Both processes are spawned once for all methods; each runs a few optimiser steps of every method on its half
of the same views, and the results (losses, gradients, the whole state dict: centres, queues, banks,
prototypes, momentum encoders) are compared with one process trained on the whole batch.
"""

from pathlib import Path

import pytest
import torch
from gloo import WORLD, run_ranks
from steps import step_context

from sslab import distributed
from sslab.config import from_mapping
from sslab.methods.base import Gather, Method, build_method
from sslab.methods.catalog import method_info
from sslab.methods.momentum import SHUFFLE_BN_GROUP, shuffled_bn_forward
from sslab.models import build_backbone

GLOBAL_BATCH = 8
SIZE, LOCAL_SIZE = 8, 4  # global and local crops
STEPS = 3
NUM_IMAGES = 16  # two steps visit every image once; the third revisits the first eight

# Small settings, so that queues and the memory bank fill (and wrap) within the steps run.
CASES: dict[str, dict] = {
    "simclr": {},
    "simclr-memory": {"method": "simclr", "momentum_encoder": True, "queue_size": 12},
    "moco": {"queue_size": 20},  # 16 keys a step: wraps in the second step
    "moco-in-batch": {"method": "moco", "queue_size": 0},
    "mocov3": {"pred_width": 32},
    "byol": {"pred_width": 32},
    "simsiam": {"pred_width": 8},
    "supervised": {},
    "dino": {"out_dim": 64, "teacher_temp_epochs": 2.0},  # the centre moves and the temperature warms up
    # The queue is full after two steps and joins the codes in the third.
    "swav": {"prototypes": 16, "queue_size": 12, "freeze_prototypes": 0.0},
    "barlow": {"out_dim": 32},
    "instdisc": {"negatives": 16},  # first visits, then proximal updates of revisited entries
    "instdisc-random-bank": {"method": "instdisc", "negatives": 16, "bank_init": "random"},
}


def _build(case: str) -> Method:
    values = {"method": case, **CASES[case]}
    small = {"backbone": "smallcnn", "sync_bn": True, "head_width": 32, "out_dim": 16, "lr": 0.05}
    config = from_mapping({**small, "batch_size": GLOBAL_BATCH, **values, "epochs": 2})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", 3, SIZE), num_classes=4)


def _batch(step: int, batch: int, local_crops: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Views, labels and training-set rows of the global batch of step `step`."""
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g) for _ in range(local_crops)]
    indices = (torch.arange(batch) + step * batch) % NUM_IMAGES
    return views, torch.arange(batch) % 4, indices


def _train(case: str, gather: Gather) -> dict:
    """STEPS optimiser steps on this process's share of every global batch, as the trainer takes them."""
    method = _build(case).double()  # float64: no rounding differences that training steps could amplify
    if distributed.world_size() > 1:
        distributed.convert_sync_batchnorm(method, torch.device("cpu"))
        distributed.broadcast_module(method)
    lr, batch = method.config.lr, method.config.batch_size
    share = batch // gather.world_size
    part = slice(gather.rank * share, (gather.rank + 1) * share)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    method.train()
    losses, grads = [], {}
    for step in range(STEPS):
        views, labels, indices = _batch(step, batch, method.config.local_crops)
        context = step_context(
            step, STEPS, epochs=2, indices=indices[part], num_images=NUM_IMAGES, gather=gather
        )
        out = method([v[part].double() for v in views], labels[part], context)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        distributed.average_gradients(method)
        method.before_optimizer_step(context)
        grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
        optimizer.step()
        method.after_step(context)
        losses.append(distributed.all_reduce_mean(out.loss.detach()))
    state = {name: value.clone() for name, value in method.state_dict().items()}
    return {"losses": torch.stack(losses), "grads": grads, "state": state}


def _worker(rank: int, device: torch.device, out: Path) -> dict:
    results: dict = {case: _train(case, distributed.ProcessGather()) for case in CASES}
    # MoCo's shuffling BN under synchronised batch-norm: sub-batches joined over the processes.
    sizes: list[int] = []
    bn = distributed.SyncBatchNorm(5)
    shuffled_bn_forward(lambda x: sizes.append(len(x)) or bn(x), torch.randn(64, 5), synced=WORLD)
    results["sub_batches"] = sizes
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("ranks"))


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if expected.is_floating_point():
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=what)
    else:
        assert torch.equal(actual, expected), what


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one_process_on_the_global_batch(ranks: list[dict], case: str) -> None:
    single = _train(case, Gather())
    initial = _build(case).double().state_dict()
    moved = [name for name, value in single["state"].items() if not torch.equal(value, initial[name])]
    assert len(moved) > 10 and len(single["grads"]) > 5  # the steps changed the state: not a trivial match
    for result in ranks:
        run = result[case]
        _close(run["losses"], single["losses"], f"{case} losses")
        assert run["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            _close(run["grads"][name], grad, f"{case} gradient of {name}")
        assert run["state"].keys() == single["state"].keys()
        for name, value in single["state"].items():
            _close(run["state"][name], value, f"{case} {name}")


def test_the_method_state_that_must_be_global_is_exercised(ranks: list[dict]) -> None:
    """The queues fill and wrap, the memory bank is written for every image, the DINO centre moves."""
    state = {case: ranks[1][case]["state"] for case in ("swav", "moco", "instdisc", "dino")}
    assert int(state["swav"]["queue_filled"]) == 12 and state["swav"]["queue"].abs().sum() > 0
    assert int(state["moco"]["contrast.queue.ptr"]) == (STEPS * 2 * GLOBAL_BATCH) % 20
    assert bool(state["instdisc"]["visited"].all()) and state["instdisc"]["z"] > 0
    assert state["dino"]["center"].abs().sum() > 0


def test_shuffling_bn_sub_batches_joined_over_processes_keep_one_process_size(ranks: list[dict]) -> None:
    # 64 rows in each of two processes: four sub-batches of 16 each, joined into 32 as one process makes.
    assert all(r["sub_batches"] == [16, 16, 16, 16] for r in ranks)
    assert SHUFFLE_BN_GROUP == 2 * 16


def test_the_methods_tested_here_are_marked_to_run_in_several_processes() -> None:
    tested = {CASES[case].get("method", case) for case in CASES}
    assert len(tested) == 10 and all(method_info(name).multiprocess for name in tested)
