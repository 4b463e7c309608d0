"""DP-Morph for nnU-Net trainers: a mixin that adds the morphological refinement (nnunet_adpfl.morph) to the network
of any DP trainer, in training and in ``nnUNetv2_predict``.

The refinement's configuration is written into the plans (``plans["dp_morph"]``) when the trainer starts. nnU-Net
saves those plans next to the model and the predictor builds the network from them, so prediction applies the
morphology exactly as trained, whatever the settings file says then.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..morphology import morph
from ..common.config import SettingsError, load_settings
from .dp_trainer import nnUNetTrainerDP

PLANS_KEY = "dp_morph"


def morph_config(plans: dict, configuration: str, dataset_json: dict, settings: dict, adaptive: bool) -> dict:
    """The refinement of one trained model: operation per output channel, kernel, output type, thresholds."""
    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    regions = label_manager.has_regions
    n_out = label_manager.num_segmentation_heads
    # output channel -> the number users name it by: label value (softmax) or region number from 1
    names = [c + 1 for c in range(n_out)] if regions else list(range(n_out))
    chosen = set(names[0 if regions else 1:]) if settings["morph_classes"] is None else set(settings["morph_classes"])
    unknown = sorted(chosen - set(names[0 if regions else 1:]))
    if unknown:
        raise SettingsError(f"morph_classes {unknown} are not foreground outputs of this dataset "
                            f"(outputs: {names[0 if regions else 1:]})")
    op = "adaptive" if adaptive else settings["morph_operation"]
    cfg = plans["configurations"][configuration]
    ndim = len(cfg["patch_size"])
    kernel = (morph.anisotropic_kernel(settings["morph_kernel"], cfg["spacing"][-ndim:])
              if settings["morph_anisotropic"] else (settings["morph_kernel"],) * ndim)
    return {"operations": [op if name in chosen else "none" for name in names], "kernel": list(kernel),
            "regions": regions, "thin": settings["morph_thin_threshold"], "thick": settings["morph_thick_threshold"]}


def attach_from_plans(network: torch.nn.Module, plans: dict) -> torch.nn.Module:
    cfg = plans.get(PLANS_KEY)
    if cfg is None:
        raise RuntimeError(f"the plans have no '{PLANS_KEY}' entry: this model was not trained with DP-Morph")
    return morph.attach(network, morph.MorphRefine(cfg["operations"], cfg["kernel"], len(cfg["kernel"]),
                                                   cfg["regions"], cfg["thin"], cfg["thick"]))


class DPMorphMixin:
    """Put before a DP trainer class: ``class T(DPMorphMixin, nnUNetTrainerDP)``. The clipping rule comes from
    the settings (``clipping_rule``)."""
    adaptive_morph = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        settings = load_settings()
        plans = {**plans, PLANS_KEY: morph_config(plans, configuration, dataset_json, settings,
                                                  self.adaptive_morph)}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.print_to_log_file(f"DP-Morph: {plans[PLANS_KEY]}")

    @property
    def clipping_rule(self) -> str:
        return self.dp_settings["clipping_rule"] or "flat"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        network = nnUNetTrainerDP.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                             num_output_channels, enable_deep_supervision)
        return attach_from_plans(network, plans_manager.plans)

    def _report_extra(self) -> dict:
        return {**super()._report_extra(), "dp_morph": self.plans_manager.plans[PLANS_KEY]}
