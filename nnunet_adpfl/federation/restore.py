"""A closed round's global model is fixed once its manifest carries the aggregator's HMACs: the aggregator never
signs a second, different global for that round (the sites may already have trained on the first). Tensors that
no longer match the signed sha256 (altered, truncated or deleted by a writer of the folder) are rebuilt from the
inputs the signed manifest names and written back only if bit-identical; otherwise the aggregator stops.

FedAvg is deterministic for the same inputs (float64 sums in sorted site order, on the CPU), so a rebuild on the
same software gives the same bytes; anything else (another torch, a changed update) is caught by the sha256."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from . import files as ff


class ClosedRoundAltered(ValueError):
    """A closed round's global cannot be restored bit-for-bit: the aggregator stops rather than sign another."""


def aggregate_signed_sites(fed: Path, r: int, manifest: dict, previous: dict[str, torch.Tensor], federation_id: str,
                           site_keys: dict[str, bytes], strategy) -> dict[str, torch.Tensor]:
    """Global r as the aggregator made it: ``previous`` plus the updates of exactly the sites its signed manifest
    lists (each checked in full again), in sorted order; ``previous`` itself if the round released it unchanged."""
    if "unchanged" in manifest:
        return previous
    sites = manifest.get("sites")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s in site_keys for s in sites):
        raise ff.Rejected(f"the signed manifest lists no known sites ({str(sites)[:80]})")
    spec = ff.tensor_spec(previous)
    strategy.begin(previous)
    for site in sorted(sites):
        try:
            update, delta, trained = ff.read_update(fed, r, site, federation_id, site_keys, spec)
        except ff.Rejected as e:
            raise ff.Rejected(f"update of site {site}: {e.reason}") from None
        strategy.add(delta, update["num_cases"], trained)
    return strategy.finish()


def restore_global(fed: Path, r: int, manifest: dict, rebuild: Callable[[], dict]) -> dict[str, torch.Tensor]:
    """Write ``rebuild()`` as global r's tensor file if its sha256 is the signed one (the signed manifest stays);
    else raise ClosedRoundAltered, naming the round and what to do."""
    tensor_path = ff.global_paths(fed, r)[0]
    try:
        tensors = rebuild()
        data = ff.tensors_to_bytes(tensors)
    except ClosedRoundAltered:
        raise
    except Exception as e:  # noqa: BLE001  (whatever stops the rebuild, the round is not closed again)
        why = f"it cannot be rebuilt ({type(e).__name__}: {str(getattr(e, 'reason', e))[:200]})"
    else:
        if hashlib.sha256(data).hexdigest() == manifest.get("sha256"):
            ff.write_bytes_in(fed, tensor_path, data)
            return tensors
        why = "a rebuild from the inputs its manifest names gives other tensors"
    raise ClosedRoundAltered(
        f"round {r} is closed, but {tensor_path} no longer matches the sha256 in its signed manifest "
        f"({str(manifest.get('sha256'))[:12]}...) and {why}. The aggregator never signs a second global for a "
        f"closed round: restore that file (e.g. from a backup), then start the aggregator again")
