"""The released model of a federation (release_ema_decay): EMA of the signed global models, at every site."""
import json

import pytest
import torch
from torch import nn

from nnunet_adpfl.cli import main
from nnunet_adpfl.common.tensors import unique_state
from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import Aggregator, create_federation, load_federation
from nnunet_adpfl.federation.released import check_decay, ema_of_globals
from nnunet_adpfl.federation.site import FederatedTrainerMixin, SiteClient

SITES = ["A", "B"]


def globals_of(net: nn.Module, rounds: int) -> list[dict]:
    out = []
    for r in range(rounds + 1):
        g = torch.Generator().manual_seed(r)
        out.append({k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v + r
                    for k, v in unique_state(net).items()})
    return out


def test_ema_follows_its_definition():
    g = [{"w": torch.full((2,), float(v)), "n": torch.tensor(v)} for v in (1, 2, 4)]
    ema = ema_of_globals(g, 0.5)
    assert torch.equal(ema["w"], torch.full((2,), 0.25 * 1 + 0.25 * 2 + 0.5 * 4))  # ema_1 = g_1
    assert ema["w"].dtype == torch.float32 and ema["n"].item() == 4  # non-float tensors: the last round's
    assert torch.equal(ema_of_globals(g[:1], 0.9)["w"], g[0]["w"])


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.5"])
def test_decay_must_be_in_the_open_unit_interval(bad):
    with pytest.raises(ValueError, match="release_ema_decay"):
        check_decay(bad)
    assert check_decay(None) is None


def test_ema_refuses_mismatched_or_missing_globals():
    with pytest.raises(ValueError, match="different tensors"):
        ema_of_globals([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], 0.5)
    with pytest.raises(ValueError, match="no global"):
        ema_of_globals([], 0.5)


def test_federation_init_stores_the_decay_and_refuses_a_bad_one(tmp_path, capsys):
    cfg = create_federation(tmp_path / "fed", tmp_path / "keys", SITES, 2, 1, "npfl", release_ema_decay=0.7)
    assert cfg["release_ema_decay"] == 0.7
    assert json.loads((tmp_path / "fed" / ff.FEDERATION_FILE).read_text())["release_ema_decay"] == 0.7
    with pytest.raises(SystemExit, match="release_ema_decay must be"):
        main(["federation", "init", str(tmp_path / "fed2"), "--keys-dir", str(tmp_path / "keys2"), "--sites", "A,B",
              "--rounds", "2", "--mode", "npfl", "--release-ema", "1"])
    assert not (tmp_path / "fed2").exists() and not (tmp_path / "keys2").exists()


def test_a_bad_decay_in_federation_json_is_refused_when_the_folder_is_loaded(tmp_path):
    create_federation(tmp_path / "fed", tmp_path / "keys", SITES, 2, 1, "npfl")
    path = tmp_path / "fed" / ff.FEDERATION_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "release_ema_decay": "0.5"}))
    with pytest.raises(ValueError, match="federation.json: release_ema_decay must be"):
        load_federation(tmp_path / "fed")  # every party (aggregator, site at start-up) loads it this way


class _Recorder:
    def on_train_end(self):  # stands in for nnU-Net's: records what checkpoint_final would hold
        self.final = {k: v.clone() for k, v in unique_state(self.network).items()}


class _Site(FederatedTrainerMixin, _Recorder):
    pass


def finished_site(tmp_path, decay, rounds=3) -> tuple[_Site, list[dict]]:
    fed, keys = tmp_path / "fed", tmp_path / "keys"
    create_federation(fed, keys, SITES, rounds, 1, "npfl", release_ema_decay=decay)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True), nn.BatchNorm2d(2))
    gs = globals_of(net, rounds)
    agg = Aggregator(fed, keys, log=lambda *_: None)
    for r, g in enumerate(gs):
        agg._write_global(r, g, {"sites": SITES, "num_cases": 2})
    site = _Site.__new__(_Site)  # the mixin's end-of-training step without an nnU-Net run
    site.network, site.device, site.epochs_per_round, site.current_epoch = net, torch.device("cpu"), 1, rounds
    site.client = SiteClient(fed, "A", keys / "A.key", wait_timeout_s=0.1, poll_interval=0.01)
    site.print_to_log_file = lambda *_: None
    return site, gs


def test_final_model_is_the_ema_of_the_signed_globals(tmp_path):
    site, gs = finished_site(tmp_path, 0.5)
    site.on_train_end()
    expected = ema_of_globals(gs[1:], 0.5)  # rounds 1..R: round 0 (random or public weights) is not averaged
    assert all(torch.allclose(site.final[k], expected[k]) for k in expected)
    assert not torch.allclose(site.final["0.weight"], gs[-1]["0.weight"])


def test_without_the_setting_the_final_model_is_left_as_trained(tmp_path):
    site, _ = finished_site(tmp_path, None)
    before = {k: v.clone() for k, v in unique_state(site.network).items()}
    site.on_train_end()
    assert all(torch.equal(site.final[k], before[k]) for k in before)


def test_a_tampered_global_is_refused_not_averaged(tmp_path):
    site, gs = finished_site(tmp_path, 0.5)
    manifest_path = ff.global_paths(site.client.fed, 2)[1]
    manifest = json.loads(manifest_path.read_text())
    manifest["num_cases"] = 99  # any change breaks the aggregator's HMAC
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TimeoutError, match="refused: .*HMAC"):  # refused; the site waits for a valid one
        site.on_train_end()
