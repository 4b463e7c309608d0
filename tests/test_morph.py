"""DP-Morph: morphological properties (2D/3D, binary and soft), gradients, per-case independence of the
adaptive choice, per-case gradients with morphology against a per-case loop, and the label-map postprocessing."""
import copy
import pickle

import numpy as np
import pytest
import torch

from nnunet_adpfl.morphology import morph
from nnunet_adpfl.training.dp_trainer import deep_supervision_weights
from nnunet_adpfl.training.losses import PerCaseLoss
from nnunet_adpfl.privacy.per_case_grads import trainable_params_reached_by_loss
from tests.nets import build, ds_targets
from tests.test_per_case_grads import engine_grads, reference_grads


def images(dim: int, soft: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 12, 12) if dim == 2 else (2, 3, 6, 10, 10)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return x if soft else (x > 0.6).to(torch.float64)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("soft", [False, True])
def test_opening_and_closing_properties(dim, soft):
    x = images(dim, soft)
    k = morph.check_kernel(3, dim)
    opened, closed = morph.opening(x, k), morph.closing(x, k)
    assert (opened <= x).all() and (closed >= x).all()  # anti-extensive, extensive
    assert torch.equal(morph.opening(opened, k), opened) and torch.equal(morph.closing(closed, k), closed)
    both = morph.open_close(x, k)
    assert torch.equal(morph.open_close(both, k), both)
    assert not torch.equal(opened, x) and not torch.equal(closed, x)  # the test data are not trivially fixed points


def test_binary_opening_removes_specks_and_closing_fills_holes():
    x = torch.zeros(1, 1, 11, 11, dtype=torch.float64)
    x[0, 0, 2:9, 2:9] = 1
    x[0, 0, 5, 5] = 0  # a hole
    x[0, 0, 0, 10] = 1  # a speck
    k = (3, 3)
    assert morph.opening(x, k)[0, 0, 0, 10] == 0 and morph.opening(x, k)[0, 0, 3, 3] == 1
    assert morph.closing(x, k)[0, 0, 5, 5] == 1


def test_anisotropic_kernel_and_bad_kernels():
    assert morph.anisotropic_kernel(3, (3.0, 0.8, 0.8)) == (1, 3, 3)
    assert morph.anisotropic_kernel(5, (1.0, 1.0)) == (5, 5)
    assert morph.anisotropic_kernel(5, (2.0, 1.0, 1.0)) == (1, 5, 5)
    for bad in (2, 0, (3, 3)):
        with pytest.raises(ValueError):
            morph.check_kernel(bad, 3)
    with pytest.raises(ValueError, match="unknown"):
        morph.MorphRefine(["none", "dilate"], 3, 2)


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize("ops", [["none", "both", "open"], ["none", "adaptive", "adaptive"]])
def test_refine_returns_normalised_log_probabilities_and_gradients_flow(regions, ops):
    refine = morph.MorphRefine(ops, 3, 3, regions=regions)
    logits = torch.randn(2, 3, 6, 10, 10, dtype=torch.float64, requires_grad=True)
    out = refine([logits, logits[:, :, ::2, ::2, ::2]])  # a deep-supervision list
    assert isinstance(out, list) and out[1].shape == (2, 3, 3, 5, 5)
    if not regions:
        assert torch.allclose(out[0].exp().sum(1), torch.ones(2, 6, 10, 10, dtype=torch.float64))
        # nnU-Net's softmax of the output gives the refined probabilities back
        assert torch.allclose(torch.softmax(out[0], 1), out[0].exp())
    out[0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_adaptive_choice_follows_thickness():
    p = torch.zeros(1, 2, 20, 20, dtype=torch.float64)
    p[0, 0, 2:18, 2:18] = 1  # thick block
    p[0, 1, 10, :] = 1       # one-pixel line
    choice = morph.adaptive_choice(p, (3, 3), thin=0.3, thick=0.7)
    assert choice.tolist() == [[morph.OPERATIONS.index("open"), morph.OPERATIONS.index("close")]]


def test_adaptive_choice_of_a_case_does_not_depend_on_the_other_cases():
    refine = morph.MorphRefine(["none", "adaptive", "adaptive"], 3, 2)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    batch[0, 1, 2:14, 2:14] += 8   # case 0: class 1 thick, class 2 thin
    batch[0, 2, 8, :] += 8
    other = batch.clone()
    other[1:, 1] = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    other[1:, 1, :, 8] += 8        # the other cases the opposite way round
    other[1:, 2, 2:14, 2:14] += 8
    p, q = torch.softmax(batch, 1), torch.softmax(other, 1)
    choice_p, choice_q = (morph.adaptive_choice(x, (3, 3), 0.3, 0.7) for x in (p, q))
    assert not torch.equal(choice_q[1], choice_q[0])  # the others would choose differently: the test can fail
    assert torch.equal(choice_p[0], choice_q[0])
    assert torch.equal(choice_q[0], morph.adaptive_choice(q[:1], (3, 3), 0.3, 0.7)[0])
    assert torch.equal(refine(batch)[0], refine(other)[0])
    assert torch.equal(refine(other)[0], refine(other[:1])[0])  # alone or in a batch: the same output


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("dim,ops", [(2, ["none", "both", "close"]), (3, ["none", "adaptive", "adaptive"])])
def test_per_case_gradients_with_morphology_match_a_per_case_loop(engine, dim, ops):
    net = morph.attach(build(dim, in_ch=2, out_ch=3).to(torch.float64), morph.MorphRefine(ops, 3, dim))
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    x = torch.randn(3, 2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    y = [t.to(torch.float64) for t in ds_targets(out, 3)]
    loss = PerCaseLoss(False, None, deep_supervision_weights(len(out)))
    params = trainable_params_reached_by_loss(net, loss.per_case, x[:1], [t[:1] for t in y])
    ref = reference_grads(net, loss, params, x, y)
    got = engine_grads(engine, net, loss, params, x, y)
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert (rel <= 1e-5).all(), rel
    plain = build(dim, in_ch=2, out_ch=3).to(torch.float64)
    assert set(net.state_dict()) == set(plain.state_dict())  # morphology adds no weights


def test_attached_morphology_survives_a_deepcopy():
    net = morph.attach(build(2, deep_supervision=False), morph.MorphRefine(["none", "open", "open"], 3, 2))
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), copy.deepcopy(net)(x))
        assert torch.allclose(net(x).exp().sum(1), torch.ones(1, 16, 16))


def test_postprocessing_on_label_maps():
    seg = np.zeros((12, 12), dtype=np.uint8)
    seg[2:9, 2:9] = 1
    seg[5, 5] = 0
    seg[0, 11] = 1
    seg[10, 0:3] = 2
    out = morph.morph_postprocess(seg, operations={1: "both"}, kernel=3)
    assert out[5, 5] == 1 and out[0, 11] == 0      # hole closed, speck opened away
    assert (out[10, 0:3] == 2).all()                # other labels untouched
    assert morph.morph_postprocess(seg, operations={}, kernel=3) is seg


def test_determine_keeps_an_operation_only_where_it_improves_dice(tmp_path):
    import SimpleITK as sitk

    from nnunet_adpfl.morphology import postprocessing as mp

    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for i in range(3):
        ref = np.zeros((1, 24, 24), dtype=np.uint8)
        ref[0, 4:14, 4:14] = 1   # label 1: a block the prediction punches holes into
        ref[0, 18:22, 2:22] = 2  # label 2: predicted exactly
        pred = ref.copy()
        pred[0, 6 + i, 6:12:2] = 0
        for arr, folder in ((pred, pred_dir), (ref, ref_dir)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"case_{i}.nii.gz"))
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}
    result = mp.determine(pred_dir, ref_dir, dataset_json)
    assert result["chosen"] == {"1": result["chosen"]["1"]} and result["chosen"]["1"] in ("close", "both")
    assert result["mean_dice"]["1"][result["chosen"]["1"]] > result["mean_dice"]["1"]["none"]
    fns, kwargs = pickle.loads((pred_dir / mp.PKL_NAME).read_bytes())
    assert fns == [morph.morph_postprocess] and kwargs[0]["operations"] == {1: result["chosen"]["1"]}


def test_determine_scores_no_ignored_voxel(tmp_path):
    """The reference's ignore label is no class and its voxels count in no Dice: a false speck the prediction
    leaves only where the reference is ignored must not make opening look better."""
    import SimpleITK as sitk

    from nnunet_adpfl.morphology import postprocessing as mp

    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for i in range(3):
        ref = np.zeros((1, 24, 24), dtype=np.uint8)
        ref[0, 4:14, 4:14] = 1
        pred = ref.copy()
        pred[0, 19 + i, 20] = 1    # a speck that opening would remove ...
        ref[0, 17:24, 17:24] = 9   # ... where the reference is ignored
        for arr, folder in ((pred, pred_dir), (ref, ref_dir)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"case_{i}.nii.gz"))
    dataset_json = {"labels": {"background": 0, "a": 1, "ignore": 9}, "file_ending": ".nii.gz"}
    result = mp.determine(pred_dir, ref_dir, dataset_json)
    assert list(result["mean_dice"]) == ["1"] and result["mean_dice"]["1"]["none"] == 1.0
    assert result["chosen"] == {}


def test_morph_config_per_output_channel():
    from nnunet_adpfl.common.config import SettingsError, load_settings
    from nnunet_adpfl.training.morph_trainer import morph_config

    plans = {"configurations": {"3d_fullres": {"patch_size": [16, 32, 32], "spacing": [3.0, 0.8, 0.8]}}}
    labels = {"labels": {"background": 0, "kidney": 1, "tumour": 2}}
    cfg = morph_config(plans, "3d_fullres", labels, load_settings("", {}), adaptive=False)
    assert cfg["operations"] == ["none", "both", "both"] and cfg["kernel"] == [3, 3, 3] and not cfg["regions"]
    cfg = morph_config(plans, "3d_fullres", labels, load_settings("", {"morph_classes": [2], "morph_anisotropic": True,
                                                                        "morph_operation": "open"}), adaptive=False)
    assert cfg["operations"] == ["none", "none", "open"] and cfg["kernel"] == [1, 3, 3]
    regions = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}
    cfg = morph_config(plans, "3d_fullres", regions, load_settings("", {"morph_classes": [2]}), adaptive=True)
    assert cfg["regions"] and cfg["operations"] == ["none", "adaptive"]
    with pytest.raises(SettingsError, match="morph_classes"):
        morph_config(plans, "3d_fullres", labels, load_settings("", {"morph_classes": [3]}), adaptive=False)
