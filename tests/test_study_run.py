"""Running studies: dedup by config hash, Optuna bookkeeping, pruning, resume after an interruption, and
several workers (SQLite, and PostgreSQL when SSLAB_TEST_POSTGRES_URL is set) with one killed mid-trial."""

import dataclasses
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from launch import as_from_a_terminal
from rich.console import Console
from sqlalchemy import select

from sslab.errors import ConfigError
from sslab.runner import TrialOutcome, build_model, evaluate, prepare_dataset, provenance, run_trial
from sslab.store import ClaimRow, MetricRow, Store
from sslab.study import load_plan
from sslab.study.scheduler import RunOptions, run_study
from sslab.study.spec import PRESET_DIR
from sslab.study.worker import epoch_knn

SSLAB = str(Path(sys.executable).parent / "sslab")
TINY_BASE = """
[base]
dataset = "synthetic"
image_size = 16
train_subset = 128
batch_size = 32
head_width = 64
out_dim = 32
"""


def write_study(tmp_path: Path, body: str, epochs: int = 1) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(f'name = "tiny"\ndescription = "test"\n{body}\n{TINY_BASE}epochs = {epochs}\n')
    return str(path)


def quiet() -> Console:
    return Console(file=io.StringIO())


def attempts(store: Store) -> dict[str, int]:
    with store.session() as session:
        return {row.config_hash: row.attempts for row in session.scalars(select(ClaimRow))}


def epoch_metric(store: Store, config_hash: str, name: str, epoch: int) -> float | None:
    row = store.find(config_hash)
    assert row is not None
    with store.session() as session:
        return session.scalar(
            select(MetricRow.value).where(
                MetricRow.trial_id == row.id, MetricRow.name == name, MetricRow.epoch == epoch
            )
        )


def test_rerun_trains_nothing_and_a_new_seed_runs_only_new_trials(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    trained: list[str] = []

    def counting(config, store, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(config.hash())
        return run_trial(config, store, **kwargs)

    body = "seeds = [0]\n[axes]\ntemperature = [0.5]"
    path = write_study(tmp_path, body)
    first = run_study(load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet(), counting)
    assert first.counts == {"done": 1} and first.trained == 1 and len(trained) == 1
    again = run_study(load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet(), counting)
    assert again.trained == 0 and len(trained) == 1  # a finished study trains nothing

    path = write_study(tmp_path, body.replace("seeds = [0]", "seeds = [0, 1]"))
    grown = run_study(load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet(), counting)
    plan = load_plan(path)
    assert grown.counts == {"done": 2} and grown.trained == 1
    assert trained[1:] == [c.hash for c in plan.cells if c.axes["seed"] == 1]  # only the new one

    store = Store(url)
    assert len(trained) == len(set(trained)) == 2 and set(attempts(store).values()) == {1}
    frame = store.study_frame("tiny")
    assert sorted(zip(frame["axis.temperature"], frame["axis.seed"], strict=True)) == [(0.5, 0), (0.5, 1)]
    # Optuna recorded the grid in the same database, with the stored metric as each trial's value; the new
    # seed changed the search space, so the grid lives in a new version of the Optuna study.
    recorded = json.loads(store.study("tiny").spec_json)
    assert recorded["optuna_study"] == "tiny.v2" and recorded["seeds"] == [0, 1]
    study = optuna.load_study(study_name="tiny.v2", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_axes = {(r["axis.temperature"], r["axis.seed"]): r["linear_top1"] for _, r in frame.iterrows()}
    assert {(t.params["temperature"], t.params["seed"]) for t in complete} == set(by_axes)
    for trial in complete:
        assert trial.value == pytest.approx(by_axes[(trial.params["temperature"], trial.params["seed"])])


def record_only(config, store, **_):  # type: ignore[no-untyped-def]
    """Stands in for run_trial where only the scheduling matters: records a done trial without training."""
    trial_id = store.begin_trial(config, provenance(torch.device("cpu")))
    metrics = {"linear_top1": 0.5, "linear_val_top1": 0.5}
    store.log_metrics(trial_id, metrics)
    store.finish_trial(trial_id, "done", None, False, 0.0)
    return TrialOutcome(trial_id, config.hash(), "done", metrics, collapsed=False)


def test_a_changed_base_needs_a_new_name_or_replace(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_study(tmp_path, "[axes]\ntemperature = [0.2, 0.5]")
    run_study(load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet(), record_only)
    changed = load_plan(path, {"knn_k": "20"})
    with pytest.raises(ConfigError, match="different set .*--name NAME.*--replace"):
        run_study(changed, url, RunOptions(heartbeat_timeout=5), quiet(), record_only)
    assert len(Store(url).trials()) == 2  # refused before anything ran
    renamed = run_study(load_plan(path, {"knn_k": "20"}, "tiny-k20"), url, RunOptions(), quiet(), record_only)
    assert renamed.counts == {"done": 2} and len(Store(url).trials()) == 4
    replaced = run_study(changed, url, RunOptions(replace=True), quiet(), record_only)
    assert replaced.trained == 0  # same configs as tiny-k20: found by their hash
    frame = Store(url).study_frame("tiny")
    assert set(frame["hash"]) == {c.hash for c in changed.cells}  # re-pointed at the new settings


def test_median_pruning_stops_trials_below_the_median(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    # The per-epoch learning rate grows with the base lr, so the pruning decisions are known in advance.
    body = (
        '[pruner]\nmetric = "lr"\nstartup_trials = 1\nwarmup_epochs = 0\n'
        "[axes]\nlr = [0.5, 0.05, 0.005, 0.0005]"
    )
    path = write_study(tmp_path, body, epochs=2)
    result = run_study(load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet())
    assert sum(result.counts.values()) == 4 and result.counts.get("pruned", 0) >= 1

    store = Store(url)
    trials = sorted(optuna.load_study(study_name="tiny", storage=url).trials, key=lambda t: t.number)
    completed: list[float] = []
    for trial in trials:  # replay MedianPruner's rule in the order the trials ran
        value = trial.intermediate_values[1]
        should_prune = len(completed) >= 1 and value < statistics.median(completed)
        assert trial.state == (
            optuna.trial.TrialState.PRUNED if should_prune else optuna.trial.TrialState.COMPLETE
        )
        config_hash = trial.user_attrs["config_hash"]
        row = store.find(config_hash)
        assert row is not None and row.status == ("pruned" if should_prune else "done")
        assert epoch_metric(store, config_hash, "lr", 1) == pytest.approx(value)
        assert (epoch_metric(store, config_hash, "lr", 2) is None) == should_prune  # stopped after epoch 1
        if not should_prune:
            completed.append(value)


def test_pruning_knn_is_the_validation_knn_and_never_reads_test_images() -> None:
    overrides = {"dataset": "synthetic", "train_subset": "100", "image_size": "16", "val_fraction": "0.2"}
    config = load_plan("temperature", overrides).cells[0].config
    dataset = prepare_dataset(config)
    method = build_model(config, dataset)
    final = evaluate(method, config, dataset, torch.device("cpu"))
    blind = dataclasses.replace(dataset, test_images=torch.full_like(dataset.test_images, 255))
    assert epoch_knn(method, config, blind) == final["knn_val_top1"]  # same number, test images unseen


def _wait_for_trained_epoch(url: str, deadline: float, process: subprocess.Popen) -> tuple[str, int]:
    """(config hash, worker pid) of a trial that is running and has finished its first epoch."""
    store = Store(url)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with store.session() as session:
            for claim in session.scalars(select(ClaimRow).where(ClaimRow.worker.is_not(None))):
                row = store.find(claim.config_hash)
                if (
                    row is not None
                    and row.status == "running"
                    and epoch_metric(store, row.config_hash, "loss", 1)
                ):
                    return claim.config_hash, int(claim.worker.split(":")[1])
        time.sleep(0.05)
    raise AssertionError("no trial reached its first epoch in time")


def test_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch) -> None:
    """README flow on a reduced aug-pairs: Ctrl-C mid-trial, rerun: the half-done trial resumes from its
    checkpoint, no trial runs twice and none is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    preset = (PRESET_DIR / "aug-pairs.toml").read_text()
    ops = '"crop", "cutout", "color", "sobel", "noise", "blur", "rotate"'
    assert preset.count(ops) == 2
    reduced = preset.replace(f"first = [{ops}]", 'first = ["crop", "color"]')
    (tmp_path / "studies" / "aug-pairs.toml").write_text(
        reduced.replace(f"second = [{ops}]", 'second = ["color"]')
    )
    url = f"sqlite:///{tmp_path / 'r.db'}"
    command = [
        SSLAB, "study", "run", "aug-pairs", "--set", "epochs=12", "--set", "train_subset=128",
        "--set", "batch_size=32", "--set", "dataset=synthetic", "--set", "image_size=16",
        "--db", url, "--heartbeat-timeout", "3",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal
    )
    config_hash, _ = _wait_for_trained_epoch(url, time.monotonic() + 120, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    store = Store(url)
    row = store.find(config_hash)
    assert row is not None and row.status == "interrupted"
    assert (tmp_path / "results" / "checkpoints" / f"{config_hash}.pt").exists()
    first_epoch = epoch_metric(store, config_hash, "epoch_seconds", 1)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 trials: 2 done" in rerun.stdout
    frame = store.study_frame("aug-pairs")
    assert sorted(zip(frame["axis.first"], frame["axis.second"], strict=True)) == [
        ("color", "color"), ("crop", "color")
    ]  # fmt: skip
    assert set(frame["status"]) == {"done"}
    assert attempts(store) == {h: 2 if h == config_hash else 1 for h in frame["hash"]}  # none ran twice
    # Epoch 1 was replayed from the checkpoint, not trained again: its recorded duration is unchanged.
    assert epoch_metric(store, config_hash, "epoch_seconds", 1) == first_epoch
    assert not (tmp_path / "results" / "checkpoints" / f"{config_hash}.pt").exists()


def _two_workers_one_killed(tmp_path: Path, url: str, separate_processes: bool) -> None:
    path = write_study(tmp_path, "[axes]\ntemperature = [0.2, 0.5, 1.0]", epochs=3)
    common = [SSLAB, "study", "run", path, "--db", url, "--heartbeat-timeout", "3"]
    if separate_processes:  # like two machines sharing one database
        processes = [subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
        time.sleep(2)
        processes.append(
            subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    else:
        processes = [
            subprocess.Popen(
                [*common, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        ]
    try:
        config_hash, pid = _wait_for_trained_epoch(url, time.monotonic() + 150, processes[-1])
        store = Store(url)
        first_epoch = epoch_metric(store, config_hash, "epoch_seconds", 1)
        os.kill(pid, signal.SIGKILL)
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    survivors = [p for p in processes if p.pid != pid]
    assert survivors and all(p.returncode == 0 for p in survivors), outputs
    assert "3 trials: 3 done" in outputs[processes.index(survivors[0])]
    if not separate_processes:  # the survivor trained its own trial and the one it took over
        trained_here = re.search(r"trained (\d+) here", outputs[0])
        assert trained_here and int(trained_here.group(1)) >= 2, outputs
    frame = store.study_frame("tiny")
    assert len(frame) == 3 and set(frame["status"]) == {"done"}  # nothing lost
    # Every trial was started once, except the killed one: taken over once by the other worker.
    assert attempts(store) == {h: 2 if h == config_hash else 1 for h in frame["hash"]}
    assert epoch_metric(store, config_hash, "epoch_seconds", 1) == first_epoch  # resumed from its checkpoint
    assert store.workers() == []  # the survivor removed the dead worker's record, then its own
    study = optuna.load_study(study_name="tiny", storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's zombie may wait long for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
@pytest.mark.parametrize(
    ("launcher", "stop"),
    [
        *(
            (launcher, stop)
            for launcher in ("direct", "background")
            for stop in (signal.SIGTERM, signal.SIGKILL)
        ),
        ("direct", signal.SIGINT),
    ],
)
def test_stopping_study_run_stops_its_workers(stop: int, launcher: str, tmp_path, monkeypatch) -> None:
    """`kill` (SIGTERM), `kill -9` or `kill -INT` of `study run --workers 2` (the parent alone, unlike a
    terminal's Ctrl-C, which reaches every process of the group): no worker trains on as an orphan, and the
    running trial is recorded as interrupted, so that the next run resumes it at once. `background`: started
    with `&` from a non-interactive shell, which starts it with SIGINT ignored (as scripts and schedulers
    do)."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_study(tmp_path, "[axes]\ntemperature = [0.2, 0.5, 1.0]", epochs=20)
    command = [SSLAB, "study", "run", path, "--db", url, "--workers", "2"]
    if launcher == "background":
        command = ["bash", "-c", '"$@" & wait $!', "bash", *command]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal
    )
    pid = None
    try:
        config_hash, pid = _wait_for_trained_epoch(url, time.monotonic() + 150, process)
        os.kill(_parent(pid), stop)  # the `study run` process, whichever way it was started
        signalled = time.monotonic()
        output, _ = process.communicate(timeout=90)
        assert time.monotonic() - signalled < 20, output  # passed on at once, not after a timeout
        deadline = time.monotonic() + 60
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pid), f"worker {pid} still training after its parent stopped"
    finally:
        if process.poll() is None:
            process.kill()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
    if launcher == "direct":
        assert process.returncode == (-signal.SIGKILL if stop == signal.SIGKILL else 130), output
    else:  # the shell reports its child's end: exit 130, or 128 + the signal that killed it
        assert process.returncode == (130 if stop == signal.SIGTERM else 128 + signal.SIGKILL), output
    deadline = time.monotonic() + 30  # a worker killed with its parent records its trial on the way out
    row = Store(url).find(config_hash)
    while row is not None and row.status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        row = Store(url).find(config_hash)
    assert row is not None and row.status == "interrupted"


def test_two_local_workers_one_killed_mid_trial_sqlite(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _two_workers_one_killed(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", separate_processes=False)


def test_two_machines_one_killed_mid_trial_postgres(tmp_path, monkeypatch, postgres_url) -> None:
    monkeypatch.chdir(tmp_path)
    _two_workers_one_killed(tmp_path, postgres_url, separate_processes=True)


def test_search_sampler_runs_n_trials_and_records_their_axes(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    body = (
        'sampler = "random"\nn_trials = 5\nmetric = "linear_val_top1"\n[axes]\n'
        'temperature = { type = "log", low = 0.05, high = 1.0 }\nhead = [1, 2]'
    )
    path = write_study(tmp_path, body)
    Path(path).write_text(Path(path).read_text() + "val_fraction = 0.1\n")  # in [base]: a validation split
    result = run_study(load_plan(path), url, RunOptions(), quiet(), record_only)
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.trials) == 5 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    frame = Store(url).study_frame("tiny")
    assert result.counts.get("done") == len(frame) == len({t.user_attrs["config_hash"] for t in study.trials})
    for trial in study.trials:  # each Optuna trial's parameters are the recorded trial's axes and config
        row = frame.set_index("hash").loc[trial.user_attrs["config_hash"]]
        assert row["axis.temperature"] == trial.params["temperature"] == row["temperature"]
        assert row["axis.head"] == trial.params["head"] == row["head"] and row["axis.seed"] == 0
    again = run_study(load_plan(path), url, RunOptions(), quiet(), record_only)
    assert again.trained == 0 and len(optuna.load_study(study_name="tiny", storage=url).trials) == 5


def test_the_summary_counts_every_trial_run_here_failed_ones_too(tmp_path, monkeypatch) -> None:
    from sslab.train import TrialFailed

    def fails_at_low_temperature(config, store, **kwargs):  # type: ignore[no-untyped-def]
        if config.settings.temperature < 0.3:
            trial_id = store.begin_trial(config, provenance(torch.device("cpu")))
            store.finish_trial(trial_id, "failed", "non-finite loss")
            raise TrialFailed("non-finite loss")
        return record_only(config, store)

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_study(tmp_path, "[axes]\ntemperature = [0.2, 0.5, 1.0]")
    result = run_study(
        load_plan(path), url, RunOptions(heartbeat_timeout=5), quiet(), fails_at_low_temperature
    )
    assert result.trained == 3 and result.counts == {"done": 2, "failed": 1}
    trials = Store(url).trials()
    assert all(row.threads == torch.get_num_threads() for row in trials)  # provenance: the thread count
