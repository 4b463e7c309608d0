#!/usr/bin/env bash
# Set up (if needed) and run the main job: synthetic data -> plan -> train (standard + DP) -> predict -> table.
# Extra arguments go to 'nnunet-adpfl demo' (see --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$venv/bin/nnunet-adpfl" demo "$@"
