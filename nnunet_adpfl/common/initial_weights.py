"""Which weights a private run started from, for the privacy report (DESIGN.md section 8).

Public pretrained weights are free: they were fixed before training from data outside the private cohort. Weights
fitted on the private cases themselves are not covered by the account, so the report names the initial weights
(file and sha256) and states that they must be public.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from .atomic import write_json_atomic
from .tensors import unique_state

RECORD_NAME = "initial_weights.json"
SEG_LAYERS = ".seg_layers."
PUBLIC_REQUIREMENT = ("the initial weights must be public (trained without this site's private cases); the "
                      "epsilon above does not cover data they were fitted on")


def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """The file given to nnUNetv2_train's -pretrained_weights, if any."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg in ("-pretrained_weights", "--pretrained_weights") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("-pretrained_weights=", "--pretrained_weights=")):
            return arg.split("=", 1)[1]
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over the network's tensors (names, dtypes, shapes, values) in name order."""
    h = hashlib.sha256()
    for name, t in sorted(unique_state(module).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pretrained_origin() -> dict:
    """Origin of a single-site run's start: nnU-Net's -pretrained_weights file, else nnU-Net's random init."""
    path = pretrained_weights_argument()
    if path is None:
        return {"source": "random initialisation (nnU-Net's)"}
    return {"source": "pretrained", "file": os.path.abspath(path), "file_sha256": file_sha256(path),
            "requirement": PUBLIC_REQUIREMENT}


def transfer_segmentation_layers(network: torch.nn.Module, path: str | os.PathLike) -> str:
    """nnU-Net's -pretrained_weights leaves the segmentation layers randomly initialised (for a new label set).
    When the file's have this network's shapes (same labels), load them too: a private run that trains few
    parameters (dp_trainable norm_bias) would otherwise keep a random head. Returns what was done."""
    source = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    state = network.state_dict()
    keys = [k for k in state if SEG_LAYERS in k]
    if not keys or any(k not in source or tuple(source[k].shape) != tuple(state[k].shape) for k in keys):
        return "random (nnU-Net's initialisation: the file's segmentation layers do not fit this network's labels)"
    network.load_state_dict({k: source[k] for k in keys}, strict=False)
    return "transferred from the file (same labels)"


def initial_weights_record(network: torch.nn.Module, output_folder: str, fresh: bool, origin: dict) -> dict:
    """At the first start: ``origin`` plus the sha256 of the network's state now, kept in the output folder; on a
    resumed run: the record of the first start (the network then holds trained weights)."""
    path = os.path.join(output_folder, RECORD_NAME)
    if not fresh and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    record = {**origin, "state_sha256": state_sha256(network)}
    write_json_atomic(path, record)
    return record


def describe_file(path: str | os.PathLike) -> dict:
    """What federation.json records of the coordinator's initial-weights file (checked again before use)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"initial weights {path} not found")
    return {"file": os.path.abspath(path), "sha256": file_sha256(path), "requirement": PUBLIC_REQUIREMENT}


def load_weights_file(record: dict, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``reference`` (a network's unique state) taken from the recorded file: a .safetensors file,
    or an nnU-Net checkpoint (``network_weights``; read with torch.load like nnU-Net's own -pretrained_weights, so it
    must be a trusted file: its sha256 was fixed when the federation was created). Names and shapes must match."""
    path = record["file"]
    if file_sha256(path) != record["sha256"]:
        raise ValueError(f"initial weights {path} changed since the federation was created (sha256 differs)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        source = load_file(path)
    else:
        source = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    missing = sorted(set(reference) - set(source))
    if missing:
        raise ValueError(f"initial weights {path} lack {missing[:3]} ({len(missing)} tensors): not this plan's "
                         "network (pretrain with the federation's plan)")
    wrong = [k for k, v in reference.items() if tuple(source[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"initial weights {path}: shape of {wrong[0]} is {tuple(source[wrong[0]].shape)}, the "
                         f"federation's network has {tuple(reference[wrong[0]].shape)} ({len(wrong)} tensors differ)")
    return {k: source[k].to(v.dtype).clone() for k, v in reference.items()}
