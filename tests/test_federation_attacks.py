"""Attacks on the shared folder (issue 35, items 1-7), each tried as an attacker would, on tiny tensors: a writer of
the folder without a key, and a key-holding site. Each is refused with a logged reason; nothing outside the folder
is touched; the aggregator and the sites keep running."""
import json
import os
import threading
import time

import pytest
import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import Aggregator, create_federation
from nnunet_adpfl.federation.site import SiteClient

SITES = ["A", "B", "C"]
QUIET = dict(poll_interval=0.01, log=lambda *_: None)


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "count": torch.tensor(5)}


def delta(seed, scale=1.0):
    d = model(seed)
    return {"w": d["w"] * scale, "b": d["b"] * scale, "count": torch.tensor(0)}


def make(tmp_path, rounds=2, timeout=0.0, quorum=1, sites=SITES):
    fed, keys = tmp_path / "fed", tmp_path / "keys"
    create_federation(fed, keys, sites, rounds=rounds, epochs_per_round=1, mode="npfl", round_timeout_s=timeout,
                      quorum=quorum)
    agg = Aggregator(fed, keys, **QUIET)
    agg._write_global(0, model(), {"sites": [], "num_cases": 0})
    clients = {s: SiteClient(fed, s, keys / f"{s}.key", wait_timeout_s=0.3, poll_interval=0.01) for s in sites}
    return fed, keys, agg, clients


def rejections(fed, r):
    path = ff.round_dir(fed, r) / "rejections.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def in_thread(fn, timeout=20.0):
    """fn() in a thread: its result, its exception re-raised, or a failure if it is still running (a hang)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hangs"
    if "error" in out:
        raise out["error"]
    return out["value"]


def upload_all(clients, r, seed=0, cases=3):
    for i, s in enumerate(sorted(clients)):
        clients[s].upload(r, delta(seed + i), cases, None)


def honest_global(g, r_deltas):
    return {k: g[k] + sum(d[k] for d in r_deltas) / len(r_deltas) for k in ("w", "b")}


# ---- 1. a restarted aggregator trusts only globals that carry its HMACs --------------------------------------
def _forge_global(fed, r, tensors, like_round=1):
    """A keyless writer's global: right sha256 and size, the HMACs of another round (or none)."""
    tensor_path, manifest_path = ff.global_paths(fed, r)
    data = ff.tensors_to_bytes(tensors)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensor_path.write_bytes(data)
    manifest = json.loads(ff.global_paths(fed, like_round)[1].read_text())
    import hashlib
    manifest.update(round=r, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest_path.write_text(json.dumps(manifest))


def test_restart_does_not_build_on_a_swapped_global(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    upload_all(clients, 1, seed=10)
    agg.run(max_rounds=1)
    expected1 = clients["A"].wait_global(1)
    _forge_global(fed, 1, {"w": torch.full((4, 3), 7.0), "b": torch.full((3,), 7.0), "count": torch.tensor(5)})
    upload_all(clients, 2, seed=20)
    assert in_thread(Aggregator(fed, keys, **QUIET).run) == 2  # restarted: round 1 is closed again first
    assert "aggregator's HMACs" in rejections(fed, 1)[0]["reason"]
    got = clients["B"].wait_global(2)
    want = honest_global(expected1, [delta(20 + i) for i in range(3)])
    torch.testing.assert_close(got["w"], want["w"])


def test_restart_does_not_skip_a_round_with_a_fake_global(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    upload_all(clients, 1, seed=10)
    agg.run(max_rounds=1)
    upload_all(clients, 2, seed=20)
    _forge_global(fed, 2, model(3))  # planted while round 2 is open
    assert in_thread(Aggregator(fed, keys, **QUIET).run) == 2
    got = clients["C"].wait_global(2)  # the aggregator's own global of round 2, not the planted one
    want = honest_global(clients["C"].wait_global(1), [delta(20 + i) for i in range(3)])
    torch.testing.assert_close(got["b"], want["b"])


# ---- 2. federation.json is authenticated; site ids and key paths are checked at every load --------------------
def test_a_site_added_to_federation_json_is_refused(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    evil_key = fed / "evil.key"
    evil_key.write_text("11" * 32)
    path = fed / ff.FEDERATION_FILE
    cfg = json.loads(path.read_text())
    evil = str(evil_key)[:-len(".key")]  # the aggregator loads keys_dir / f"{site}.key": an absolute path wins
    path.write_text(json.dumps({**cfg, "sites": [*cfg["sites"], evil]}))
    with pytest.raises(ValueError, match="site id"):
        Aggregator(fed, keys, **QUIET)
    path.write_text(json.dumps({**cfg, "sites": [*cfg["sites"], "Z"]}))  # a site with no key: refused, named
    with pytest.raises(ValueError, match="names a site whose key is not in"):
        Aggregator(fed, keys, **QUIET)
    path.write_text(json.dumps({**cfg, "rounds": 99}))  # any change: refused by the aggregator and every site
    with pytest.raises(ValueError, match="HMAC"):
        Aggregator(fed, keys, **QUIET)
    with pytest.raises(Exception, match="HMAC of site A"):
        SiteClient(fed, "A", keys / "A.key")
    with pytest.raises(ValueError, match="site id"):
        ff.update_paths(fed, 1, "../../elsewhere")


def test_a_changed_plan_file_is_refused(tmp_path):
    from nnunet_adpfl.federation.federation_file import open_federation, read_plan_files, sign_plan, write_plan_files
    fed, keys, agg, clients = make(tmp_path)
    written = write_plan_files(fed, {"nnUNetPlans.json": b'{"plans_name": "nnUNetPlans"}', "dataset.json": b"{}",
                                     "dataset_fingerprint.json": b"{}"})
    sign_plan(fed, keys, "0" * 64, written)
    cfg, _ = open_federation(fed, keys)
    assert read_plan_files(fed, cfg)["nnUNetPlans.json"] == {"plans_name": "nnUNetPlans"}
    (fed / "plans" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "evil": 1}}))
    with pytest.raises(ValueError, match="differs from the plan the coordinator signed"):
        read_plan_files(fed, cfg)


# ---- 3. no symlink is followed, nothing is written outside the folder ------------------------------------------
def test_a_symlinked_round_folder_is_not_written_through(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, ff.round_dir(fed, 1))
    upload_all(clients, 1)  # the sites' uploads replace the link by a real folder
    in_thread(lambda: agg.run_round(1))
    assert list(outside.iterdir()) == []
    assert not ff.round_dir(fed, 1).is_symlink() and ff.global_paths(fed, 1)[1].is_file()


def test_rejections_jsonl_as_a_symlink_to_a_key_file_is_not_appended_to(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    key_before = (keys / "A.key").read_bytes()
    log = ff.round_dir(fed, 1) / "rejections.jsonl"
    log.parent.mkdir(parents=True)
    os.symlink(keys / "A.key", log)
    clients["B"].upload(1, delta(1), 3, None)
    (ff.round_dir(fed, 1) / "updates" / "$(touch pwned).json").write_text("{}")  # a stray: logged, with its name
    in_thread(lambda: agg.run_round(1))
    assert (keys / "A.key").read_bytes() == key_before
    assert not log.is_symlink() and "unknown site" in rejections(fed, 1)[0]["reason"]


def test_rejections_jsonl_as_a_hardlink_to_a_file_outside_is_not_appended_to(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    outside = tmp_path / "victim.txt"
    outside.write_text("precious\n")
    log = ff.round_dir(fed, 1) / "rejections.jsonl"
    log.parent.mkdir(parents=True)
    os.link(outside, log)
    (ff.round_dir(fed, 1) / "updates").mkdir()
    (ff.round_dir(fed, 1) / "updates" / "$(touch pwned).json").write_text("{}")  # a stray: logged, with its name
    agg._judge_strays(1)
    assert outside.read_text() == "precious\n"
    assert os.stat(log).st_nlink == 1 and "unknown site" in rejections(fed, 1)[0]["reason"]


# ---- 4. malformed files are rejected with a reason, never a crash, a hang or an unbounded read -----------------
def _signed_manifest(fed, keys, site, r, **fields):
    manifest = {"kind": "update", "federation": json.loads((fed / ff.FEDERATION_FILE).read_text())["id"],
                "site": site, "round": r, "num_cases": 3, "file": f"{site}.safetensors", "sha256": "0" * 64,
                "bytes": 10, **fields}
    manifest["hmac"] = ff.mac(ff.load_key(keys / f"{site}.key"), manifest)
    return manifest


def _malformed(how, fed, keys):
    tensor_path, manifest_path = ff.update_paths(fed, 1, "A")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    if how == "NaN":
        manifest_path.write_text('{"kind": "update", "num_cases": NaN, "hmac": "00"}')
    elif how == "1e999":
        manifest_path.write_text('{"kind": "update", "epsilon": 1e999, "hmac": "00"}')
    elif how == "deep":
        manifest_path.write_text("[" * 100000 + "]" * 100000)
    elif how == "directory":
        manifest_path.mkdir()
    elif how == "FIFO":
        os.mkfifo(manifest_path)
    elif how == "sparse tensor file":
        manifest_path.write_text(json.dumps(_signed_manifest(fed, keys, "A", 1, bytes=100 << 30)))
        with open(tensor_path, "wb") as f:
            f.truncate(200 << 20)
    elif how == "tensor file links to /dev/zero":
        manifest_path.write_text(json.dumps(_signed_manifest(fed, keys, "A", 1, bytes=1000)))
        os.symlink("/dev/zero", tensor_path)


MALFORMED = {"NaN": "not allowed", "1e999": "not finite", "deep": "nested deeper", "directory": "not a regular file",
             "FIFO": "not a regular file", "sparse tensor file": "more than the",
             "tensor file links to /dev/zero": "truncated or altered"}


@pytest.mark.parametrize("how", MALFORMED)
def test_malformed_files_are_rejected_and_the_round_closes(tmp_path, how):
    fed, keys, agg, clients = make(tmp_path)
    _malformed(how, fed, keys)
    clients["B"].upload(1, delta(2), 4, None)
    manifest = in_thread(lambda: agg.run_round(1))
    assert manifest["sites"] == ["B"]
    reasons = [r["reason"] for r in rejections(fed, 1) if r["site"] == "A"]
    assert reasons and MALFORMED[how] in reasons[0], reasons
    in_thread(lambda: Aggregator(fed, keys, **QUIET).last_completed_round())  # a restart is not stopped either


@pytest.mark.parametrize("content", ["{broken", "[" * 50000 + "]" * 50000, '{"hmacs": [1], "round": NaN}', "[]"])
def test_a_site_refuses_a_malformed_global_and_keeps_waiting(tmp_path, content):
    fed, keys, agg, clients = make(tmp_path)
    manifest_path = ff.global_paths(fed, 1)[1]
    manifest_path.parent.mkdir(parents=True)
    manifest_path.write_text(content)
    with pytest.raises(TimeoutError, match="refused"):
        in_thread(lambda: clients["A"].wait_global(1))


# ---- 5. opened.json counts only with the aggregator's HMACs ------------------------------------------------------
def test_a_planted_opened_json_does_not_close_the_round_early(tmp_path):
    fed, keys, agg, clients = make(tmp_path, timeout=3600.0, quorum=2)
    opened = ff.round_dir(fed, 1) / "opened.json"
    opened.parent.mkdir(parents=True)
    opened.write_text('{"opened": 0}')
    clients["A"].upload(1, delta(1), 3, None)
    clients["B"].upload(1, delta(2), 3, None)
    result = {}
    thread = threading.Thread(target=lambda: result.update(m=agg.run_round(1)), daemon=True)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and "m" not in result  # a quorum is there, but the hour has not passed
    clients["C"].upload(1, delta(3), 3, None)
    thread.join(10)
    assert result["m"]["sites"] == SITES
    assert any(r["site"] == "opened.json" for r in rejections(fed, 1))


def test_a_malformed_opened_json_does_not_stop_a_restart(tmp_path):
    fed, keys, agg, clients = make(tmp_path, rounds=1)
    opened = ff.round_dir(fed, 1) / "opened.json"
    opened.parent.mkdir(parents=True)
    opened.write_text('{"opened": "x"}')
    upload_all(clients, 1)
    assert in_thread(Aggregator(fed, keys, **QUIET).run) == 1


# ---- 6. the aggregator never signs a global that fails its own checks -------------------------------------------
def test_huge_updates_of_a_key_holder_never_make_a_non_finite_global(tmp_path):
    fed, keys, agg, clients = make(tmp_path, rounds=2)
    huge = torch.finfo(torch.float32).max
    for r in (1, 2):
        clients["A"].upload(r, delta(r), 3, None)
        clients["B"].upload(r, delta(r + 5), 3, None)
        clients["C"].upload(r, {"w": torch.full((4, 3), huge), "b": torch.full((3,), huge),
                                "count": torch.tensor(0)}, 10 ** 9, None)
    assert in_thread(agg.run) == 2
    for r in (1, 2):
        assert clients["A"].wait_global(r)["w"].isfinite().all()  # signed, finite, accepted by every site
        assert "exceeds 10 x the median" in rejections(fed, r)[0]["reason"]


def test_a_non_finite_aggregate_is_not_signed(tmp_path):
    fed, keys, agg, clients = make(tmp_path, rounds=2, sites=["A"])
    huge = {"w": torch.full((4, 3), torch.finfo(torch.float32).max), "b": torch.zeros(3), "count": torch.tensor(0)}
    for r in (1, 2):
        clients["A"].upload(r, huge, 3, None)
    assert in_thread(agg.run) == 2
    g1, g2 = clients["A"].wait_global(1), clients["A"].wait_global(2)
    assert torch.equal(g1["w"], g2["w"])  # round 2 released the previous global unchanged
    assert "not finite" in rejections(fed, 2)[0]["reason"]


def _nested(depth):
    value = 0.5
    for _ in range(depth):
        value = [value]
    return value


KEY_HOLDER_FIELDS = {"deep epsilon": ({"epsilon": _nested(31)}, 3, "epsilon"),
                     "huge epsilon": ({"epsilon": "x" * (ff.MAX_MANIFEST_BYTES - 450)}, 3, "epsilon"),  # global > 4 MiB
                     "negative epsilon": ({"epsilon": -1.0}, 3, "epsilon"),
                     "40-digit num_cases": (None, 10 ** 40 - 1, "num_cases")}


@pytest.mark.parametrize("how", KEY_HOLDER_FIELDS)
def test_a_key_holder_cannot_make_the_global_unreadable(tmp_path, how):
    """Fields of an update that the global copies (epsilon, the sum of num_cases) are checked: a global the sites
    would refuse (too deep, too large, a 41-digit integer) is never signed."""
    fed, keys, agg, clients = make(tmp_path, rounds=1, sites=["A", "B"])
    privacy, cases, field = KEY_HOLDER_FIELDS[how]
    clients["A"].upload(1, delta(1), cases, privacy)
    clients["B"].upload(1, delta(2), 3, {"epsilon": 2})
    assert in_thread(lambda: agg.run(max_rounds=1)) == 1
    clients["B"].wait_global(1)  # readable by every site
    assert repr(clients["B"].global_manifest(1)["epsilon_by_site"]) == "{'B': 2.0}"  # only a float is copied
    assert field in rejections(fed, 1)[0]["reason"]
    assert in_thread(Aggregator(fed, keys, **QUIET).last_completed_round) == 1


def test_a_global_its_readers_would_refuse_is_never_written(tmp_path):
    fed, keys, agg, clients = make(tmp_path)
    with pytest.raises(ValueError, match="readers would refuse"):
        agg._write_global(1, model(), {"sites": ["A"], "epsilon_by_site": {"A": _nested(40)}})
    assert not ff.round_dir(fed, 1).exists()


def test_a_round_whose_global_keeps_being_refused_is_closed_again_after_a_pause(tmp_path, monkeypatch):
    fed, keys, agg, clients = make(tmp_path, rounds=2, sites=["A", "B"])
    for r in (1, 2):
        upload_all(clients, r, seed=10 * r)
    refusing, real, out = threading.Event(), ff.own_global_manifest, {}
    refusing.set()

    def own_global_manifest(fed_dir, r, *args):
        if r == 1 and refusing.is_set():
            raise ff.Rejected("global model of round 1 refused (test)")
        return real(fed_dir, r, *args)

    monkeypatch.setattr(ff, "own_global_manifest", own_global_manifest)
    thread = threading.Thread(target=lambda: out.update(r=agg.run()), daemon=True)
    thread.start()
    time.sleep(1.0)
    refusing.clear()
    thread.join(20)
    assert out.get("r") == 2
    assert 1 <= len([x for x in rejections(fed, 1) if x["site"] == "global"]) < 12  # not hundreds a second


def test_a_subset_update_with_no_float_tensor_is_refused_and_the_round_closes(tmp_path):
    fed, keys, agg, clients = make(tmp_path, rounds=1, sites=["A", "B"])
    clients["A"].upload(1, {"count": torch.tensor(0)}, 3, {"subset": True})  # norm 0: the lower median
    clients["B"].upload(1, delta(2), 3, None)
    assert in_thread(agg.run) == 1
    assert clients["B"].global_manifest(1)["sites"] == ["B"]
    assert "no float tensor" in rejections(fed, 1)[0]["reason"]


def test_a_round_with_nothing_to_aggregate_goes_back_to_waiting(tmp_path, monkeypatch):
    fed, keys, agg, clients = make(tmp_path, sites=["A", "B"])
    upload_all(clients, 1)
    previous = ff.read_own_global(fed, 0, agg.cfg["id"], agg.keys)
    spec, accepted, norms = ff.tensor_spec(previous), {}, {}
    agg._judge(1, spec, accepted, norms, {})

    def finish():
        raise ValueError("no update to aggregate")

    monkeypatch.setattr(agg.strategy, "finish", finish)
    assert agg._close(1, previous, spec, accepted, norms) is None and accepted == {}
    assert "nothing to aggregate" in rejections(fed, 1)[0]["reason"]


# ---- 7. install-plan writes only inside the dataset's preprocessed folder ----------------------------------------
def test_install_plan_never_writes_where_plans_name_points(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from nnunet_adpfl.federation.commands import cmd_install_plan
    from nnunet_adpfl.federation.plan import plans_digest
    fed, keys, agg, clients = make(tmp_path)
    raw, pre = tmp_path / "raw" / "Dataset501_X", tmp_path / "pre"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    private = tmp_path / "site_private" / "settings.json"
    private.parent.mkdir()
    private.write_text("{}")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    plans = {"plans_name": "../../site_private/settings", "foreground_intensity_properties_per_channel": {"0": {}}}
    for name, content in (("nnUNetPlans.json", plans), ("dataset.json", {}), ("dataset_fingerprint.json", {})):
        (fed / "plans").mkdir(exist_ok=True)
        (fed / "plans" / name).write_text(json.dumps(content))
    federation = fed / ff.FEDERATION_FILE  # a keyless writer's plan, with the digest a site would check
    federation.write_text(json.dumps({**json.loads(federation.read_text()), "plans_sha256": plans_digest(plans)}))
    with pytest.raises(SystemExit, match="HMAC"):
        cmd_install_plan(SimpleNamespace(federation_dir=str(fed), dataset_id=501, site="A", key_file=keys / "A.key"))
    with pytest.raises(SystemExit, match="error"):  # unauthenticated: the plan files must still match plan_files
        cmd_install_plan(SimpleNamespace(federation_dir=str(fed), dataset_id=501, site=None, key_file=None))
    from nnunet_adpfl.federation.plan import install_plans  # even a signed plan may not name a path
    with pytest.raises(ValueError, match="plans_name"):
        install_plans(plans, pre / "Dataset501_X", "Dataset501_X", dataset_json={"channel_names": {"0": "CT"}},
                      fingerprint={})
    assert private.read_text() == "{}"
