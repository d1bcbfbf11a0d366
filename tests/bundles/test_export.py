"""Every bundle: ``ckpt_export`` to TorchScript, ``verify_metadata`` offline, ``verify_net_in_out``.

The checkpoint is the network's seed-0 initialisation (export and numerics do not depend on
training). The exported TorchScript must reproduce the eager network's output to
``atol = rtol = 1e-5`` (float32; the measured difference is printed, 0 or ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
SCHEMA = BUNDLES / "meta_schema.json"
NAMES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/inference.json"))

#: bundles whose network ``torch.jit.script`` cannot compile: exported with ``--use_trace True`` on
#: the metadata's input shape instead (docs/serving.md, "TorchScript export", says why)
TRACED = {"dcl_cardiac", "hybrid_polyp"}

pytestmark = pytest.mark.slow


def _parser(bundle: Path, root: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    return parser


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_export_matches_eager(name, tmp_path):
    bundle = BUNDLES / name
    torch.manual_seed(0)
    net = _parser(bundle, tmp_path).get_parsed_content("network_def").eval()
    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")

    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", str(tmp_path / "models" / "model.ts"), "--ckpt_file", str(tmp_path / "models" / "model.pt"),
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(tmp_path)]  # fmt: skip
    spec = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    if name in TRACED:
        cmd += ["--use_trace", "True", "--input_shape", repr([1, spec["num_channels"], *spec["spatial_shape"]])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    from monai.data import load_net_with_metadata

    ts, meta, extra = load_net_with_metadata(str(tmp_path / "models" / "model.ts"), more_extra_files=("inference.json",))
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"])["network_def"] == json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]

    x = torch.rand(2, spec["num_channels"], *spec["spatial_shape"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, scripted = net(x), ts(x)
    diff = (eager - scripted).abs().max().item()
    print(f"{name}: TorchScript vs eager max |diff| = {diff:.3g} on {tuple(x.shape)}")
    torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_offline_and_net_in_out(name, tmp_path):
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle = BUNDLES / name
    meta = str(bundle / "configs" / "metadata.json")
    # offline: the schema file exists at --filepath, so MONAI does not download it
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(bundle / "configs" / "inference.json"),
                      bundle_root=str(tmp_path), device="cpu")  # fmt: skip

    # the schema does reject a metadata file without a mandatory key
    broken = tmp_path / "metadata.json"
    content = json.loads(Path(meta).read_text())
    del content["network_data_format"]
    broken.write_text(json.dumps(content))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))
