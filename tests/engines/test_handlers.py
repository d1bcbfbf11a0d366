"""Config helpers of the bundles: boolean flags, required checkpoints, the metrics record across resumes."""

from __future__ import annotations

import json

import pytest

from partialseg.engines import as_bool, require_checkpoint


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (0, False), (1, True),
    ("false", False), ("False", False), (" no ", False), ("0", False), ("off", False), ("", False),
    ("true", True), ("TRUE", True), ("yes", True), ("1", True), ("on", True),
])  # fmt: skip
def test_as_bool(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_other_words_and_require_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="'maybe'"):
        as_bool("maybe")
    with pytest.raises(FileNotFoundError, match="model.pt does not exist: train first"):
        require_checkpoint(tmp_path / "model.pt", "train first")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert require_checkpoint(tmp_path / "model.pt") == str(tmp_path / "model.pt")


def _run_recorder(path, iterations, first_iteration=1, epoch_length=4, max_epochs=None):
    """Drive a MetricsRecorder with a real ignite engine whose loss is the iteration number."""
    from ignite.engine import Engine, Events

    from partialseg.engines import MetricsRecorder

    engine = Engine(lambda e, batch: {"loss": float(e.state.iteration)})
    recorder = MetricsRecorder(path)
    recorder.attach(engine)

    @engine.on(Events.STARTED)
    def _resume(e):  # what ResumeCheckpoint does: restore the counters
        e.state.iteration = first_iteration - 1
        e.state.epoch = (first_iteration - 1) // epoch_length

    engine.run(range(epoch_length), max_epochs=max_epochs or -(-iterations // epoch_length))
    return json.loads(path.read_text())


def test_metrics_record_continues_after_a_resume(tmp_path):
    path = tmp_path / "metrics.json"
    first = _run_recorder(path, 12)  # 3 epochs of 4
    assert first["iteration"] == list(range(1, 13))
    # the interrupted run had written up to iteration 12, but its last checkpoint was at 8
    resumed = _run_recorder(path, 20, first_iteration=9, max_epochs=5)
    assert resumed["iteration"] == list(range(1, 21))  # no step repeated, none lost
    assert resumed["loss"] == [float(i) for i in range(1, 21)]
    # a fresh run (first iteration 1) starts a new record
    assert _run_recorder(path, 4)["iteration"] == [1, 2, 3, 4]
