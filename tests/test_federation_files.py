"""Shared-folder protocol: FedAvg arithmetic, every rejection reason, order independence, restarts."""
import json
import shutil

import pytest
import torch

from nnunet_adpfl.common import tensors
from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import Aggregator, create_federation
from nnunet_adpfl.federation.site import SiteClient
from nnunet_adpfl.federation.strategies import FedAvg

SITES = ["A", "B", "C"]


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "count": torch.tensor(5)}


@pytest.fixture
def fed(tmp_path):
    fed, keys = tmp_path / "fed", tmp_path / "keys"
    cfg = create_federation(fed, keys, SITES, rounds=3, epochs_per_round=1, mode="dpfl", round_timeout_s=0.0,
                            quorum=1)
    agg = Aggregator(fed, keys, poll_interval=0.01, log=lambda *_: None)
    agg._write_global(0, model(), {"sites": [], "num_cases": 0})
    clients = {s: SiteClient(fed, s, keys / f"{s}.key", wait_timeout_s=0.5, poll_interval=0.01) for s in SITES}
    return fed, keys, cfg, agg, clients


def delta(seed):
    d = model(seed)
    return {"w": d["w"], "b": d["b"], "count": torch.tensor(0)}


def rejections(fed, r):
    path = ff.round_dir(fed, r) / "rejections.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_fedavg_weighted_by_cases(fed):
    fed_dir, _, _, agg, clients = fed
    cases = {"A": 2, "B": 3, "C": 5}
    for i, s in enumerate(SITES):
        clients[s].upload(1, delta(10 + i), cases[s], {"epsilon": 1.0 + i})
    manifest = agg.run_round(1)
    got = clients["A"].wait_global(1)
    g0 = model()
    for k in ("w", "b"):
        expected = g0[k] + sum(cases[s] * delta(10 + i)[k] for i, s in enumerate(SITES)) / 10
        torch.testing.assert_close(got[k], expected)
    assert torch.equal(got["count"], g0["count"])
    assert manifest["sites"] == SITES and manifest["num_cases"] == 10
    assert manifest["epsilon_by_site"] == {"A": 1.0, "B": 2.0, "C": 3.0}


def test_result_does_not_depend_on_arrival_order(tmp_path):
    results = []
    for order in (SITES, SITES[::-1]):
        fed_dir, keys = tmp_path / "".join(order) / "fed", tmp_path / "".join(order) / "keys"
        create_federation(fed_dir, keys, SITES, rounds=1, epochs_per_round=1, mode="npfl")
        agg = Aggregator(fed_dir, keys, poll_interval=0.01, log=lambda *_: None)
        agg._write_global(0, model(), {"sites": [], "num_cases": 0})
        for s in order:
            SiteClient(fed_dir, s, keys / f"{s}.key").upload(1, delta(ord(s)), ord(s) - 60, None)
        agg.run_round(1)
        results.append(ff.global_paths(fed_dir, 1)[0].read_bytes())
    assert results[0] == results[1]


def test_strategy_sum_order_only_changes_roundoff():
    base = model()
    deltas = [delta(i) for i in range(5)]
    outs = []
    for seq in (deltas, deltas[::-1]):
        s = FedAvg()
        s.begin(base)
        for i, d in enumerate(seq):
            s.add(d, 1)
        outs.append(s.finish())
    torch.testing.assert_close(outs[0]["w"], outs[1]["w"], rtol=0, atol=1e-6)


def _corrupt(fed_dir, clients, keys, how):
    """Upload a valid update from A, then break it in one way; B uploads a valid one."""
    clients["B"].upload(1, delta(2), 4, None)
    tensor_path, manifest_path = ff.update_paths(fed_dir, 1, "A")
    if how == "unknown site":
        clients["A"].upload(1, delta(1), 4, None)
        shutil.move(manifest_path, manifest_path.with_name("Z.json"))
        shutil.move(tensor_path, tensor_path.with_name("Z.safetensors"))
        return
    if how == "bad HMAC":
        m = clients["A"].upload(1, delta(1), 4, None)
        m["num_cases"] = 400  # inflate its weight
        ff.write_json_atomic(manifest_path, m)
    elif how == "wrong round (replay)":
        clients["A"].upload(1, delta(1), 4, None)
        src_t, src_m = ff.update_paths(fed_dir, 1, "A")
        m = json.loads(src_m.read_text())
        m["round"] = 0
        m["hmac"] = ff.mac(ff.load_key(keys / "A.key"), m)  # a genuine old manifest, replayed
        ff.write_json_atomic(src_m, m)
    elif how == "truncated":
        clients["A"].upload(1, delta(1), 4, None)
        tensor_path.write_bytes(tensor_path.read_bytes()[:-10])
    elif how == "wrong shape":
        d = delta(1)
        d["w"] = torch.zeros(3, 4)
        clients["A"].upload(1, d, 4, None)
    elif how == "wrong dtype":
        d = delta(1)
        d["b"] = d["b"].double()
        clients["A"].upload(1, d, 4, None)
    elif how == "wrong keys":
        d = delta(1)
        d["extra"] = torch.zeros(1)
        clients["A"].upload(1, d, 4, None)
    elif how == "NaN":
        d = delta(1)
        d["w"][0, 0] = float("nan")
        clients["A"].upload(1, d, 4, None)
    elif how == "Inf":
        d = delta(1)
        d["b"][1] = float("inf")
        clients["A"].upload(1, d, 4, None)
    elif how == "not JSON":
        clients["A"].upload(1, delta(1), 4, None)
        manifest_path.write_text("{broken")
    elif how == "pickle instead of safetensors":
        clients["A"].upload(1, delta(1), 4, None)
        torch.save(delta(1), tensor_path)


REASONS = {"unknown site": "unknown site", "bad HMAC": "bad HMAC", "wrong round (replay)": "wrong round",
           "truncated": "truncated", "wrong shape": "wrong shape", "wrong dtype": "wrong shape/dtype",
           "wrong keys": "wrong tensor names", "NaN": "NaN/Inf", "Inf": "NaN/Inf", "not JSON": "not valid JSON",
           "pickle instead of safetensors": "truncated or altered"}


@pytest.mark.parametrize("how", list(REASONS))
def test_bad_update_is_rejected_with_reason_and_never_averaged(fed, how):
    fed_dir, keys, _, agg, clients = fed
    _corrupt(fed_dir, clients, keys, how)
    manifest = agg.run_round(1)  # timeout 0 + quorum 1: closes with the valid updates
    assert manifest["sites"] == ["B"]
    reasons = [r["reason"] for r in rejections(fed_dir, 1)]
    assert any(REASONS[how] in r for r in reasons), reasons
    got = clients["B"].wait_global(1)
    torch.testing.assert_close(got["w"], model()["w"] + delta(2)["w"])


def test_foreign_federation_update_is_rejected(fed, tmp_path):
    fed_dir, keys, _, agg, clients = fed
    clients["A"].upload(1, delta(1), 4, None)
    m = json.loads(ff.update_paths(fed_dir, 1, "A")[1].read_text())
    m["federation"] = "another-federation"
    m["hmac"] = ff.mac(ff.load_key(keys / "A.key"), m)
    ff.write_json_atomic(ff.update_paths(fed_dir, 1, "A")[1], m)
    clients["C"].upload(1, delta(3), 2, None)
    assert agg.run_round(1)["sites"] == ["C"]
    assert "another federation" in rejections(fed_dir, 1)[0]["reason"]


def test_aggregator_restarts_from_the_folder(fed):
    fed_dir, keys, _, agg, clients = fed
    for s in SITES:
        clients[s].upload(1, delta(ord(s)), 3, None)
    agg.run(max_rounds=1)
    again = Aggregator(fed_dir, keys, poll_interval=0.01, log=lambda *_: None)  # a restarted aggregator
    assert again.last_completed_round() == 1
    for s in SITES:
        clients[s].upload(2, delta(ord(s) + 1), 3, None)
    assert again.run(max_rounds=1) == 2


def test_site_checks_the_global_model(fed):
    fed_dir, keys, _, agg, clients = fed
    for s in SITES:
        clients[s].upload(1, delta(ord(s)), 3, None)
    agg.run_round(1)
    tensor_path, manifest_path = ff.global_paths(fed_dir, 1)
    m = json.loads(manifest_path.read_text())
    m["hmacs"]["A"] = m["hmacs"]["B"]  # B's MAC does not verify under A's key
    ff.write_json_atomic(manifest_path, m)
    with pytest.raises(TimeoutError, match="refused: .*bad or missing HMAC"):  # refused, kept waiting
        clients["A"].wait_global(1)
    clients["B"].wait_global(1)
    tensor_path.write_bytes(tensor_path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TimeoutError, match="refused: sha256"):
        clients["B"].wait_global(1)


def test_site_waits_with_a_clear_timeout(fed):
    _, _, _, _, clients = fed
    with pytest.raises(TimeoutError, match="Is the aggregator running"):
        clients["A"].wait_global(2)


def test_federation_set_up_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        create_federation(tmp_path / "f1", tmp_path / "k", SITES, 2, 1, "fedprox")
    with pytest.raises(ValueError, match="distinct"):
        create_federation(tmp_path / "f2", tmp_path / "k", ["A", "A"], 2, 1, "npfl")
    with pytest.raises(ValueError, match="inside the shared"):
        create_federation(tmp_path / "f3", tmp_path / "f3" / "keys", SITES, 2, 1, "npfl")
    create_federation(tmp_path / "f4", tmp_path / "k", SITES, 2, 1, "npfl")
    with pytest.raises(FileExistsError):
        create_federation(tmp_path / "f4", tmp_path / "k", SITES, 2, 1, "npfl")
    with pytest.raises(Exception, match="not a site"):
        SiteClient(tmp_path / "f4", "Q", tmp_path / "k" / "A.key")


def test_shared_files_are_readable_by_the_other_parties_but_keys_are_not(fed):
    fed_dir, keys, _, _, clients = fed
    clients["A"].upload(1, delta(1), 3, None)
    for path in [*ff.update_paths(fed_dir, 1, "A"), fed_dir / ff.FEDERATION_FILE]:
        assert path.stat().st_mode & 0o044, path  # group/other read (umask permitting)
    assert (keys / "A.key").stat().st_mode & 0o077 == 0


def test_sparse_topk_update_is_decoded_and_averaged(fed):
    from nnunet_adpfl.privacy.sparsify import topk_encode
    fed_dir, _, _, agg, clients = fed
    d = delta(7)
    floats = {k: v for k, v in d.items() if v.is_floating_point()}
    encoded = topk_encode(floats, 0.5)
    clients["A"].upload(1, encoded, 2, {"encoding": "topk", "density": 0.5})
    manifest = agg.run_round(1)
    assert manifest["sites"] == ["A"]
    kept = torch.zeros_like(d["w"]).flatten()
    kept[encoded["w::idx"]] = encoded["w::val"]
    torch.testing.assert_close(clients["A"].wait_global(1)["w"], model()["w"] + kept.view_as(d["w"]))


def test_malformed_sparse_update_is_rejected(fed):
    from nnunet_adpfl.privacy.sparsify import topk_encode
    fed_dir, _, _, agg, clients = fed
    encoded = topk_encode({k: v for k, v in delta(7).items() if v.is_floating_point()}, 0.5)
    encoded["w::idx"][1] = encoded["w::idx"][0]  # duplicate index: would double-count a coordinate
    clients["A"].upload(1, encoded, 2, {"encoding": "topk"})
    clients["B"].upload(1, delta(2), 4, None)
    assert agg.run_round(1)["sites"] == ["B"]
    assert "bad top-k encoding" in rejections(fed_dir, 1)[0]["reason"]


def test_shared_nnunet_modules_travel_once():
    from tests.nets import build
    net = build(3)
    full = {k: v.clone() for k, v in net.state_dict().items()}
    unique = tensors.unique_state(net)
    assert len(unique) < len(full)  # nnU-Net registers convs twice (conv / all_modules.0)
    assert len({id(t) for t in net.state_dict(keep_vars=True).values()}) == len(unique)
    shifted = {k: v + 1 for k, v in unique.items()}
    tensors.load_unique_state(net, shifted)
    for k, v in net.state_dict().items():  # every alias follows its tensor
        assert torch.equal(v, shifted[k] if k in shifted else full[k] + 1)
    with pytest.raises(ValueError, match="state keys differ"):
        tensors.load_unique_state(net, {k: v for k, v in list(shifted.items())[1:]})


def test_subset_update_averages_each_tensor_over_the_sites_that_trained_it(fed):
    """dp_trainable: a site uploads only the tensors it trained (sites choose from their own N: a small site may train
    norm_bias while a larger one trains all); a tensor is averaged over the sites that sent it, undiluted."""
    fed_dir, _, _, agg, clients = fed
    clients["A"].upload(1, {"w": delta(1)["w"]}, 2, {"subset": True})
    clients["B"].upload(1, delta(2), 3, None)
    assert agg.run_round(1)["sites"] == ["A", "B"]
    got, g0 = clients["A"].wait_global(1), model()
    torch.testing.assert_close(got["w"], g0["w"] + (2 * delta(1)["w"] + 3 * delta(2)["w"]) / 5)
    torch.testing.assert_close(got["b"], g0["b"] + delta(2)["b"])  # only B trained b


def test_sparse_subset_update(fed):
    from nnunet_adpfl.privacy.sparsify import topk_encode
    fed_dir, _, _, agg, clients = fed
    encoded = topk_encode({"b": delta(3)["b"]}, 1.0)
    clients["A"].upload(1, encoded, 2, {"encoding": "topk", "subset": True})
    assert agg.run_round(1)["sites"] == ["A"]
    got = clients["A"].wait_global(1)
    torch.testing.assert_close(got["b"], model()["b"] + delta(3)["b"])
    torch.testing.assert_close(got["w"], model()["w"])


def test_a_trained_tensor_that_sparsification_left_empty_still_counts_as_a_zero_update(fed):
    """ADP-FL's top-k upload: a trained tensor with no entry kept is a zero update of that site (error feedback keeps
    the rest), not a frozen tensor: it weighs in the average."""
    from nnunet_adpfl.privacy.sparsify import topk_encode
    fed_dir, _, _, agg, clients = fed
    encoded = topk_encode({"w": delta(3)["w"], "b": 1e-6 * delta(3)["b"]}, 12 / 15)  # the 12 of w kept
    assert encoded["b::idx"].numel() == 0
    clients["A"].upload(1, encoded, 2, {"encoding": "topk", "subset": True})
    clients["B"].upload(1, delta(2), 3, None)
    assert agg.run_round(1)["sites"] == ["A", "B"]
    torch.testing.assert_close(clients["A"].wait_global(1)["b"], model()["b"] + 3 * delta(2)["b"] / 5)


@pytest.mark.parametrize("tensors, privacy, reason", [
    ({"w": torch.zeros(4, 3), "other": torch.zeros(2)}, {"subset": True}, "wrong tensor names"),
    ({"w": torch.zeros(3, 4)}, {"subset": True}, "wrong shape"),
    ({"w": torch.zeros(4, 3)}, None, "wrong tensor names"),  # missing tensors need the subset flag
    ({}, {"subset": True}, "holds no tensors"),
    ({"w": torch.zeros(4, 3)}, {"subset": "yes"}, "subset must be true or false"),
])
def test_bad_subset_update_is_rejected(fed, tensors, privacy, reason):
    fed_dir, _, _, agg, clients = fed
    clients["A"].upload(1, tensors, 2, privacy)
    clients["B"].upload(1, delta(2), 4, None)
    assert agg.run_round(1)["sites"] == ["B"]
    assert reason in rejections(fed_dir, 1)[0]["reason"]


def test_stale_temporaries_of_killed_writers_are_removed_when_the_aggregator_starts(fed):
    import os
    import time
    fed_dir, keys, _, _, _ = fed
    stale, fresh = ff.round_dir(fed_dir, 1) / ".A.json.1a2b.tmp", ff.round_dir(fed_dir, 1) / ".B.json.3c4d.tmp"
    stale.parent.mkdir(parents=True)
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    Aggregator(fed_dir, keys, poll_interval=0.01, log=lambda *_: None)
    assert not stale.exists() and fresh.exists()  # a writer may still be writing the fresh one


def test_the_cleanup_works_through_a_federation_path_that_is_a_symlink(tmp_path):
    import os
    import time
    from nnunet_adpfl.common import atomic
    (tmp_path / "real" / "round_0001").mkdir(parents=True)
    (tmp_path / "fed").symlink_to(tmp_path / "real")  # e.g. /data/fed -> /mnt/nfs/fed
    stale = tmp_path / "real" / "round_0001" / ".A.json.1a2b.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert atomic.remove_stale_temporaries(tmp_path / "fed", 3600) == [tmp_path / "fed" / "round_0001" / stale.name]
    assert not stale.exists()


def test_a_folder_swapped_for_a_symlink_during_the_cleanup_does_not_redirect_it(tmp_path, monkeypatch):
    """The cleanup unlinks by the folder's descriptor: a folder swapped for a symlink to another folder between
    the listing and the unlink (a keyless writer's race) makes it remove nothing outside the root."""
    import os
    import time
    from nnunet_adpfl.common import atomic
    root, outside = tmp_path / "fed", tmp_path / "outside"
    (root / "round_0001").mkdir(parents=True)
    outside.mkdir()
    old = time.time() - 2 * 3600
    for folder in (root / "round_0001", outside):
        (folder / ".A.json.1a2b.tmp").write_bytes(b"partial")
        os.utime(folder / ".A.json.1a2b.tmp", (old, old))
    real = atomic.TEMPORARY

    class SwapOnFirstMatch:
        def fullmatch(self, name):
            if not (root / "moved").exists():
                (root / "round_0001").rename(root / "moved")
                (root / "round_0001").symlink_to(outside)
            return real.fullmatch(name)

    monkeypatch.setattr(atomic, "TEMPORARY", SwapOnFirstMatch())
    atomic.remove_stale_temporaries(root, 3600)
    assert (outside / ".A.json.1a2b.tmp").exists() and not (root / "moved" / ".A.json.1a2b.tmp").exists()


def test_an_update_changed_after_it_was_accepted_is_not_averaged(fed):
    fed_dir, _, _, agg, clients = fed
    for s in SITES:
        clients[s].upload(1, delta(ord(s)), 3, None)
    previous = ff.stored_global(fed_dir, 0)
    accepted, norms = {}, {}
    agg._judge(1, ff.tensor_spec(previous), accepted, norms, {})
    assert sorted(accepted) == SITES
    clients["C"].upload(1, {**delta(9), "w": delta(9)["w"] * 1e6}, 3, None)  # swapped after the check
    manifest = agg._close(1, previous, ff.tensor_spec(previous), accepted, norms)
    assert manifest["sites"] == ["A", "B"]
    assert "changed since it was accepted" in rejections(fed_dir, 1)[0]["reason"]


def test_a_folder_planted_where_a_file_belongs_is_moved_aside(fed):
    fed_dir, _, _, _, clients = fed
    tensor_path, manifest_path = ff.update_paths(fed_dir, 1, "A")
    (manifest_path / "inner").mkdir(parents=True)
    clients["A"].upload(1, delta(1), 3, None)
    assert clients["A"].own_update(1) is not None


def test_site_reads_the_round0_manifest_only_with_its_hmac(fed):
    fed_dir, _, _, _, clients = fed
    manifest_path = ff.global_paths(fed_dir, 0)[1]
    assert clients["A"].global_manifest(0)["sha256"] == json.loads(manifest_path.read_text())["sha256"]
    m = json.loads(manifest_path.read_text())
    m["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(ff.Rejected, match="bad or missing HMAC"):
        clients["A"].global_manifest(0)


def test_federation_sign_signs_an_older_unsigned_folder(fed):
    from nnunet_adpfl.cli import main
    fed_dir, keys, _, _, _ = fed
    path = fed_dir / ff.FEDERATION_FILE
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "hmacs"}  # as written before signing
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="HMAC"):
        Aggregator(fed_dir, keys)
    assert main(["federation", "sign", str(fed_dir), "--keys-dir", str(keys)]) == 0
    Aggregator(fed_dir, keys, log=lambda *_: None)
