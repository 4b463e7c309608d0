"""Initial weights: the file a run starts from is named by sha256, checked before use, and must fit the network."""
import json

import pytest
import torch
from safetensors.torch import save_file

from nnunet_adpfl.common import initial_weights as iw
from nnunet_adpfl.common.tensors import unique_state
from tests.nets import build


def reference(seed=0):
    return {k: v.clone() for k, v in unique_state(build(2, seed=seed)).items()}


def test_pretrained_weights_argument_forms():
    assert iw.pretrained_weights_argument(["nnUNetv2_train", "1", "2d", "0"]) is None
    assert iw.pretrained_weights_argument(["x", "-pretrained_weights", "w.pth", "-tr", "T"]) == "w.pth"
    assert iw.pretrained_weights_argument(["x", "--pretrained_weights=w.pth"]) == "w.pth"


def test_safetensors_and_nnunet_checkpoint_load_the_same_tensors(tmp_path):
    public = reference(seed=1)
    save_file(public, tmp_path / "w.safetensors")
    torch.save({"network_weights": public}, tmp_path / "checkpoint_final.pth")
    for name in ("w.safetensors", "checkpoint_final.pth"):
        got = iw.load_weights_file(iw.describe_file(tmp_path / name), reference(seed=0))
        assert set(got) == set(public) and all(torch.equal(got[k], public[k]) for k in public)


def test_changed_file_is_refused(tmp_path):
    save_file(reference(seed=1), tmp_path / "w.safetensors")
    record = iw.describe_file(tmp_path / "w.safetensors")
    save_file(reference(seed=2), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="changed since the federation was created"):
        iw.load_weights_file(record, reference())


def test_weights_of_another_network_are_refused(tmp_path):
    ref = reference()
    missing = dict(list(ref.items())[1:])
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="lack"):
        iw.load_weights_file(iw.describe_file(tmp_path / "missing.safetensors"), ref)
    reshaped = {k: (torch.zeros(v.numel() + 1) if i == 0 else v) for i, (k, v) in enumerate(ref.items())}
    save_file(reshaped, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match="shape of"):
        iw.load_weights_file(iw.describe_file(tmp_path / "shape.safetensors"), ref)
    with pytest.raises(FileNotFoundError):
        iw.describe_file(tmp_path / "absent.safetensors")


def test_state_sha256_changes_with_any_weight():
    a, b = build(2, seed=0), build(2, seed=0)
    assert iw.state_sha256(a) == iw.state_sha256(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert iw.state_sha256(a) != iw.state_sha256(b)


def test_record_is_kept_from_the_first_start(tmp_path):
    net = build(2, seed=0)
    first = iw.initial_weights_record(net, str(tmp_path), fresh=True, origin={"source": "x"})
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # training happened
    again = iw.initial_weights_record(net, str(tmp_path), fresh=False, origin={"source": "x"})
    assert again == first == json.loads((tmp_path / iw.RECORD_NAME).read_text())
    assert first["state_sha256"] != iw.state_sha256(net)


def test_segmentation_layers_are_transferred_only_when_the_labels_fit(tmp_path):
    public = build(2, out_ch=3, seed=1)
    torch.save({"network_weights": public.state_dict()}, tmp_path / "public.pth")
    seg = [k for k in public.state_dict() if iw.SEG_LAYERS in k]
    assert seg
    same_labels = build(2, out_ch=3, seed=0)
    assert "transferred" in iw.transfer_segmentation_layers(same_labels, tmp_path / "public.pth")
    got, want = same_labels.state_dict(), public.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in seg)

    other_labels = build(2, out_ch=5, seed=0)
    before = {k: v.clone() for k, v in other_labels.state_dict().items()}
    assert iw.transfer_segmentation_layers(other_labels, tmp_path / "public.pth").startswith("random")
    assert all(torch.equal(before[k], v) for k, v in other_labels.state_dict().items())
