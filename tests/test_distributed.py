"""``edge-train --distributed``: the cluster description, and two workers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training.distributed import Cluster, cluster_from

REPO = Path(__file__).resolve().parents[1]


def test_workers_and_index_become_the_tf_config_tensorflow_reads():
    cluster = cluster_from("10.0.0.1:2222, 10.0.0.2:2222", 1, environ={})
    assert cluster == Cluster(("10.0.0.1:2222", "10.0.0.2:2222"), 1)
    assert not cluster.is_chief
    assert json.loads(cluster.tf_config()) == {
        "cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
        "task": {"type": "worker", "index": 1},
    }


def test_tf_config_is_read_and_its_chief_task_is_the_chief():
    config = {
        "cluster": {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]},
        "task": {"type": "chief", "index": 0},
    }
    cluster = cluster_from(None, None, environ={"TF_CONFIG": json.dumps(config)})
    assert cluster.is_chief and cluster.size == 3
    assert json.loads(cluster.tf_config()) == config
    worker0 = {**config, "task": {"type": "worker", "index": 0}}
    assert not cluster_from(None, None, environ={"TF_CONFIG": json.dumps(worker0)}).is_chief


@pytest.mark.parametrize(
    ("workers", "index", "environ", "match"),
    [
        (None, None, {}, "set TF_CONFIG"),
        ("10.0.0.1:2222,10.0.0.2", 0, {}, r"Got '10.0.0.2'"),
        ("a:1,b:1", 2, {}, "0 to 1. Got 2"),
        ("a:1,a:1", 0, {}, "twice"),
        (None, None, {"TF_CONFIG": "{not json"}, "TF_CONFIG must be JSON"),
        (None, 3, {}, "--worker-index needs --worker-hosts"),
    ],
)
def test_a_malformed_cluster_is_refused_with_the_fix(workers, index, environ, match):
    with pytest.raises(ValueError, match=match):
        cluster_from(workers, index, environ=environ)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


TRAIN_ARGS = [
    "--backbone", "small-cnn", "--weights", "none", "--image-size", "32", "--frozen-epochs", "0",
    "--epochs", "6", "--batch-size", "16", "--learning-rate", "0.003", "--no-int8-grid",
    "--seed", "0",
]  # fmt: skip
# Two workers run the same steps on the same global batches as one worker (each replica half of
# every batch, batch norm moments summed across workers), so they must reach one worker's test
# accuracy on the same data and seed within BAND: 3 of the 18 test scans (the augmentation and
# the shuffling draw other random numbers in the two setups, so the models are not the same).
BAND = 3 / 18
# What one worker must reach for the comparison to say anything (the synthetic classes are
# easy: 0.94 in Dec 2026, image size 32, 6 epochs).
LEARNED = 0.8


def _epoch_and_test_lines(log: str) -> list[str]:
    """The per-epoch metrics and the test line of a training log, without clock times and
    seconds (``12:00:01 epoch 3 (full)  accuracy 0.9  loss 0.2 ...  1.4s``)."""
    found = re.findall(r"^\S+ (epoch \d+ \(\w+\) .*?)\s+[\d.]+s$|^\S+ (test: .*)$", log, re.M)
    return [epoch or test for epoch, test in found]


@pytest.mark.slow
def test_two_workers_on_loopback_train_as_one_worker_does_and_the_chief_alone_writes(tmp_path):
    pytest.importorskip("tensorflow", reason="training needs the train extra")
    from training.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", per_class=40, seed=1, size=(96, 120))
    runs, single = tmp_path / "runs", tmp_path / "single"
    runs.mkdir()
    workers = ",".join(f"127.0.0.1:{port}" for port in _free_ports(2))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    train = [sys.executable, "-m", "training.cli", str(data), *TRAIN_ARGS]
    commands = {
        "single": [*train, "--output", str(single / "run")],
        **{
            f"worker-{index}": [
                *(*train, "--output", str(runs / "run")),
                *("--distributed", "--worker-hosts", workers, "--worker-index", str(index)),
            ]
            for index in (0, 1)
        },
    }  # one worker and the two-worker cluster at once: the test's time is the slower of them
    log_paths = {name: tmp_path / f"{name}.log" for name in commands}
    processes = {
        name: subprocess.Popen(
            command,
            env=env,
            stdout=log_paths[name].open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, command in commands.items()
    }
    try:
        for process in processes.values():
            process.wait(timeout=600)
    finally:
        for process in processes.values():
            process.kill()
    logs = {name: path.read_text() for name, path in log_paths.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}: {logs[name][-3000:]}"
    assert "worker-0 of 2: 2 replicas in sync" in logs["worker-0"]
    assert "worker-1 done; the chief wrote the run folder" in logs["worker-1"]
    assert [p.name for p in runs.iterdir()] == ["run"], "one run folder, no backups left behind"
    run = runs / "run"
    assert (run / "model.keras").is_file() and (run / "run.json").is_file()
    # The workers saw the same averaged losses every epoch (so early stopping chose the same
    # epoch on both) and hold the same model, batch norm statistics included.
    lines = _epoch_and_test_lines(logs["worker-0"])
    assert lines and any("test: accuracy" in line for line in lines), logs["worker-0"][-3000:]
    assert _epoch_and_test_lines(logs["worker-1"]) == lines
    one = json.loads((single / "run" / "metrics.json").read_text())["accuracy"]
    two = json.loads((run / "metrics.json").read_text())["accuracy"]
    assert one >= LEARNED, f"one worker reached {one:.3f} only: the comparison says nothing"
    assert abs(two - one) <= BAND + 1e-9, f"two workers reached {two:.3f}, one worker {one:.3f}"


@pytest.mark.slow
def test_a_restarted_stage_resumes_after_its_last_backed_up_epoch_and_a_finished_one_is_skipped(
    tmp_path,
):
    keras = pytest.importorskip("keras", reason="training needs the train extra")
    import numpy as np

    from training.distributed import _stage_backup

    x, y = np.random.default_rng(0).random((8, 3)), np.eye(2)[[0, 1] * 4]

    def model():
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
        m.compile("sgd", "categorical_crossentropy")
        return m

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # the worker dies after epoch 2 was backed up

    first = model()
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, y, epochs=4, verbose=0, callbacks=[_stage_backup(tmp_path / "s"), Crash()])
    restarted = model()
    history = restarted.fit(x, y, epochs=4, verbose=0, callbacks=[_stage_backup(tmp_path / "s")])
    assert history.epoch == [2, 3]  # epochs 1-2 came from the backup
    assert restarted._initial_epoch is None  # the next stage starts at its own epoch 1
    again = model()
    assert (
        again.fit(x, y, epochs=4, verbose=0, callbacks=[_stage_backup(tmp_path / "s")]).epoch == []
    )
    np.testing.assert_allclose(again.get_weights()[0], restarted.get_weights()[0])
