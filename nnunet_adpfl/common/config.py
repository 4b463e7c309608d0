"""Settings for the DP trainers, read from the JSON file named by ``nnUNet_adpfl_config``.

Every key is documented in ``SETTINGS`` (and in docs/reference/settings.md, generated from it). Unknown keys and
bad values raise ``SettingsError`` naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

ENV_VAR = "nnUNet_adpfl_config"


class SettingsError(ValueError):
    """A settings file or value is invalid."""


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: type | tuple
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    requirement: str = ""
    nullable: bool = False


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _seed(v) -> bool:
    return 0 <= v < 2 ** 64  # what torch's generators take


SETTINGS: dict[str, Setting] = {
    "target_epsilon": Setting(8.0, (int, float), "privacy budget epsilon for the whole training run; "
                              "null to use a fixed noise_multiplier without a budget", _positive, "> 0",
                              nullable=True),
    "delta": Setting(1e-5, (int, float), "privacy parameter delta; must be < 1 / number of training cases",
                     lambda v: 0 < v < 1, "in (0, 1)"),
    "noise_multiplier": Setting(None, (int, float), "fixed noise multiplier sigma instead of deriving it from "
                                "target_epsilon (if both are set, training stops when target_epsilon is spent)",
                                _non_negative, ">= 0", nullable=True),
    "max_grad_norm": Setting(1.0, (int, float), "clip norm C: bound on each case's gradient contribution",
                             _positive, "> 0"),
    "expected_batch_size": Setting(None, int, "expected number of cases per step (Poisson sampling, "
                                   "rate = expected_batch_size / number of training cases); null = plan's batch size",
                                   _positive, ">= 1", nullable=True),
    "num_epochs": Setting(None, int, "epochs to train; null = nnU-Net's default (1000)", _positive, ">= 1",
                          nullable=True),
    "num_iterations_per_epoch": Setting(None, int, "DP steps per epoch; null = nnU-Net's default (250)",
                                        _positive, ">= 1", nullable=True),
    "num_val_iterations_per_epoch": Setting(None, int, "validation batches per epoch; null = nnU-Net's default (50)",
                                            _positive, ">= 1", nullable=True),
    "initial_lr": Setting(None, (int, float), "SGD learning rate (federated trainers too); null = nnU-Net's "
                          "default (1e-2)", _positive, "> 0", nullable=True),
    "dp_trainable": Setting("all", str, "parameters the private step trains (fewer = less noise in total): 'all', "
                            "'decoder' (encoder frozen), 'norm_bias' (normalisation affine parameters and biases) or "
                            "'head' (segmentation layers); frozen ones get no noise and are not uploaded. Use with "
                            "public pretrained weights (-pretrained_weights)",
                            lambda v: v in ("all", "decoder", "norm_bias", "head"),
                            "'all', 'decoder', 'norm_bias' or 'head'"),
    "dp_defaults": Setting("auto", str, "what the DP trainers choose where this file leaves expected_batch_size, "
                           "the steps, dp_trainable, momentum or initial_lr out: 'auto' (from N, epsilon, delta, the "
                           "parameter counts and dp_max_case_passes; see docs/EPSILON.md) or 'nnunet' (the plan's "
                           "batch at most N/2, nnU-Net's 1000 x 250 steps, all parameters, momentum 0.9)",
                           lambda v: v in ("auto", "nnunet"), "'auto' or 'nnunet'"),
    "dp_max_case_passes": Setting(None, int, "dp_defaults 'auto': most per-case passes (steps x expected batch) the "
                                  "chosen run may take; null = those of nnU-Net's run for the plan "
                                  "(1000 x 250 x plan's batch)", _positive, ">= 1", nullable=True),
    "augmentation_multiplicity": Setting(1, int, "K: an included case contributes the mean gradient of K "
                                         "independently augmented patches of it, clipped once (still one case: "
                                         "sensitivity unchanged)", _positive, ">= 1"),
    "momentum": Setting(0.9, (int, float), "SGD (Nesterov) momentum of the DP trainers; nnU-Net's 0.99 averages "
                        "noise over ~100 steps and lets stale noisy directions dominate", lambda v: 0 <= v < 1,
                        "in [0, 1)"),
    "ema_decay": Setting(None, (int, float), "DP trainers (single site): exponential moving average of the trained "
                         "weights, the released final model (free post-processing); null = off", lambda v: 0 < v < 1,
                         "in (0, 1)", nullable=True),
    "accountant": Setting("rdp", str, "privacy accountant: 'rdp' or 'prv' (Opacus)",
                          lambda v: v in ("rdp", "prv"), "'rdp' or 'prv'"),
    "gamma": Setting(0.01, (int, float), "Auto-S stability constant: s = C / (n + gamma)", _positive, "> 0"),
    "r": Setting(None, (int, float), "NSGD / PSAC regulariser r; null = rule default (NSGD 0.01, PSAC 0.1)",
                 _positive, "> 0", nullable=True),
    "log_alignment": Setting(False, bool, "log cosine(mean raw gradient, mean clipped gradient) and "
                             "cosine(mean raw gradient, noisy step) per epoch (diagnostic only)"),
    "per_sample_engine": Setting("auto", str, "per-case gradient engine: 'loop' (one case at a time), 'vmap', "
                                 "'hooks' (per-case gradients from one batched pass per chunk), 'ghost' (hooks with "
                                 "book-keeping clipping: ghost norms for low-resolution wide convs) or 'auto' = "
                                 "'ghost' when the trained parameters are on the CPU and every trained layer is a "
                                 "conv, transposed conv or affine InstanceNorm (all of nnU-Net's), else 'loop'; "
                                 "the same at every batch size (docs/BENCHMARKS.md)",
                                 lambda v: v in ("auto", "loop", "vmap", "hooks", "ghost"),
                                 "'auto', 'loop', 'vmap', 'hooks' or 'ghost'"),
    "max_physical_batch_size": Setting("auto", (int, str), "cases per batched pass of the 'vmap', 'hooks' and "
                                       "'ghost' engines (bounds memory; 'loop' does one case at a time). 'auto' = "
                                       "the largest chunk whose estimated memory fits dp_memory_limit_mib and, on "
                                       "CPU, 320 MiB (larger passes cost more per case there): per case, the "
                                       "activations its forward saves (measured once on a data-free patch) plus "
                                       "two copies of its per-case gradient, times 1.4",
                                       lambda v: v == "auto" if isinstance(v, str) else v >= 1,
                                       "'auto' or an integer >= 1"),
    "dp_autocast": Setting("auto", str, "mixed precision of the per-case forward/backward ('loop', 'hooks' and "
                           "'ghost' engines): 'bf16' (bf16 autocast), 'off' (fp32) or 'auto' = bf16 on a CUDA GPU "
                           "with bf16 support (nnU-Net's own GPU step uses AMP), fp32 on CPU and with 'vmap'. Per-case "
                           "gradients, norms, clipping, noise and the optimizer step stay fp32",
                           lambda v: v in ("auto", "bf16", "off"), "'auto', 'bf16' or 'off'"),
    "dp_memory_limit_mib": Setting(None, (int, float), "memory bound of max_physical_batch_size 'auto', in MiB; "
                                   "null = 25% of the RAM available (CPU; 2048 where /proc/meminfo is missing, e.g. "
                                   "macOS) or 50% of the GPU's free memory, read when the first private step starts",
                                   _positive, "> 0", nullable=True),
    "federation_dir": Setting(None, str, "federated trainers: the shared federation folder", lambda v: bool(v),
                              "a path", nullable=True),
    "site_id": Setting(None, str, "federated trainers: this site's name in federation.json", lambda v: bool(v),
                       "a site name", nullable=True),
    "site_key_file": Setting(None, str, "federated trainers: this site's secret key file (from 'federation init')",
                             lambda v: bool(v), "a path", nullable=True),
    "round_wait_timeout_s": Setting(86400.0, (int, float), "federated trainers: how long a site waits for a "
                                    "round's global model before stopping with an error", _positive, "> 0"),
    "num_threads": Setting(None, int, "federated trainers: CPU threads torch may use; null = nnU-Net's choice (all "
                           "cores). Set it when several sites share one machine", _positive, ">= 1", nullable=True),
    "seed": Setting(None, int, "deterministic mode: federated trainers reseed data sampling and augmentation at "
                    "every round from (seed, site, round) (use with nnUNet_n_proc_DA=0); "
                    "nnUNetTrainerBaselineBudget seeds its initialisation and augmentation workers once "
                    "(nnUNet_n_proc_DA 0 or 1)", _seed, ">= 0 and < 2**64", nullable=True),
    "adpfl_noise_schedule": Setting("constant", str, "ADP-FL: noise multiplier schedule over rounds, "
                                    "calibrated to target_epsilon: constant, linear, exponential or step",
                                    lambda v: v in ("constant", "linear", "exponential", "step"),
                                    "'constant', 'linear', 'exponential' or 'step'"),
    "adpfl_schedule_end_ratio": Setting(0.5, (int, float), "ADP-FL: last-round / first-round noise multiplier "
                                        "(linear, exponential)", _positive, "> 0"),
    "adpfl_adaptive_clip": Setting(True, bool, "ADP-FL: track a quantile of per-case gradient norms with the "
                                   "private geometric update (Andrew et al.)"),
    "adpfl_clip_quantile": Setting(0.5, (int, float), "ADP-FL: target quantile of the adaptive clip norm",
                                   lambda v: 0 < v < 1, "in (0, 1)"),
    "adpfl_clip_lr": Setting(None, (int, float), "ADP-FL: learning rate of the geometric clip update; null = 0.2, "
                             "lowered where the count noise would make the clip norm wander by more than a factor "
                             "1.35", _positive, "> 0", nullable=True),
    "adpfl_clip_max_ratio": Setting(1.0, (int, float), "ADP-FL: upper bound of the adaptive clip norm as a multiple "
                                    "of max_grad_norm (1 = never above its start value; null = unbounded, which "
                                    "can diverge)",
                                    lambda v: v >= 1, ">= 1", nullable=True),
    "adpfl_count_noise": Setting(None, (int, float), "ADP-FL: noise multiplier of the unclipped count; null = "
                                 "max(B/20, the value that inflates gradient noise by at most 10%)", _positive,
                                 "> 0", nullable=True),
    "adpfl_step_sparsity": Setting("none", str, "ADP-FL: coordinates the private step updates: "
                                   "topk_prev_global (largest entries of the previous released global update), "
                                   "random (seeded per round) or none",
                                   lambda v: v in ("topk_prev_global", "random", "none"),
                                   "'topk_prev_global', 'random' or 'none'"),
    "adpfl_step_density": Setting(0.25, (int, float), "ADP-FL: fraction k/d of coordinates the private step updates",
                                  lambda v: 0 < v <= 1, "in (0, 1]"),
    "adpfl_upload_density": Setting(None, (int, float), "ADP-FL: fraction of the noisy update's coordinates uploaded "
                                    "(top-k by magnitude; null = dense upload)", lambda v: 0 < v <= 1, "in (0, 1]",
                                    nullable=True),
    "adpfl_error_feedback": Setting(True, bool, "ADP-FL: carry the part of the update not uploaded into the next "
                                    "round"),
    "clipping_rule": Setting(None, str, "clipping rule of the trainers that take it from the settings "
                             "(nnUNetTrainerDPMorph*): 'flat', 'autos', 'nsgd' or 'psac'; null = 'flat'",
                             lambda v: v in ("flat", "autos", "nsgd", "psac"), "'flat', 'autos', 'nsgd' or 'psac'",
                             nullable=True),
    "morph_operation": Setting("both", str, "DP-Morph: operation on the class probabilities: 'open', 'close' or "
                               "'both' (closing after opening); the adaptive trainer chooses per case and class",
                               lambda v: v in ("open", "close", "both"), "'open', 'close' or 'both'"),
    "morph_kernel": Setting(3, int, "DP-Morph: structuring element size in voxels (odd; k x k or k x k x k)",
                            lambda v: v >= 1 and v % 2 == 1, "odd and >= 1"),
    "morph_anisotropic": Setting(False, bool, "DP-Morph: shrink the kernel along coarse axes so it covers about "
                                 "the same physical extent on every axis (from the plan's spacing)"),
    "morph_classes": Setting(None, list, "DP-Morph: outputs to refine: label values (softmax) or region numbers "
                             "counting from 1 (region-based); null = every foreground output",
                             lambda v: all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in v),
                             "a list of integers >= 1", nullable=True),
    "morph_thin_threshold": Setting(0.3, (int, float), "DP-Morph adaptive: a case's class whose probability mass "
                                    "keeps less than this share after one erosion is thin -> closing",
                                    lambda v: 0 <= v <= 1, "in [0, 1]"),
    "morph_thick_threshold": Setting(0.7, (int, float), "DP-Morph adaptive: more than this share -> thick -> "
                                     "opening; in between -> both", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "noise_seed": Setting(None, int, "seed for the noise generator: FOR TESTS ONLY, a known seed makes the "
                          "noise predictable and voids the guarantee; null = seeded from the OS", _seed,
                          ">= 0 and < 2**64", nullable=True),
}


NNUNET_DEFAULTS = {"num_epochs": 1000, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50,
                   "initial_lr": 1e-2}


def apply_run_length(trainer, settings: dict) -> None:
    """Set an nnU-Net trainer's epochs, iterations and learning rate from the settings (nnU-Net's defaults
    where unset)."""
    for key, default in NNUNET_DEFAULTS.items():
        setattr(trainer, key, settings[key] if settings[key] is not None else default)


def explicit_keys(path: str | None = None) -> set[str]:
    """The keys the settings file (``path`` or ``$nnUNet_adpfl_config``) sets; load_settings has checked it."""
    path = _settings_path(path)
    return set(_read_settings_file(path)) if path else set()


def _settings_path(path: str | None) -> str | None:
    """``path`` if given ("" = no file), else ``$nnUNet_adpfl_config``; set but empty there is an error (most likely
    a typo such as ``export nnUNet_adpfl_config=$TYPO``), so a run never falls back to the defaults unnoticed."""
    if path is not None:
        return path
    path = os.environ.get(ENV_VAR)
    if path is not None and not path.strip():
        raise SettingsError(f"${ENV_VAR} is set but empty: name a settings file, or unset it for the defaults")
    return path


def _refuse_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise SettingsError(f"setting(s) {repeated} appear more than once in the settings file")
    return dict(pairs)


def _read_settings_file(path: str) -> dict:
    """The JSON object in ``path``, or a one-line SettingsError (missing, unreadable, not UTF-8, not JSON, repeated
    keys). Non-finite numbers parse here and are refused by ``_validate``, which names their key."""
    where = f"settings file {path!r}" + (f" (from ${ENV_VAR})" if path == os.environ.get(ENV_VAR) else "")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist") from None
    except OSError as e:
        raise SettingsError(f"{where} cannot be read: {e.strerror or e}") from None
    try:
        user = json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except UnicodeDecodeError:
        raise SettingsError(f"{where} is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer literal over 4300 digits
        raise SettingsError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise SettingsError(f"{where} must contain a JSON object")
    return user


def _finite(value: int | float) -> bool:
    """Infinity, NaN, 1e999 and integers too large for a float pass no range check: refused."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _validate(key: str, value: Any) -> Any:
    spec = SETTINGS[key]
    if value is None:
        if spec.nullable or spec.default is None:
            return None
        raise SettingsError(f"setting '{key}' may not be null")
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise SettingsError(f"setting '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise SettingsError(f"setting '{key}' must be {_kind_name(kinds)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _finite(value):
        raise SettingsError(f"setting '{key}' must be a finite number, got {repr(value)[:40]}")
    if not spec.check(value):
        raise SettingsError(f"setting '{key}' must be {spec.requirement}, got {value!r}")
    return float(value) if float in kinds and not isinstance(value, bool) else value


def _kind_name(kinds: tuple) -> str:
    names = ("a number" if k in (int, float) and float in kinds else k.__name__ for k in kinds)
    return " or ".join(dict.fromkeys(names))  # (int, float) is one kind: "a number"


def _did_you_mean(unknown: list[str]) -> str:
    """": did you mean 'noise_multiplier' (not 'noise_multipler')?" for the unknown keys close to a known one."""
    close = {key: difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.6) for key in unknown}
    hints = [f"'{match[0]}' (not '{key}')" for key, match in close.items() if match]
    return f": did you mean {', '.join(hints)}?" if hints else ""


def load_settings(path: str | None = None, overrides: dict | None = None) -> dict:
    """Defaults, updated from the JSON file (``path`` or ``$nnUNet_adpfl_config``) and ``overrides``."""
    path = _settings_path(path)
    user = _read_settings_file(path) if path else {}
    user.update(overrides or {})
    unknown = sorted(set(user) - set(SETTINGS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown} in {path or 'overrides'}{_did_you_mean(unknown)}. "
                            f"Known: {sorted(SETTINGS)}")
    settings = {k: s.default for k, s in SETTINGS.items()}
    settings.update({k: _validate(k, v) for k, v in user.items()})
    if settings["morph_thin_threshold"] > settings["morph_thick_threshold"]:
        raise SettingsError("morph_thin_threshold must be <= morph_thick_threshold")
    if settings["target_epsilon"] is None and settings["noise_multiplier"] is None:
        raise SettingsError("set target_epsilon, noise_multiplier, or both")
    return settings
