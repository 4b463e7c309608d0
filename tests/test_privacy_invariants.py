"""Privacy invariants of issue 36 that need no trainer: ordered Poisson draws, refused running statistics."""
import time

import pytest
from torch import nn

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.privacy.sampling import training_augmenter
from nnunet_adpfl.training.trainable import make_dp_safe


class _TaggedDraws:
    """A loader whose draws say which worker made them and in which order; worker 0's draws are slow (as a draw of
    more or larger cases is)."""

    def __init__(self):
        self.thread_id, self.count = 0, 0

    def set_thread_id(self, thread_id):
        self.thread_id = thread_id

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(0.4 if self.thread_id == 0 else 0.0)
        self.count += 1
        return {"data": None, "target": None, "keys": [], "draw": (self.thread_id, self.count)}


def test_training_workers_hand_out_draws_in_draw_order_whatever_their_duration():
    augmenter = training_augmenter(_TaggedDraws(), 2, False)
    try:
        order = [next(augmenter)["draw"] for _ in range(6)]
    finally:
        augmenter._finish()
    # round-robin over the workers, each worker's draws in sequence: fast draws never overtake slow ones
    assert order == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d, nn.InstanceNorm3d])
def test_make_dp_safe_refuses_instance_norm_running_statistics(norm):
    with pytest.raises(SettingsError, match="track_running_stats=True"):
        make_dp_safe(nn.Sequential(nn.Conv2d(1, 2, 3), norm(2, affine=True, track_running_stats=True)))
    make_dp_safe(nn.Sequential(nn.Conv2d(1, 2, 3), norm(2, affine=True)))  # nnU-Net's default: accepted
