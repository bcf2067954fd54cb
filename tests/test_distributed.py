"""Multi-process training: two CPU processes (gloo) compute what one process computes on the global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import WORLD, run_ranks
from steps import step_context
from torch import nn

from sslab import distributed
from sslab.config import from_mapping
from sslab.errors import ConfigError
from sslab.losses import nt_xent
from sslab.methods.base import Gather, Method, build_method
from sslab.models import build_backbone
from sslab.store import Store
from sslab.train import pretrain

GLOBAL_BATCH = 8
SIZE = 16


def _simclr(**changes: object) -> Method:
    config = from_mapping({"backbone": "smallcnn", "sync_bn": True, "out_dim": 16, **changes})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", 3, SIZE), num_classes=4)


def _views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(2, GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)
    return v1, v2, torch.arange(GLOBAL_BATCH) % 4


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (32, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return images, torch.arange(32) % 4


PRETRAIN = {"aug": "identity", "batch_size": GLOBAL_BATCH, "epochs": 1, "lr": 0.3, "warmup_epochs": 0}


def _one_step(
    method: Method, v1: torch.Tensor, v2: torch.Tensor, labels: torch.Tensor, gather: Gather
) -> dict:
    method.train()
    out = method([v1, v2], labels, step_context(gather=gather, rows=len(labels)))
    out.loss.backward()
    distributed.average_gradients(method)
    return {
        "loss": distributed.all_reduce_mean(out.loss.detach()),
        "grads": {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None},
        "buffers": {name: b.clone() for name, b in method.named_buffers() if "running" in name},
    }


def _worker(rank: int, device: torch.device, out: Path) -> dict:
    results: dict = {"device": str(device), "backend": dist.get_backend(), "rank": distributed.rank()}
    # One step by hand, as the trainer sets it up: synchronised batch-norm, same weights, gathered negatives.
    method = _simclr()
    distributed.convert_sync_batchnorm(method, device)
    distributed.broadcast_module(method)
    v1, v2, labels = _views()
    part = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results["step"] = _one_step(method, v1[part], v2[part], labels[part], distributed.ProcessGather())
    # The whole trainer: deterministic views (identity augmentation), four SGD steps.
    trained = _simclr(**PRETRAIN)
    images, image_labels = _images()
    history = pretrain(trained, trained.config, images, image_labels, device).history
    results["state"] = trained.state_dict()
    results["loss"] = history[-1].loss
    # --resume: every process continues from its own augmentation state, as if never interrupted.
    random_views = {**PRETRAIN, "aug": "crop,flip,color", "epochs": 2}
    checkpoint, first_epoch = out / "last.pt", out / "epoch1.pt"
    uninterrupted = _simclr(**random_views)
    pretrain(
        uninterrupted,
        uninterrupted.config,
        images,
        image_labels,
        device,
        checkpoint=checkpoint,
        on_epoch=lambda record: record.epoch == 1 and shutil.copy(checkpoint, first_epoch),
    )
    distributed.barrier()
    resumed = _simclr(**random_views)
    pretrain(resumed, resumed.config, images, image_labels, device, checkpoint=first_epoch, resume=True)
    continued = resumed.state_dict()
    results["resume_equal"] = all(torch.equal(v, continued[k]) for k, v in uninterrupted.state_dict().items())
    try:
        distributed.local_batch_size(GLOBAL_BATCH + 1)
    except ConfigError as exc:
        results["error"] = str(exc)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("ranks"))


def test_two_gloo_processes_match_one_process_loss_and_gradients(ranks: list[dict]) -> None:
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"] and [r["rank"] for r in ranks] == [0, 1]
    v1, v2, labels = _views()
    single = _one_step(_simclr(), v1, v2, labels, Gather())
    for result in ranks:
        step = result["step"]
        torch.testing.assert_close(step["loss"], single["loss"], atol=1e-5, rtol=1e-5)
        assert step["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
        for name, grad in single["grads"].items():
            torch.testing.assert_close(step["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        # Synchronised batch-norm: running statistics of the global batch, not of each half.
        assert step["buffers"].keys() == single["buffers"].keys()
        for name, buffer in single["buffers"].items():
            torch.testing.assert_close(step["buffers"][name], buffer, atol=1e-5, rtol=1e-5, msg=name)


def test_two_process_pretraining_matches_one_process(ranks: list[dict]) -> None:
    single = _simclr(**PRETRAIN)
    images, labels = _images()
    history = pretrain(single, single.config, images, labels, torch.device("cpu")).history
    expected = single.state_dict()
    moved = 0
    for result in ranks:
        assert result["loss"] == pytest.approx(history[-1].loss, abs=1e-5)
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    initial = _simclr(**PRETRAIN).state_dict()
    moved = sum(not torch.equal(initial[name], value) for name, value in expected.items())
    assert moved > 10  # the steps changed the weights, so the match above is not trivial


def test_resume_continues_every_process_exactly(ranks: list[dict]) -> None:
    assert [r["resume_equal"] for r in ranks] == [True, True]


def test_global_batch_must_split_over_processes(ranks: list[dict]) -> None:
    assert all("divisible by the 2 processes" in r["error"] for r in ranks)


def test_gathered_nt_xent_equals_plain_when_computed_piecewise() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    for normalize in (True, False):
        plain_z = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
        plain = nt_xent(*plain_z, 0.3, normalize)
        plain.backward()
        for pieces in (2, 3, 4):
            n = z1.shape[0] // pieces
            all_z = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            losses = [
                nt_xent(all_z[0][s : s + n], all_z[1][s : s + n], 0.3, normalize, *all_z, rank_offset=s)
                for s in range(0, z1.shape[0], n)
            ]
            mean = torch.stack(losses).mean()
            mean.backward()
            torch.testing.assert_close(mean, plain)
            torch.testing.assert_close(all_z[0].grad, plain_z[0].grad)
            torch.testing.assert_close(all_z[1].grad, plain_z[1].grad)


def test_nt_xent_identity_gather_is_the_plain_loss_and_bad_offsets_fail() -> None:
    z1, z2 = torch.randn(2, 6, 4)
    assert torch.equal(nt_xent(z1, z2, 0.5, True, z1, z2, 0), nt_xent(z1, z2))
    with pytest.raises(ValueError, match="rank_offset"):
        nt_xent(z1[:3], z2[:3], 0.5, True, z1, z2, rank_offset=4)
    with pytest.raises(ValueError, match="rank_offset applies only"):
        nt_xent(z1, z2, rank_offset=1)
    with pytest.raises(ValueError, match="together"):
        nt_xent(z1[:3], z2[:3], z1_all=z1)


def test_single_process_helpers_are_no_ops() -> None:
    gather = Gather()
    x = torch.randn(4, 3)
    assert gather(x) is x and gather.offset(4) == 0
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.local_batch_size(7) == 7 and distributed.all_reduce_mean(x) is x
    assert distributed.init(torch.device("cpu")) == torch.device("cpu") and not distributed.is_initialized()


def test_cpu_sync_batchnorm_conversion_keeps_parameters_and_state_keys() -> None:
    method = _simclr()
    before = dict(method.named_parameters())
    keys = list(method.state_dict())
    distributed.convert_sync_batchnorm(method, torch.device("cpu"))
    synced = [m for m in method.modules() if isinstance(m, distributed.SyncBatchNorm)]
    assert len(synced) == 4  # three in the small CNN, one in the head
    assert all(p is before[name] for name, p in method.named_parameters())
    assert list(method.state_dict()) == keys
    # In one process it is plain batch-norm.
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    sync = distributed.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync[0].running_var, bn.running_var)


def test_torchrun_two_processes_record_one_trial(tmp_path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    sslab = shutil.which("sslab", path=str(Path(sys.executable).parent))
    assert torchrun and sslab
    db = f"sqlite:///{tmp_path / 'results.db'}"
    Store(db)  # create the tables first: two processes creating a fresh SQLite store at once can race
    command = [
        torchrun,
        "--standalone",
        f"--nproc-per-node={WORLD}",
        sslab,
        "run",
        *["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256"],
        *["--sync-bn", "--device", "cpu", "-q", "--db", db],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = Store(db).trials()
    assert [(t.status, t.config["sync_bn"], t.config["batch_size"]) for t in trials] == [("done", True, 64)]
    metrics = Store(db).final_metrics(trials[0].id)
    assert 0.0 <= metrics["linear_top1"] <= 1.0 and metrics["final_loss"] > 0
    assert not list((tmp_path / "results" / "checkpoints").glob("*.pt"))  # removed once, by the main process


def test_a_method_not_shown_equivalent_refuses_several_processes(monkeypatch) -> None:
    from sslab.settings import MethodInfo

    unproven, proven = MethodInfo(name="toy", paper=""), MethodInfo(name="toy", paper="", multiprocess=True)
    distributed.check_method(unproven)  # one process: anything runs
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    distributed.check_method(proven)
    with pytest.raises(ConfigError, match="toy has not been shown to match one process"):
        distributed.check_method(unproven)
