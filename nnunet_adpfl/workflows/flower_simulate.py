"""`nnunet-adpfl simulate --transport flower`: the federation's training stage over Flower on this machine.

The coordinator keeps the run's federation folder (``lay.fed``); each site trains with the stock nnUNetv2_train
against its own local copy (``site_<X>/federation``), which its SuperNode keeps in sync with the coordinator's
through the relay (federation/flower_app.py). SuperLink with TLS and node authentication on loopback; the
credentials, Flower's home and the logs are under ``<work-dir>/flower_<run>/``.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..federation import files as ff
from ..federation.flower_local import FlowerNet
from ..nnunet.pipeline import describe_exits, stop
from .stages import Layout, closed_rounds_logger, start_site


def local_federation_dir(lay, site: str) -> Path:
    return lay.site_root(site) / "federation"


def train_federated_flower(lay: Layout, trainer: str, config: str, settings: dict, rounds: int,
                           timeout_s: float = 6 * 3600, log=print) -> float:
    """Train every site over Flower (each with the stock training command) until the last global model reached
    every site; returns the wall time."""
    start = time.time()
    net = FlowerNet(lay.work / f"flower_{lay.fed.name}", lay.sites)
    trainers = {}
    try:
        net.start_superlink()
        for site in lay.sites:
            net.register(site)
            net.start_supernode(site, local_federation_dir(lay, site), lay.keys / f"{site}.key")
        run = net.start_relay(lay.fed, lay.keys, poll_interval=0.5, reply_timeout=60, max_wait=timeout_s)
        log(f"SuperLink (TLS, node authentication) on 127.0.0.1:{net.port}, {len(lay.sites)} SuperNodes, relay "
            f"started (logs in {net.logs})")
        net.wait_for(lambda: all(ff.global_paths(local_federation_dir(lay, s), 0)[1].exists() for s in lay.sites),
                     600, "the initial model did not reach every site")
        for site in lay.sites:
            trainers[site] = start_site(lay, site, trainer, config,
                                        {**settings, "federation_dir": str(local_federation_dir(lay, site))})
            net.procs[f"train_{site}"] = trainers[site]
        log_closed_rounds = closed_rounds_logger(lay.fed, rounds, start, log)
        while run.poll() is None or any(p.poll() is None for p in trainers.values()):
            failed = {n: p.returncode for n, p in net.procs.items() if p.poll() not in (None, 0)}
            if failed:
                raise RuntimeError(f"{list(failed)} failed ({describe_exits(failed)}); logs in {net.logs} and {lay.logs}")
            if time.time() - start > timeout_s:
                raise TimeoutError(f"the federation over Flower did not finish in {timeout_s:.0f} s")
            log_closed_rounds()
            time.sleep(2)
        if run.returncode != 0:
            raise RuntimeError(f"the relay run failed; see {net.logs / 'flwr_run.log'}")
    finally:
        stop(trainers.values())
        net.close()
    return time.time() - start
