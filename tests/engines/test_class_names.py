"""Class names stored in a saved model (issue 14): written by the saver, read back, compared."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from partialseg.engines import AtomicCheckpointSaver, checkpoint_classes, require_classes
from partialseg.engines.checkpoint import with_classes

NAMES = ["background", "liver", "kidney"]


def _save(tmp_path, network, positional=False, **kwargs):
    engine = Engine(lambda e, b: None)
    args = (str(tmp_path), {"model": network}) if positional else ()
    kw = {} if positional else {"save_dir": str(tmp_path), "save_dict": {"model": network}}
    AtomicCheckpointSaver(*args, **kw, save_final=True, final_filename="model.pt", **kwargs).attach(engine)
    engine.run([0], max_epochs=1)
    return tmp_path / "model.pt"


@pytest.mark.parametrize("positional", [False, True])
def test_saver_stores_the_names_in_a_plain_state_dict(tmp_path, positional):
    net = torch.nn.Conv2d(1, 3, 1)
    path = _save(tmp_path, torch.nn.DataParallel(net), positional=positional, classes=NAMES)  # a wrapper is unwrapped
    state = torch.load(path, weights_only=True)
    assert sorted(state) == ["bias", "weight"]  # no extra key: strict loading works
    assert checkpoint_classes(path) == NAMES
    fresh = torch.nn.Conv2d(1, 3, 1)
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.weight, net.weight)
    # what ckpt_export does (MONAI's copy_model_state): every weight copied
    from monai.networks.utils import copy_model_state

    assert len(copy_model_state(torch.nn.Conv2d(1, 3, 1), state)[1]) == 2
    # without classes: as before, no names
    assert checkpoint_classes(_save(tmp_path / "plain", net)) is None


def test_names_survive_a_nested_checkpoint_and_dict_copies_lose_them():
    sd = with_classes({"w": torch.ones(1)}, NAMES)
    assert checkpoint_classes({"model": sd, "epoch": 3}) == NAMES
    assert checkpoint_classes(dict(sd)) is None  # a copy into a plain dict drops the metadata: "saved without names"


def test_require_classes(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(with_classes(torch.nn.Linear(1, 3).state_dict(), NAMES), path)
    assert require_classes(path, NAMES) == str(path)
    assert require_classes(path, None) == str(path)  # nothing to compare (a served bundle without a dataset)
    with pytest.raises(ValueError) as e:
        require_classes(path, ["background", "kidney", "liver"], "pass --checkpoint PATH", dataset="/data/mine")
    msg = str(e.value)
    assert f"checkpoint {path} was trained on classes {NAMES}" in msg
    assert "the dataset /data/mine lists ['background', 'kidney', 'liver']" in msg and msg.endswith("pass --checkpoint PATH")
    old = tmp_path / "old.pt"
    torch.save(torch.nn.Linear(1, 3).state_dict(), old)
    assert require_classes(old, NAMES) == str(old)
    assert "stores no class names" in capsys.readouterr().err


def test_the_settings_reader_finds_the_same_names(tmp_path):
    """plan.py (below engines) spells the metadata key itself: the same key, the same answer."""
    from partialseg.data import plan as P
    from partialseg.engines.checkpoint import CLASSES_KEY

    assert P._CLASSES_KEY == CLASSES_KEY
    named, plain = tmp_path / "named.pt", tmp_path / "plain.pt"
    torch.save(with_classes(torch.nn.Linear(1, 2).state_dict(), NAMES[:2]), named)
    torch.save(torch.nn.Linear(1, 2).state_dict(), plain)
    assert P._names_in(named) and not P._names_in(plain) and not P._names_in(tmp_path / "none.pt")
