"""Where nnU-Net finds this project's trainers."""
from __future__ import annotations

import importlib.util


def trainers_path() -> str:
    """Folder to put in ``nnUNet_extTrainer`` (the installed ``trainers/``)."""
    spec = importlib.util.find_spec("nnunet_adpfl.ext_trainers")
    return list(spec.submodule_search_locations)[0]
