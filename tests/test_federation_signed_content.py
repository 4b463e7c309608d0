"""Signed content stays what was signed (review26 C3, C5, C7): a restarted aggregator never signs a second global
for a closed round, the coordinator signs the plan files it wrote, and a replayed signed file in fingerprints/ is
refused with the site's name. Helpers: test_federation_attacks."""
import hashlib
import json
from types import SimpleNamespace

import pytest

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import Aggregator, ClosedRoundAltered
from test_federation_attacks import QUIET, delta, in_thread, make, rejections


# ---- C3: a closed round's global is fixed -----------------------------------------------------------------------
def _close_round_1_then_flip_a_byte(tmp_path):
    """Round 1 closes by quorum from A and B; C's update arrives late; a keyless writer flips a byte of global 1."""
    fed, keys, agg, clients = make(tmp_path, rounds=2, timeout=0.0, quorum=2)
    clients["A"].upload(1, delta(1), 3, None)
    clients["B"].upload(1, delta(2), 3, None)
    agg.run(max_rounds=1)
    tensor_path, manifest_path = ff.global_paths(fed, 1)
    signed = tensor_path.read_bytes(), manifest_path.read_bytes()
    clients["C"].upload(1, delta(3), 3, None)
    altered = bytearray(signed[0])
    altered[-1] ^= 1
    tensor_path.write_bytes(bytes(altered))
    clients["A"].upload(2, delta(4), 3, None)
    clients["B"].upload(2, delta(5), 3, None)
    return fed, keys, clients, signed


def test_a_restart_restores_a_closed_global_bit_for_bit_from_its_signed_sites(tmp_path):
    fed, keys, clients, signed = _close_round_1_then_flip_a_byte(tmp_path)
    assert in_thread(Aggregator(fed, keys, **QUIET).run) == 2
    tensor_path, manifest_path = ff.global_paths(fed, 1)
    assert (tensor_path.read_bytes(), manifest_path.read_bytes()) == signed  # C's late update is not added
    assert json.loads(signed[1])["sites"] == ["A", "B"]
    assert "sha256" in rejections(fed, 1)[-1]["reason"]
    clients["C"].wait_global(2)


@pytest.mark.parametrize("change", ["A re-signs another update", "A's update is deleted"])
def test_a_restart_stops_rather_than_sign_a_different_global_for_a_closed_round(tmp_path, change):
    fed, keys, clients, signed = _close_round_1_then_flip_a_byte(tmp_path)
    if change == "A re-signs another update":
        clients["A"].upload(1, delta(7), 3, None)
    else:
        ff.update_paths(fed, 1, "A")[0].unlink()
    with pytest.raises(ClosedRoundAltered, match=r"round 1.*restore"):
        in_thread(Aggregator(fed, keys, **QUIET).run)
    assert ff.global_paths(fed, 1)[1].read_bytes() == signed[1]  # the signed manifest is kept, never re-signed
    assert not ff.global_paths(fed, 2)[1].exists()


@pytest.mark.parametrize("seed, restored", [(0, True), (1, False)])
def test_the_initial_model_is_restored_only_if_rebuilt_bit_for_bit(tmp_path, monkeypatch, seed, restored):
    from nnunet_adpfl.federation import aggregator
    from test_federation_attacks import model
    fed, keys, agg, clients = make(tmp_path)  # round 0 is model(0)
    monkeypatch.setattr(aggregator, "read_plan_files", lambda *_: {"nnUNetPlans.json": {}, "dataset.json": {}})
    monkeypatch.setattr(aggregator, "build_initial_model", lambda *_: model(seed))
    tensor_path, manifest_path = ff.global_paths(fed, 0)
    signed = tensor_path.read_bytes(), manifest_path.read_bytes()
    tensor_path.write_bytes(signed[0][:-1])
    if restored:
        Aggregator(fed, keys, **QUIET).ensure_initial_model()
        assert (tensor_path.read_bytes(), manifest_path.read_bytes()) == signed
    else:
        with pytest.raises(ClosedRoundAltered, match="round 0"):
            Aggregator(fed, keys, **QUIET).ensure_initial_model()
        assert manifest_path.read_bytes() == signed[1]


# ---- C5: the coordinator signs the plan files it wrote or checked, never a copy read back ------------------------
def _signed_fingerprints(fed, keys, summary=None, **fields):
    """Every site's signed fingerprint file (``summary``: A's summary, ``fields``: A's other fields)."""
    federation = json.loads((fed / ff.FEDERATION_FILE).read_text())["id"]
    for site in json.loads((fed / ff.FEDERATION_FILE).read_text())["sites"]:
        content = {"kind": "fingerprint", "federation": federation, "site": site, "summary": {}}
        if site == "A":
            content.update(summary={} if summary is None else summary, **fields)
        content["hmac"] = ff.mac(ff.load_key(keys / f"{site}.key"), content)
        ff.write_json_in(fed, fed / "fingerprints" / f"{site}.json", content)


def _plan_args(tmp_path, fed, keys):
    return SimpleNamespace(federation_dir=str(fed), keys_dir=str(keys), dataset_id=1, dataset_name="X",
                           work_dir=str(tmp_path / "work"), max_features=None)


def test_plan_signs_the_plan_files_it_wrote_not_what_a_writer_swaps_in_before_signing(tmp_path, monkeypatch):
    from nnunet_adpfl.federation import federation_file, plan, summary
    from nnunet_adpfl.federation.commands import cmd_plan
    fed, keys, agg, clients = make(tmp_path, sites=["A", "B"])
    _signed_fingerprints(fed, keys)
    configuration = {"patch_size": [4], "batch_size": 2, "spacing": [1.0]}
    monkeypatch.setattr(plan, "plan_federated", lambda *a, **k: {"configurations": {"3d_fullres": configuration}})
    monkeypatch.setattr(summary, "merge_summaries", lambda s: ({"coordinator": "fingerprint"}, {"coordinator": 1}))
    open_federation = federation_file.open_federation

    def swap_then_open(*args):  # a keyless writer acts between the coordinator's write and its signature
        (fed / "plans" / "dataset.json").write_text('{"attacker": 1}')
        return open_federation(*args)

    monkeypatch.setattr(federation_file, "open_federation", swap_then_open)
    cmd_plan(_plan_args(tmp_path, fed, keys))
    signed = json.loads((fed / ff.FEDERATION_FILE).read_text())["plan_files"]["dataset.json"]
    assert signed == hashlib.sha256(json.dumps({"coordinator": 1}, indent=2).encode()).hexdigest()
    with pytest.raises(ValueError, match="differs from the plan the coordinator signed"):
        federation_file.read_plan_files(fed, open_federation(fed, keys)[0])


def test_adopt_plan_copies_the_bytes_it_checked(tmp_path, monkeypatch):
    from nnunet_adpfl.federation import federation_file
    from nnunet_adpfl.federation.aggregator import create_federation
    planned, keys, agg, clients = make(tmp_path, sites=["A", "B"])
    names = federation_file.PLAN_FILES
    written = federation_file.write_plan_files(planned, {name: b'{"coordinator": 1}' for name in names})
    federation_file.sign_plan(planned, keys, "0" * 64, written)
    fed = tmp_path / "new"
    create_federation(fed, keys, ["A", "B"], rounds=1, epochs_per_round=1, mode="npfl")
    write_bytes_in = ff.write_bytes_in

    def swap_while_copying(root, path, data, *args):  # a keyless writer swaps the planned folder's files
        for name in names:
            (planned / "plans" / name).write_text('{"attacker": 1}')
        return write_bytes_in(root, path, data, *args)

    monkeypatch.setattr(ff, "write_bytes_in", swap_while_copying)
    cfg = federation_file.adopt_plan(fed, keys, planned)
    assert cfg["plan_files"] == written
    assert federation_file.read_plan_files(fed, cfg)["dataset.json"] == {"coordinator": 1}


# ---- C7: a replayed or malformed signed fingerprint ends 'plan' with the site's name -----------------------------
def test_plan_refuses_a_signed_update_manifest_replayed_as_a_fingerprint(tmp_path):
    from nnunet_adpfl.federation.commands import cmd_plan, fingerprint_path
    fed, keys, agg, clients = make(tmp_path, sites=["A", "B"])
    _signed_fingerprints(fed, keys)
    clients["A"].upload(1, delta(1), 3, None)
    fingerprint_path(fed, "A").write_bytes(ff.update_paths(fed, 1, "A")[1].read_bytes())  # a keyless writer
    with pytest.raises(SystemExit, match="not a fingerprint of site A"):
        cmd_plan(_plan_args(tmp_path, fed, keys))


@pytest.mark.parametrize("summary, fields, message", [
    ({"num_cases": 10 ** 12}, {}, r"site A cannot be merged .*num_cases must be an integer in 1\.\.100000"),
    ({"num_cases": 3}, {}, "site A cannot be merged .*KeyError"),
    ("a list", {}, "not a fingerprint of site A"),
    ({}, {"site": "B"}, "not a fingerprint of site A"),
])
def test_plan_names_the_site_whose_signed_summary_cannot_be_merged(tmp_path, summary, fields, message):
    from nnunet_adpfl.federation.commands import cmd_plan
    from nnunet_adpfl.federation.summary import QUANTILES, SUMMARY_FORMAT
    fed, keys, agg, clients = make(tmp_path, sites=["A", "B"])
    if isinstance(summary, dict):
        summary = {"format": SUMMARY_FORMAT, "quantile_levels": list(QUANTILES), **summary}
    _signed_fingerprints(fed, keys, summary, **fields)
    with pytest.raises(SystemExit, match=message):
        cmd_plan(_plan_args(tmp_path, fed, keys))
