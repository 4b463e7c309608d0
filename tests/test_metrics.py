import math

import numpy as np

from nnunet_adpfl.evaluation.metrics import dice


def test_dice_hand_computed():
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 1, 0]])
    d = dice(ref, pred, [1, 2, 3, (1, 2)])
    assert d[1] == 2 * 1 / (2 + 2)
    assert d[2] == 2 * 1 / (2 + 1)
    assert math.isnan(d[3])  # absent in both
    assert d[(1, 2)] == 2 * 3 / (4 + 3)
    assert dice(ref, np.zeros_like(ref), [1])[1] == 0.0


def brute_force_surface_distances(a, b, spacing):
    from nnunet_adpfl.evaluation.metrics import _surface
    pa, pb = np.argwhere(_surface(a)) * spacing, np.argwhere(_surface(b)) * spacing
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def test_hd95_and_nsd_match_brute_force_with_anisotropic_spacing():
    from nnunet_adpfl.evaluation.metrics import hd95, nsd
    rng = np.random.default_rng(0)
    spacing = np.array([2.5, 0.8, 0.8])
    for _ in range(3):
        ref = np.zeros((6, 20, 20), dtype=np.uint8)
        pred = np.zeros_like(ref)
        ref[1:5, 4:14, 5:15] = 1
        z, y, x = rng.integers(0, 3, 3)
        pred[1 + z:4 + z, 3 + y:12 + y, 4 + x:16 + x] = 1
        pred[rng.random(pred.shape) > 0.97] = 1  # specks
        d_rp, d_pr = brute_force_surface_distances(ref == 1, pred == 1, spacing)
        want_hd = max(np.percentile(d_rp, 95), np.percentile(d_pr, 95))
        want_nsd = ((d_rp <= 1.0).sum() + (d_pr <= 1.0).sum()) / (d_rp.size + d_pr.size)
        assert math.isclose(hd95(ref, pred, [1], spacing)[1], want_hd, rel_tol=1e-9)
        assert math.isclose(nsd(ref, pred, [1], 1.0, spacing)[1], want_nsd, rel_tol=1e-9)
    assert hd95(ref, ref, [1], spacing)[1] == 0 and nsd(ref, ref, [1], 1.0, spacing)[1] == 1


def test_hd95_and_nsd_empty_conventions():
    from nnunet_adpfl.evaluation.metrics import hd95, nsd
    ref = np.zeros((4, 10), dtype=np.uint8)
    pred = ref.copy()
    pred[1, 2] = 1
    assert math.isnan(hd95(ref, ref, [1])[1]) and math.isnan(nsd(ref, ref, [1])[1])
    assert hd95(ref, pred, [1], (2.0, 1.0))[1] == math.sqrt(8 ** 2 + 10 ** 2) and nsd(ref, pred, [1])[1] == 0


def test_hd95_and_nsd_match_monai():
    """The reference library: MONAI's compute_hausdorff_distance (95th percentile) and compute_surface_dice."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    from nnunet_adpfl.evaluation.metrics import hd95, nsd
    rng = np.random.default_rng(1)

    def one_hot(seg):
        return torch.from_numpy(np.stack([seg == 0, seg == 1])[None].astype(np.float32))

    for shape, spacing in (((6, 20, 20), (2.5, 0.8, 0.8)), ((24, 30), (1.0, 0.5))):
        for _ in range(3):
            ref = (rng.random(shape) > 0.6).astype(np.uint8)
            pred = (rng.random(shape) > 0.6).astype(np.uint8)
            want_hd = compute_hausdorff_distance(one_hot(pred), one_hot(ref), percentile=95, spacing=spacing).item()
            want_nsd = compute_surface_dice(one_hot(pred), one_hot(ref), class_thresholds=[1.0],
                                            spacing=spacing).item()
            assert math.isclose(hd95(ref, pred, [1], spacing)[1], want_hd, rel_tol=1e-5)
            assert math.isclose(nsd(ref, pred, [1], 1.0, spacing)[1], want_nsd, rel_tol=1e-5)


def test_ignored_voxels_count_in_no_metric():
    """nnU-Net's ignore label: the prediction inside the ignored region, and the faces towards it, are not scored."""
    from nnunet_adpfl.evaluation.metrics import hd95, nsd
    ref = np.zeros((12, 12), dtype=np.uint8)
    ref[3:7, 2:8] = 1  # touches the ignored columns 8-11
    ignored = np.zeros_like(ref, dtype=bool)
    ignored[:, 8:] = True
    pred = ref.copy()
    pred[2:8, 8:] = 1  # grows into the ignored region only
    pred[11, 11] = 1  # a far speck there
    assert dice(ref, pred, [1], ignored)[1] == 1.0 and dice(ref, pred, [1])[1] < 1
    assert hd95(ref, pred, [1], ignore_mask=ignored)[1] == 0.0 and hd95(ref, pred, [1])[1] > 0
    assert nsd(ref, pred, [1], 1.0, ignore_mask=ignored)[1] == 1.0 and nsd(ref, pred, [1])[1] < 1
    enclosed = np.zeros_like(ref)
    enclosed[5, 5] = 1  # every neighbour ignored: no surface to compare
    assert math.isnan(hd95(enclosed, enclosed, [1], ignore_mask=enclosed == 0)[1])
