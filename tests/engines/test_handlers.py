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
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert require_checkpoint(tmp_path / "model.pt") == str(tmp_path / "model.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # not a zip: read in full
    assert require_checkpoint(tmp_path / "legacy.pt") == str(tmp_path / "legacy.pt")
    (tmp_path / "text.pt").write_bytes(b"x")  # not a checkpoint at all
    with pytest.raises(RuntimeError, match="text.pt cannot be read"):
        require_checkpoint(tmp_path / "text.pt")


def test_a_truncated_checkpoint_is_an_error_naming_the_file_and_what_to_do(tmp_path):
    """Issue 13 item 6: a corrupt models/model.pt gave a bare EOFError / "PytorchStreamReader failed"
    from MONAI's CheckpointLoader, without the path. Every load in partialseg names the file."""
    import re

    import torch
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from partialseg.engines import AtomicCheckpointSaver, ResumeCheckpoint
    from partialseg.engines.checkpoint import read_checkpoint
    from partialseg.networks import CompNet

    # a real best-metric checkpoint, written as the bundles write model.pt, then cut short
    net = CompNet(2, 1, 4, backbone_kwargs={"channels": (4, 8), "strides": (2,), "num_res_units": 0})
    evaluator = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path / "models"), {"model": net}, save_final=True, final_filename="model.pt")
    saver.attach(evaluator)
    evaluator.run([0])
    model = tmp_path / "models" / "model.pt"
    data = model.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": net.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    hint = "train the bundle first (configs/train.json, stages 1 and 2)"
    for path, size in ((model, len(data) // 2), (model, len(data) - 10), (legacy, legacy.stat().st_size // 2)):
        path.write_bytes(path.read_bytes()[:size] if path == legacy else data[:size])
        # what the bundles' inference.json and stage 2 do: CheckpointLoader(load_path=require_checkpoint(...))
        with pytest.raises(RuntimeError) as info:
            CheckpointLoader(load_path=require_checkpoint(path, hint), load_dict={"model": net})
        msg = str(info.value)
        assert f"checkpoint {path} cannot be read" in msg and "incomplete or corrupt" in msg, msg
        assert msg.endswith(f"replace it with a complete copy, or recreate it ({hint})"), msg
        with pytest.raises(RuntimeError, match=re.escape(f"checkpoint {path} cannot be read")):
            read_checkpoint(path)
    # the resume checkpoint: names the file and the way out
    resume = tmp_path / "runs" / "checkpoint.pt"
    resume.parent.mkdir()
    resume.write_bytes(data[: len(data) // 3])
    with pytest.raises(RuntimeError, match=re.escape(f"checkpoint {resume} cannot be read")) as info:
        ResumeCheckpoint(resume, {"network": net}).load(Engine(lambda e, b: None))
    assert "delete it (or rerun with --resume false) to start afresh" in str(info.value)


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


def test_best_metric_state_survives_a_resume(tmp_path):
    """The evaluator's best score and the key-metric checkpoint's record go through a checkpoint:
    after the restore, only a validation beating the old best writes model.pt again."""
    import torch
    from ignite.engine import Engine, Events

    from partialseg.engines import AtomicCheckpointSaver, BestMetricState, atomic_save

    def evaluator_and_saver(scores):
        ev = Engine(lambda e, b: None)
        ev.state.best_metric, ev.state.best_metric_epoch = -1.0, -1
        it = iter(scores)

        @ev.on(Events.EPOCH_COMPLETED)  # registered first: the metric and the best, as MONAI's evaluator
        def _score(e):
            e.state.metrics["dice"] = next(it)
            if e.state.metrics["dice"] > e.state.best_metric:
                e.state.best_metric, e.state.best_metric_epoch = e.state.metrics["dice"], e.state.epoch

        saver = AtomicCheckpointSaver(str(tmp_path / "ckpt"), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                                      key_metric_name="dice", key_metric_filename="model.pt")
        saver.attach(ev)
        return ev, saver

    ev, saver = evaluator_and_saver([0.5, 0.8, 0.6])
    ev.run([0], max_epochs=3)
    assert ev.state.best_metric == 0.8
    atomic_save({"best": BestMetricState(ev, saver).state_dict()}, tmp_path / "resume.pt")
    written = (tmp_path / "ckpt" / "model.pt").stat().st_mtime_ns

    # a new process: fresh evaluator and saver, restored from the checkpoint
    ev2, saver2 = evaluator_and_saver([0.7, 0.9])
    BestMetricState(ev2, saver2).load_state_dict(torch.load(tmp_path / "resume.pt", weights_only=True)["best"])
    assert (ev2.state.best_metric, ev2.state.best_metric_epoch) == (0.8, 2)
    ev2.run([0], max_epochs=1)  # 0.7 < 0.8: model.pt untouched
    assert (tmp_path / "ckpt" / "model.pt").stat().st_mtime_ns == written
    ev2.run([0], max_epochs=2)  # 0.9 > 0.8: written
    assert (tmp_path / "ckpt" / "model.pt").stat().st_mtime_ns != written
    assert ev2.state.best_metric == 0.9


def test_resume_from_a_checkpoint_without_the_best_state(tmp_path):
    """A checkpoint written before BestMetricState existed still resumes (the best starts afresh);
    a missing required entry is still an error naming the file."""
    import torch
    from ignite.engine import Engine

    from partialseg.engines import BestMetricState, ResumeCheckpoint, atomic_save

    net = torch.nn.Linear(1, 1)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
    atomic_save({"trainer": trainer.state_dict(), "network": net.state_dict()}, tmp_path / "old.pt")
    ResumeCheckpoint(tmp_path / "old.pt", {"network": net, "best": BestMetricState(evaluator)}).load(trainer)
    assert evaluator.state.best_metric == -1.0
    with pytest.raises(RuntimeError, match="old.pt has no 'optimizer' state"):
        ResumeCheckpoint(tmp_path / "old.pt", {"network": net, "optimizer": torch.optim.SGD(net.parameters(), 0.1)}).load(trainer)


def test_a_save_on_an_epochs_last_iteration_includes_that_epochs_validation(tmp_path):
    """interval == epoch length (the marginal bundle's setting): the checkpoint is written after
    the epoch's validation, so a resume neither forgets its best score nor lets a worse model
    overwrite model.pt."""
    import torch
    from ignite.engine import Engine, Events

    from partialseg.engines import BestMetricState, ResumeCheckpoint

    def run(crash_at=None):
        trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
        scores = []

        def validate(e):  # every 2 epochs; the score only falls: the first validation stays best
            if e.state.epoch % 2 == 0:
                score = 1.0 / e.state.epoch
                scores.append(score)
                if score > evaluator.state.best_metric:
                    evaluator.state.best_metric, evaluator.state.best_metric_epoch = score, e.state.epoch

        trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)  # attached first, like ValidationHandler
        ResumeCheckpoint(tmp_path / "checkpoint.pt", {"network": torch.nn.Linear(1, 1), "best": BestMetricState(evaluator)},
                         interval=4).attach(trainer)
        if crash_at:
            def crash(e):
                raise KeyboardInterrupt

            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=crash_at), crash)
        try:
            trainer.run(range(4), max_epochs=4)
        except KeyboardInterrupt:
            pass
        return evaluator.state, scores

    _, scores = run(crash_at=10)  # validated at epoch 2 (iteration 8), killed in epoch 3
    assert scores == [0.5]
    state, scores = run()
    assert scores == [0.25]  # resumed after epoch 2: epoch 4 validates, epoch 2 is not repeated
    assert (state.best_metric, state.best_metric_epoch) == (0.5, 2)  # epoch 2's best was saved with it


def test_resume_false_moves_the_old_checkpoint_aside_and_saves(tmp_path):
    import torch
    from ignite.engine import Engine, Events

    from partialseg.engines import ResumeCheckpoint

    def run(weight, max_epochs, enabled):
        net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(net.weight, weight)
        e = Engine(lambda e, b: None)
        ResumeCheckpoint(tmp_path / "checkpoint.pt", {"network": net}, interval=2, enabled=enabled).attach(e)
        start = []
        e.add_event_handler(Events.STARTED, lambda e: start.append((e.state.epoch, net.weight.item())))
        e.run(range(4), max_epochs=max_epochs)
        return start[0]

    assert run(1.0, 3, True) == (0, 1.0)
    assert run(2.0, 5, False) == (0, 2.0)  # afresh
    assert (tmp_path / "checkpoint.previous.pt").is_file()
    assert run(3.0, 6, True) == (5, 2.0)  # a later default run continues the latest run, not the older one
