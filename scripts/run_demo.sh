#!/usr/bin/env bash
# Set up (if needed) and run the main job: a simulated 3-site federation on synthetic skin-lesion data (2D, 90
# training cases, 10 test cases) that starts from a model pretrained on a public cohort (60 cases) imaged at another
# resolution than the sites (--public-scale 1.0 against the sites' 0.25): a site shift nnU-Net's intensity
# normalisation does not remove, so the public model alone is below what training on the sites' data reaches.
# Stages: aggregate fingerprints -> one federated plan -> public pretraining -> NP-FL, DP-FL and ADP-FL from the
# public weights through the stock nnUNetv2_train (private runs: epsilon 8, dp_trainable norm_bias, clip norm
# measured on the public cohort at no privacy cost) -> prediction of the sites' test cases.
# Prints one row per run (also in work_dirs/demo/results.md, the numbers in work_dirs/demo/results_table.json):
# the public weights alone, standard nnU-Net on the pooled data, NP-FL, DP-FL and ADP-FL with Dice, the share of
# NP-FL's Dice, ADP-FL's share of the DP-FL -> NP-FL gap, the gain kept ((private - public only) /
# (NP-FL - public only): what private training adds over the public model), epsilon, uploads and wall time.
# Extra arguments go to 'nnunet-adpfl fed-compare' (see --help), e.g. --iterations 4 for a quick, rougher run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${NNUNET_ADPFL_VENV:-$HOME/.cache/nnunet-adpfl/venv}"
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]] && [ ! -x "$venv_dir/bin/nnunet-adpfl" ]; then
    # help without the set-up (several GB on a fresh machine): this script's header and where the options are
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
    echo "Options: those of 'nnunet-adpfl fed-compare' (docs/reference/commands.md#fed-compare);"
    echo "'$0 --help' lists them once the environment is set up ($venv_dir)."
    exit 0
  fi
done
venv="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$venv/bin/nnunet-adpfl" fed-compare --work-dir work_dirs/demo --clip public --public-scale 1.0 \
    --private-settings '{"dp_trainable": "norm_bias"}' \
    --runs "standard nnU-Net (all sites' data pooled)" "NP-FL from public weights" "DP-FL from public weights" \
    "ADP-FL (defaults) from public weights" "$@"
