import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from sslab.config import from_mapping
from sslab.store import Provenance, Store, StoreError

PROVENANCE = Provenance("cpu", "test", "0", None, "host")


def test_trial_lifecycle(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = from_mapping(dict(epochs=1))
    trial_id = store.begin_trial(config, PROVENANCE)
    store.log_metrics(trial_id, {"loss": 2.0}, epoch=1)
    store.log_metrics(trial_id, {"linear_top1": 0.5})
    store.finish_trial(trial_id, "done", collapsed=False, wall_time_s=3.0)
    row = store.find(config.hash())
    assert row is not None and row.status == "done" and row.config["epochs"] == 1
    assert store.final_metrics(trial_id) == {"linear_top1": 0.5}
    frame = store.results_frame()
    assert frame.loc[0, "linear_top1"] == 0.5 and frame.loc[0, "status"] == "done"


def test_rerun_replaces_metrics_and_keeps_one_row(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = from_mapping({})
    first = store.begin_trial(config, PROVENANCE)
    store.log_metrics(first, {"linear_top1": 0.1})
    store.finish_trial(first, "failed", reason="boom")
    second = store.begin_trial(config, PROVENANCE)
    assert second == first
    assert store.final_metrics(second) == {}
    assert len(store.trials()) == 1 and store.trials()[0].status == "running"


def _writer(url: str, worker: int) -> None:
    store = Store(url)
    for index in range(15):
        config = from_mapping(dict(seed=worker * 100 + index))
        trial_id = store.begin_trial(config, PROVENANCE)
        store.log_metrics(trial_id, {"a": 1.0, "b": 2.0})
        store.finish_trial(trial_id, "done")


def test_concurrent_writers_lose_nothing(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Store(url)
    processes = [mp.get_context("spawn").Process(target=_writer, args=(url, w)) for w in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    store = Store(url)
    trials = store.trials()
    assert len(trials) == 45 and all(t.status == "done" for t in trials)
    assert all(store.final_metrics(t.id) == {"a": 1.0, "b": 2.0} for t in trials)


def test_bad_urls_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="invalid database URL"):
        Store("not a url")
    with pytest.raises(StoreError, match="no results store"):
        Store(f"sqlite:///{tmp_path / 'absent.db'}", create=False)


def test_study_membership_and_frame(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    done, pending = from_mapping(dict(seed=1)), from_mapping(dict(seed=2))
    store.register_study("demo", {"axes": {"seed": [1, 2]}})
    store.add_study_trial("demo", done.hash(), {"seed": 1})
    store.add_study_trial("demo", pending.hash(), {"seed": 2})
    store.add_study_trial("demo", pending.hash(), {"seed": 2})  # idempotent
    trial_id = store.begin_trial(done, PROVENANCE)
    store.log_metrics(trial_id, {"linear_top1": 0.7})
    store.finish_trial(trial_id, "done")
    frame = store.study_frame("demo").set_index("axis.seed")
    assert len(frame) == 2
    assert frame.loc[1, "status"] == "done" and frame.loc[1, "linear_top1"] == 0.7
    assert frame.loc[2, "status"] == "pending"
    assert [s.name for s in store.studies()] == ["demo"]
    assert store.study_frame("absent").empty


def _open(url: str, at: float) -> None:
    time.sleep(max(0.0, at - time.time()))
    Store(url)


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    context = mp.get_context("spawn")
    start = time.time() + 3  # after every process has imported sslab, so that they do race
    processes = [context.Process(target=_open, args=(url, start)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]


def test_a_new_store_waits_while_another_connection_blocks_its_switch_to_wal(tmp_path) -> None:
    path = tmp_path / "new.db"
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # a shared lock: no switch to WAL
    held_s = 6  # longer than the driver's default busy timeout of 5 s
    threading.Timer(held_s, reader.execute, args=("ROLLBACK",)).start()
    Store(f"sqlite:///{path}")
    reader.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sslab_trials'").fetchone() == (1,)
