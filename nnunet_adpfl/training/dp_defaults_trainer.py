"""How the DP trainers apply dp_defaults' rule (training/dp_defaults.py): the trainer's N, settings and federation
in, the chosen values written into the trainer and logged, the record for the privacy report out."""
from __future__ import annotations

from ..common.config import SettingsError, explicit_keys
from .dp_defaults import (CALIBRATION_CACHE, RULED, Inputs, choose, load_calibrations, save_calibrations,
                          trainable_choice, trainable_counts, unset_batch)


def federation_run(trainer) -> tuple[int, int | None, bool, int] | None:
    """A federated trainer's (epochs = rounds x epochs per round, iterations per epoch fixed by federation.json or
    None, whether the round-0 model is public weights, the fewest updates a round averages: the quorum); None for a
    single-site trainer."""
    if getattr(trainer, "federation_mode", None) is None:
        return None
    cfg = trainer.client.cfg
    return (cfg["rounds"] * cfg["epochs_per_round"], cfg.get("iterations_per_epoch"), bool(cfg.get("initial_weights")),
            cfg["quorum"])


def apply_to_trainer(trainer) -> dict:
    """Chooses what the settings file leaves out and writes it into the trainer (called once its network exists);
    returns the report's record. Federated trainers: the same rule with the site's N, over the federation's rounds x
    epochs per round (the rule chooses the iterations per epoch unless federation.json or the site's settings fix
    them; public weights = the federation's initial weights). 'nnunet' (and a fixed noise_multiplier): today's
    defaults, the plan's batch at most N/2."""
    from ..common.initial_weights import pretrained_weights_argument
    s, given = trainer.dp_settings, explicit_keys()
    n = len(trainer.do_split()[0])
    if s["expected_batch_size"] is not None and s["expected_batch_size"] > n:
        raise SettingsError(f"expected_batch_size {s['expected_batch_size']} exceeds the {n} training cases of "
                            f"fold {trainer.fold}")
    federation = federation_run(trainer)
    if not getattr(trainer, "takes_private_steps", True) and s["dp_defaults"] == "auto":
        pretrained = pretrained_weights_argument() is not None
        chosen = {k: v for k, v in (("dp_trainable", trainable_choice(trainable_counts(trainer.network), pretrained)),
                                    ("expected_batch_size", unset_batch(trainer.batch_size, n)))
                  if k not in given or s[k] is None}
        mode = "auto (no private step: no noise search)"
        start = "public weights" if pretrained else "from scratch"
        why = (f"nothing is trained or released: the private run's dp_trainable ({start}), the plan's batch "
               f"{trainer.batch_size} at most N/2 = {n // 2}")
    elif s["dp_defaults"] == "nnunet" or s["target_epsilon"] is None or s["noise_multiplier"] is not None:
        chosen = {} if s["expected_batch_size"] is not None else {
            "expected_batch_size": unset_batch(trainer.batch_size, n)}
        mode = "nnunet" if federation is None else "nnunet (federated: steps from federation.json)"
        why = f"the plan's batch {trainer.batch_size} at most N/2 = {n // 2}; other settings as given or nnU-Net's"
    else:
        explicit = {k: s[k] for k in given if k in RULED}
        epochs, sites = None, 1
        if federation is not None:
            epochs, fixed_iterations, pretrained, sites = federation
            explicit.pop("num_epochs", None)  # the federation's rounds decide the epochs
            if fixed_iterations:
                explicit["num_iterations_per_epoch"] = fixed_iterations
        else:
            pretrained = pretrained_weights_argument() is not None
        inp = Inputs(n, s["target_epsilon"], s["delta"], trainable_counts(trainer.network), pretrained,
                     trainer.batch_size, s["dp_max_case_passes"], s["accountant"], epochs,
                     clip_given="max_grad_norm" in given,
                     spatial_dims=len(trainer.configuration_manager.patch_size), sites=sites)
        reused = load_calibrations(trainer.output_folder)
        try:
            chosen, _, why = choose(inp, explicit)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        save_calibrations(trainer.output_folder)
        why += f"; {reused} calibrations reused from {CALIBRATION_CACHE}" if reused else ""
        mode = "auto" if federation is None else f"auto (federated: site {trainer.client.site})"
    for key, value in chosen.items():
        if key in ("num_epochs", "num_iterations_per_epoch", "initial_lr"):
            setattr(trainer, key, value)
        else:
            s[key] = value
    trainer.print_to_log_file(f"DP defaults ({mode}): chose {chosen or 'nothing'}; {why}")
    return {"mode": mode, "chosen": chosen, "why": why}
