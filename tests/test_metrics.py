import math

import numpy as np

from nnunet_adpfl.metrics import dice


def test_dice_hand_computed():
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 1, 0]])
    d = dice(ref, pred, [1, 2, 3, (1, 2)])
    assert d[1] == 2 * 1 / (2 + 2)
    assert d[2] == 2 * 1 / (2 + 1)
    assert math.isnan(d[3])  # absent in both
    assert d[(1, 2)] == 2 * 3 / (4 + 3)
    assert dice(ref, np.zeros_like(ref), [1])[1] == 0.0
