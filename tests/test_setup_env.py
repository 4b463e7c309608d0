"""scripts/setup_env.sh prints exactly the venv path on stdout (callers capture it), whatever pip prints.

A stand-in interpreter plays python/venv/pip: it writes to stdout like pip does and records what was asked,
so every path through the script (fresh venv, torch missing, torch present) runs in a second, without downloads.
"""
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[1]

STUB = r"""#!/usr/bin/env bash
# Stand-in for python: '-m venv DIR' makes DIR/bin/python (this stub); '-m pip' talks on stdout like pip;
# '-c CODE' succeeds only once torch "is installed" and prints on stdout like the script's version line.
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; chmod +x "$3/bin/python"; echo "venv $3"; exit 0
fi
if [ "$1 $2" = "-m pip" ]; then
  echo "Looking in indexes: https://pypi.org/simple"; echo "Successfully installed something"
  echo "pip $*" >> "$here/calls.log"
  case "$*" in *torchvision*) touch "$here/torch_installed";; esac
  exit 0
fi
if [ "$1" = "-c" ]; then
  [ -e "$here/torch_installed" ] || exit 1
  echo "[setup] torch 0.0 | torchvision 0.0 | nnunetv2 ok | opacus 0.0"; exit 0
fi
exit 2
"""


def run_setup(tmp_path, venv):
    fake = tmp_path / "fakebin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(STUB)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "NNUNET_ADPFL_VENV": str(venv), "PYTHON": str(fake)}
    return subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], env=env, capture_output=True,
                          text=True, timeout=60, check=True)


def test_stdout_is_the_venv_path_alone_on_every_path(tmp_path):
    venv = tmp_path / "new venv"
    fresh = run_setup(tmp_path, venv)  # no venv: created, torch installed, project installed
    assert fresh.stdout == f"{venv}\n"
    assert "Looking in indexes" in fresh.stderr
    calls = (venv / "calls.log").read_text()
    assert "torchvision" in calls and "-e" in calls

    (venv / "torch_installed").unlink()  # venv there, torch missing
    (venv / "calls.log").unlink()
    missing = run_setup(tmp_path, venv)
    assert missing.stdout == f"{venv}\n"
    assert "torchvision" in (venv / "calls.log").read_text()

    (venv / "calls.log").unlink()  # torch present: only the project install
    present = run_setup(tmp_path, venv)
    assert present.stdout == f"{venv}\n"
    assert "torchvision" not in (venv / "calls.log").read_text()


def test_main_job_help_on_a_fresh_machine_installs_nothing(tmp_path):
    venv = tmp_path / "no venv yet"
    env = {**os.environ, "NNUNET_ADPFL_VENV": str(venv), "PYTHON": str(tmp_path / "no-python")}
    out = subprocess.run(["bash", str(REPO / "scripts" / "run_demo.sh"), "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "main job" in out.stdout and "fed-compare" in out.stdout
    assert not venv.exists()
