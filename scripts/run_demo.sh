#!/usr/bin/env bash
# Set up (if needed) and run the main job: a small simulated 3-site federation on synthetic skin-lesion data
# (aggregate fingerprints -> one federated plan -> NP-FL, DP-FL and ADP-FL through the stock nnUNetv2_train ->
# test-set prediction) and a result table: standard nnU-Net, NP-FL, and DP-FL / ADP-FL fine-tuned privately
# (dp_trainable norm_bias, epsilon 8) from weights pretrained on a public cohort, with the clip norm measured on that
# cohort. Extra arguments go to 'nnunet-adpfl fed-compare' (see --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$venv/bin/nnunet-adpfl" fed-compare --work-dir work_dirs/demo --clip public --private-settings '{"dp_trainable": "norm_bias"}' \
    --runs "standard nnU-Net (all sites' data pooled)" NP-FL "DP-FL from public weights" \
    "ADP-FL (defaults) from public weights" "$@"
