#!/usr/bin/env bash
# Prepare the Python environment for nnunet-adpfl (idempotent; fast when already done).
# Venv: $NNUNET_ADPFL_VENV (default ~/.cache/nnunet-adpfl/venv).
# Stdout carries exactly one line, the venv path (callers capture it); everything else goes to stderr.
set -euo pipefail
exec 3>&1 1>&2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNET_ADPFL_VENV:-$HOME/.cache/nnunet-adpfl/venv}"
python="${PYTHON:-python3}"
say() { echo "[setup] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip wheel setuptools
fi
pip=("$venv/bin/python" -m pip)
torch_ok() { "$venv/bin/python" -c "import torch, torchvision; torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)" 2>/dev/null; }

if ! torch_ok; then
  # torch and torchvision as one matched pair from the package index (a CUDA build; it runs on CPU too).
  # The CPU-only torch 2.13.0 wheel some machines keep in find-links has no matching torchvision, and
  # nnU-Net's trainer lookup imports timm -> torchvision, so every '-tr <custom trainer>' would fail with it.
  say "installing torch + torchvision (several GB on first install; cached afterwards)"
  "${pip[@]}" install "torch!=2.13.0+cpu" torchvision
fi
say "installing nnunet-adpfl (editable) with test dependencies and the Flower transport"
"${pip[@]}" install -q -e "$repo[test,flower]"
if ! torch_ok; then
  say "ERROR: 'import torchvision' (with its compiled ops) fails in $venv; reinstall a matching torch/torchvision pair"
  exit 1
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  # nginx: the Flower transport's Fleet-only proxy (docs/FLOWER.md). Installed here only where installing starts
  # no service (a container whose policy-rc.d denies it), so that setting up never starts a web server on :80.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -x /usr/sbin/policy-rc.d ]; then
    say "installing nginx (the Flower transport's proxy)"
    apt_nginx() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx >&2; }
    # a fresh machine's package lists may be empty or stale: update them once if the first try fails
    apt_nginx || { apt-get update -q >&2 && apt_nginx; } \
      || say "WARNING: nginx not installed; the Flower proxy test will be skipped"
  else
    say "nginx not found: 'apt-get install nginx' for the Flower transport's proxy (its test is skipped without it)"
  fi
fi
"$venv/bin/python" -c "import torch, torchvision, nnunetv2, opacus; print('[setup] torch', torch.__version__, '| torchvision', torchvision.__version__, '| nnunetv2 ok | opacus', opacus.__version__)"
echo "$venv" >&3
