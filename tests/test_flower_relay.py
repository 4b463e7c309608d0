"""The Flower transport's relay: its checks without Flower, then a 3-site federation of small tensors through a
real SuperLink (TLS, node authentication) on loopback, with a forged node and an unregistered one refused."""
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation import flower_relay as fr
from nnunet_adpfl.federation.aggregator import create_federation, load_site_keys
from nnunet_adpfl.federation.site import SiteClient
from nnunet_adpfl.federation.strategies import FedAvg

pytest.importorskip("flwr")
from nnunet_adpfl.federation.flower_local import FlowerNet  # noqa: E402
from nnunet_adpfl.federation.flower_proxy import nginx_binary  # noqa: E402

SITES = ["A", "B", "C"]
ROUNDS = 2
CASES = {"A": 3, "B": 5, "C": 7}


def coordinator(tmp_path, rounds=ROUNDS):
    fed, keys = tmp_path / "coordinator" / "fed", tmp_path / "coordinator" / "keys"
    cfg = create_federation(fed, keys, SITES, rounds, 1, "dpfl", configuration="2d")
    for name in fr.PLAN_FILES[:2]:
        ff.write_json_atomic(fed / name, {"stand-in": name})
    g0 = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(4), "n": torch.tensor(3)}
    keyring = load_site_keys(keys, SITES)
    ff.write_tensors_with_manifest(*ff.global_paths(fed, 0), g0, {"kind": "global", "federation": cfg["id"],
                                   "round": 0, "strategy": "fedavg", "sites": [], "num_cases": 0},
                                   ff.signed_for_sites(keyring), fed)
    return fed, keys, cfg, keyring, g0


def delta(site, r):
    g = torch.Generator().manual_seed(hash((site, r)) % 1000)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "n": torch.tensor(0)}


def expected_final(g0, rounds=ROUNDS):
    g = g0
    for r in range(1, rounds + 1):
        s = FedAvg()
        s.begin(g)
        for site in sorted(SITES):
            s.add(delta(site, r), CASES[site])
        g = s.finish()
    return g


def test_paths_match_the_folder_protocol(tmp_path):
    assert [str(p.relative_to(tmp_path)) for p in ff.global_paths(tmp_path, 7)] == fr.global_names(7)
    assert [str(p.relative_to(tmp_path)) for p in ff.update_paths(tmp_path, 7, "A")] == fr.update_names(7, "A")
    from nnunet_adpfl.federation.flower_checks import SITE_ID
    assert SITE_ID.pattern == ff.SITE_ID.pattern


def test_site_refuses_unsigned_pushes_and_sends_only_its_own_files(tmp_path):
    fed, keys, cfg, keyring, _ = coordinator(tmp_path)
    site_dir = tmp_path / "site"
    N1, N2, N3, N4, N5 = (f"{i:032x}" for i in range(1, 6))  # nonces
    files = {"federation.json": (fed / "federation.json").read_bytes()}
    with pytest.raises(fr.RelayError, match="valid coordinator HMAC"):
        fr.site_exchange(site_dir, "A", keyring["A"], N1, files, fr.relay_mac(keyring["B"], "push", N1, "A",
                         {"files": {k: fr.sha256(v) for k, v in files.items()}}), None)
    assert not (site_dir / "federation.json").exists()
    ok = fr.relay_mac(keyring["A"], "push", N1, "A", {"files": {k: fr.sha256(v) for k, v in files.items()}})
    with pytest.raises(fr.RelayError, match="valid coordinator HMAC"):  # a MAC is bound to its nonce
        fr.site_exchange(site_dir, "A", keyring["A"], N2, files, ok, None)
    status, _, _ = fr.site_exchange(site_dir, "A", keyring["A"], N1, files, ok, None)
    assert "federation.json" in status["files"]
    evil = {"round_0001/updates/B.json": b"{}"}
    evil_mac = fr.relay_mac(keyring["A"], "push", N3, "A", {"files": {k: fr.sha256(v) for k, v in evil.items()}})
    with pytest.raises(fr.RelayError, match="not a path"):
        fr.site_exchange(site_dir, "A", keyring["A"], N3, evil, evil_mac, None)
    # the reply brings only this site's own files the coordinator lacks
    for name in ("round_0001/updates/B.json", "round_0001/updates/A.json", "round_0002/updates/A.json"):
        (site_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (site_dir / name).write_text("{}")
        (site_dir / name.replace(".json", ".safetensors")).write_bytes(b"x")
    _, sent, _ = fr.site_exchange(site_dir, "A", keyring["A"], N4, {}, None, None)
    assert sent == {}  # the coordinator does not know this node yet
    held = {"updates": [1], "fingerprint": None}
    with pytest.raises(fr.RelayError, match="valid coordinator HMAC"):  # another node's request cannot ask for them
        fr.site_exchange(site_dir, "A", keyring["A"], N5, {}, None, held)
    with pytest.raises(fr.RelayError, match="valid coordinator HMAC"):  # the HMAC covers 'held'
        fr.site_exchange(site_dir, "A", keyring["A"], N5, {}, fr.relay_mac(keyring["A"], "push", N5, "A",
                                                                           fr.push_body({}, None)), held)
    _, sent, _ = fr.site_exchange(site_dir, "A", keyring["A"], N5, {}, fr.relay_mac(keyring["A"], "push", N5, "A",
                                                                                     fr.push_body({}, held)), held)
    assert sorted(sent) == sorted(fr.update_names(2, "A"))


def test_coordinator_refuses_replies_without_the_sites_key(tmp_path):
    fed, keys, cfg, keyring, _ = coordinator(tmp_path)
    relay = fr.Relay(fed, keyring, ROUNDS, log=lambda m: None)
    site_dir = tmp_path / "site_B"
    (site_dir / "round_0001" / "updates").mkdir(parents=True)
    (site_dir / "round_0001" / "updates" / "B.json").write_text("{}")
    request = relay.request(1)
    status, files, _ = fr.site_exchange(site_dir, "B", keyring["B"], request["nonce"], {}, None, None)
    forged = fr.relay_mac(b"x" * 32, "reply", request["nonce"], "B", {"status": status, "files": {}})
    assert relay.handle_reply(1, "B", status, files, forged) == []
    assert "valid HMAC" in relay.refused[1] and 1 not in relay.sites
    # a genuine reply authenticates the node; the files it brings must have been asked for
    request = relay.request(1)
    status, files, mac = fr.site_exchange(site_dir, "B", keyring["B"], request["nonce"], {}, None, None)
    relay.handle_reply(1, "B", status, files, mac)
    assert relay.sites[1] == "B"
    request = relay.request(1)
    assert request["held"] == {"updates": [], "fingerprint": None} and request["push"]  # lacks federation.json, round 0
    foreign = {"round_0001/updates/C.json": b"{}"}  # B, authenticated, sends C's update
    mac = fr.relay_mac(keyring["B"], "reply", request["nonce"], "B", {"status": status,
                       "files": {k: fr.sha256(v) for k, v in foreign.items()}})
    assert relay.handle_reply(1, "B", status, foreign, mac) == []
    assert not (fed / "round_0001" / "updates" / "C.json").exists() and "not its own" in relay.refused[1]


def run_site(local, site, key_file, rounds, errors):
    try:
        client = SiteClient(local, site, key_file, wait_timeout_s=240, poll_interval=0.2, log=lambda m: None)
        for r in range(1, rounds + 1):
            client.wait_global(r - 1)
            client.upload(r, delta(site, r), CASES[site], {"epsilon": 0.5 * r})
        client.wait_global(rounds)
    except BaseException as e:
        errors.append((site, e))


def test_federation_over_flower_with_tls_and_node_auth(tmp_path):
    fed, keys, cfg, keyring, g0 = coordinator(tmp_path)
    net = FlowerNet(tmp_path / "flower", SITES, extra_keys=("mallory", "stranger"))
    net.may_fail.add("forged")  # the unregistered SuperNode must fail
    try:
        net.start_superlink()
        if nginx_binary():  # the nodes connect through the Fleet-only proxy, as the README deploys it
            net.start_proxy()
        for name in [*SITES, "mallory"]:  # mallory: a registered Flower node that does not hold B's site key
            net.register(name)
        local = {s: tmp_path / f"site_{s}" / "fed" for s in SITES}
        for s in SITES:
            shutil.copy(keys / f"{s}.key", tmp_path / f"{s}.key")
            net.start_supernode(s, local[s], tmp_path / f"{s}.key")
        (tmp_path / "wrong.key").write_text(ff.generate_key())
        net.start_supernode("B", tmp_path / "mallory_fed", tmp_path / "wrong.key", node_key="mallory",
                            name="mallory")
        stranger = net.start_supernode("A", tmp_path / "stranger_fed", tmp_path / "A.key", node_key="stranger",
                                       name="forged", max_retries=2)  # holds A's site key, but no registered node key
        run = net.start_relay(fed, keys, poll_interval=0.5, reply_timeout=30, max_wait=400)
        net.wait_for(lambda: all((local[s] / "federation.json").exists() for s in SITES), 240, "federation.json relayed")
        fingerprint = {"kind": "fingerprint", "federation": cfg["id"], "site": "A", "summary": {"num_cases": 3}}
        ff.write_json_atomic(local["A"] / "fingerprints" / "A.json", {**fingerprint, "hmac": ff.mac(keyring["A"],
                                                                                                   fingerprint)})
        errors = []
        threads = [threading.Thread(target=run_site, args=(local[s], s, tmp_path / f"{s}.key", ROUNDS, errors))
                   for s in SITES]
        for t in threads:
            t.start()
        net.wait_for(lambda: run.poll() is not None, 420, "the relay run did not finish")
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert run.returncode == 0, net.log("flwr_run")[-3000:]
        assert stranger.wait(timeout=120) != 0 and "Failed to activate SuperNode" in net.log("forged")
    finally:
        net.close()
    final = ff.read_verified_tensors(ff.global_paths(fed, ROUNDS)[0], ff.read_json(ff.global_paths(fed, ROUNDS)[1]),
                                     None)
    want = expected_final(g0)
    assert all(torch.equal(final[k], want[k]) for k in want)
    for s in SITES:  # each site holds the coordinator's files byte for byte, and the coordinator each site's
        for r in range(ROUNDS + 1):
            for a, b in zip(ff.global_paths(fed, r), ff.global_paths(local[s], r)):
                assert a.read_bytes() == b.read_bytes()
        for r in range(1, ROUNDS + 1):
            for a, b in zip(ff.update_paths(fed, r, s), ff.update_paths(local[s], r, s)):
                assert a.read_bytes() == b.read_bytes()
        assert ff.read_json(ff.global_paths(fed, ROUNDS)[1])["epsilon_by_site"][s] == 0.5 * ROUNDS
    assert (fed / "fingerprints" / "A.json").read_bytes() == (local["A"] / "fingerprints" / "A.json").read_bytes()
    relay_log = (fed / "relay.log").read_text()
    assert "REFUSED" in relay_log and "without a valid HMAC" in relay_log
    assert not (tmp_path / "mallory_fed" / "federation.json").exists()  # the forged node got nothing
    assert not list(fed.glob("round_*/rejections.jsonl"))
    stats = ff.read_json(fed / "relay_stats.json")
    assert stats["sites"] == SITES and stats["bytes_pulled"] > 0 and len(stats["refused_nodes"]) == 1
    if nginx_binary():
        assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in (net.root / "proxy" / "access.log").read_text()


def test_credentials_command_makes_a_ca_a_server_certificate_and_node_keys(tmp_path):
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from nnunet_adpfl.federation.flower_credentials import server_certificate_hosts

    out = tmp_path / "creds"
    cmd = [sys.executable, "-m", "nnunet_adpfl.cli", "flower", "credentials", str(out), "--hosts",
           "coord.example.org,10.0.0.5", "--sites", "A,B"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(server_certificate_hosts(out / "superlink.crt")) >= {"coord.example.org", "10.0.0.5", "127.0.0.1"}
    for secret in ("ca.key", "superlink.key", "sites/A/node.key", "sites/B/node.key"):
        assert (out / secret).stat().st_mode & 0o077 == 0, secret
    a_private = load_ssh_private_key((out / "sites/A/node.key").read_bytes(), None)  # as flower-supernode loads it
    a_public = load_ssh_public_key((out / "sites/A/node.pub").read_bytes())  # as 'flwr supernode register' does
    assert isinstance(a_private, ec.EllipticCurvePrivateKey) and a_private.public_key() == a_public
    assert (out / "sites/A/node.pub").read_bytes() != (out / "sites/B/node.pub").read_bytes()
    before = (out / "ca.crt").read_bytes()
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    assert (out / "ca.crt").read_bytes() == before  # never overwritten


def _serverapp_pids(root):
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"flwr-serverapp" in cmd and str(root).encode() in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow  # ~2 min on 2 busy cores (the default suite has the federation test above)
def test_killed_serverapp_and_aggregator_resume_with_a_new_flwr_run(tmp_path):
    """The ServerApp (relay + aggregator thread) is killed after round 1; 'flwr run' of the same app continues from
    the two folders and the federation ends with the same global model as without the kill."""
    import os
    import signal

    rounds = 3
    fed, keys, cfg, keyring, g0 = coordinator(tmp_path, rounds=rounds)
    net = FlowerNet(tmp_path / "flower", SITES)
    try:
        net.start_superlink()
        local = {s: tmp_path / f"site_{s}" / "fed" for s in SITES}
        for s in SITES:
            net.register(s)
            shutil.copy(keys / f"{s}.key", tmp_path / f"{s}.key")
            net.start_supernode(s, local[s], tmp_path / f"{s}.key")
        net.start_relay(fed, keys, poll_interval=0.5, reply_timeout=30, max_wait=600)
        net.wait_for(lambda: all((local[s] / "federation.json").exists() for s in SITES), 240, "federation.json relayed")
        errors = []
        threads = [threading.Thread(target=run_site, args=(local[s], s, tmp_path / f"{s}.key", rounds, errors))
                   for s in SITES]
        for t in threads:
            t.start()
        net.wait_for(lambda: ff.global_paths(fed, 1)[1].exists(), 300, "round 1 closed")
        pids = _serverapp_pids(net.root)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        net.kill("flwr_run")
        time.sleep(2)
        run = net.start_relay(fed, keys, poll_interval=0.5, reply_timeout=30, max_wait=600)  # the same command
        net.wait_for(lambda: run.poll() is not None, 600, "the second relay run did not finish")
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert run.returncode == 0, net.log("flwr_run")[-3000:]
    finally:
        net.close()
    final = ff.read_verified_tensors(ff.global_paths(fed, rounds)[0], ff.read_json(ff.global_paths(fed, rounds)[1]),
                                     None)
    want = expected_final(g0, rounds)
    assert all(torch.equal(final[k], want[k]) for k in want)
    assert (fed / "relay.log").read_text().count("relay started") == 2
    assert not list(fed.glob("round_*/rejections.jsonl"))
