"""A 3-site DP-FL federation of the stock nnUNetv2_train over Flower (TLS, node authentication, loopback): each
site trains against its local copy of the federation folder, the relay and the aggregator run on the coordinator.
Site B (trainer and SuperNode) is killed during round 2 and restarted with the same commands; in deterministic
mode the federation ends with the same weights, bit for bit, as the uninterrupted shared-folder federation."""
import json
import os
import signal
import time
from datetime import datetime

import pytest
import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.workflows.stages import Layout, bytes_exchanged, new_run, start_site

pytest.importorskip("flwr")
from nnunet_adpfl.federation.flower_local import FlowerNet  # noqa: E402
from test_federation_e2e import (CONFIG, DETERMINISTIC, ITERATIONS, ROUNDS, SITES, assert_sites_hold_global,  # noqa
                                 dpfl_reference, fold, global_tensors, planned)

TRAINER = "nnUNetTrainerDPFL"


def _kill(p) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


def seconds_per_round(fed, rounds) -> float:
    """Mean time between consecutive global models after round 1 (round 1 also holds the start-up)."""
    t = [datetime.fromisoformat(ff.read_json(ff.global_paths(fed, r)[1])["created"]).timestamp()
         for r in range(1, rounds + 1)]
    return (t[-1] - t[0]) / (rounds - 1)


@pytest.mark.slow  # ~13 min on 2 busy cores (planning, the shared-folder reference, 65 s for B's SuperNode to rejoin)
@pytest.mark.timeout(1500)
def test_dpfl_over_flower_with_a_killed_site_ends_like_the_shared_folder(planned, dpfl_reference, tmp_path):
    work, pooled = planned
    lay = Layout(work, SITES, "dpfl_flower")
    new_run(lay, work / "planning", "dpfl", ROUNDS, 1, ITERATIONS, CONFIG, seed=0)
    local = {s: tmp_path / f"site_{s}" / "federation" for s in SITES}  # each site's own copy of the folder
    settings = {s: {**DETERMINISTIC, "federation_dir": str(local[s])} for s in SITES}
    net, trainers = FlowerNet(tmp_path / "flower", SITES), {}
    try:
        net.start_superlink()
        for s in SITES:
            net.register(s)
            net.start_supernode(s, local[s], lay.keys / f"{s}.key")
        run = net.start_relay(lay.fed, lay.keys, poll_interval=0.5, reply_timeout=45, max_wait=1200)
        net.wait_for(lambda: all(ff.global_paths(local[s], 0)[1].exists() for s in SITES), 300,
                     "round 0 relayed to every site")
        trainers = {s: start_site(lay, s, TRAINER, CONFIG, settings[s], n_proc_da="0") for s in SITES}
        # B loaded global model 1, wrote nnU-Net's checkpoint and trains round 2: kill its trainer and SuperNode
        closed, latest = ff.global_paths(local["B"], 1)[1], fold(lay, "B", pooled, TRAINER) / "checkpoint_latest.pth"
        net.procs.update({f"train_{s}": p for s, p in trainers.items()})
        net.wait_for(lambda: closed.exists() and latest.exists() and latest.stat().st_mtime > closed.stat().st_mtime,
                     600, "site B reached round 2")
        _kill(trainers.pop("B"))
        net.procs.pop("train_B")
        net.kill("supernode_B")
        # restarted with the same commands; the SuperLink takes a SuperNode killed without shutdown back only
        # once its heartbeat expired (Flower 1.42: 2 x 30 s), so the SuperNode waits that long
        trainers["B"] = net.procs["train_B"] = start_site(lay, "B", TRAINER, CONFIG, settings["B"], n_proc_da="0")
        time.sleep(65)
        net.start_supernode("B", local["B"], lay.keys / "B.key")
        net.wait_for(lambda: run.poll() is not None and all(p.poll() is not None for p in trainers.values()), 900,
                     "federation over Flower did not finish")
        assert run.returncode == 0, net.log("flwr_run")[-3000:]
        assert all(p.returncode == 0 for p in trainers.values()), {s: p.returncode for s, p in trainers.items()}
    finally:
        for p in trainers.values():
            _kill(p)
        net.close()

    g_ref, g = global_tensors(dpfl_reference, ROUNDS), global_tensors(lay, ROUNDS)
    assert all(torch.equal(g_ref[k], g[k]) for k in g_ref)
    assert_sites_hold_global(lay, pooled, TRAINER, ROUNDS)
    for s in SITES:
        ref = json.loads((fold(dpfl_reference, s, pooled, TRAINER) / "privacy_report.json").read_text())
        got = json.loads((fold(lay, s, pooled, TRAINER) / "privacy_report.json").read_text())
        assert got["steps"] == ref["steps"] == ROUNDS * ITERATIONS  # B: no step counted twice or lost
        assert got["epsilon"] == pytest.approx(ref["epsilon"])
        update = ff.read_json(ff.update_paths(lay.fed, ROUNDS, s)[1])
        assert update["epsilon"] == pytest.approx(got["epsilon"])
    assert not list(lay.fed.glob("round_*/rejections.jsonl"))
    stats = ff.read_json(lay.fed / "relay_stats.json")
    up, down = bytes_exchanged(dpfl_reference.fed)
    measured = {"rounds": ROUNDS, "iterations_per_round": ITERATIONS,
                "shared_folder": {"seconds_per_round": seconds_per_round(dpfl_reference.fed, ROUNDS),
                                  # uploads written once, every global read by every site
                                  "bytes_per_round": (up + down * len(SITES)) / ROUNDS},
                "flower": {"seconds_per_round": seconds_per_round(lay.fed, ROUNDS),
                           "bytes_per_round": (stats["bytes_pushed"] + stats["bytes_pulled"]) / ROUNDS,
                           "messages": stats["messages"], "relay_seconds": stats["seconds"]}}
    (work / "flower_vs_shared_folder.json").write_text(json.dumps(measured, indent=2))
    print("flower vs shared folder:", json.dumps(measured))
