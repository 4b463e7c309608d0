"""A plain (non-editable) install ships the trainers folder and nnU-Net finds the trainers in it."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parents[1]
TRAINER_MODULES = {"nnunet_adpfl_dp_trainers.py", "nnunet_adpfl_baseline_trainers.py",
                   "nnunet_adpfl_calibration_trainers.py"}


def test_wheel_ships_trainers_and_nnunet_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("nnunet_adpfl-*.whl"))
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/ext_trainers/" in n}
    assert TRAINER_MODULES <= names
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "nnunet_adpfl"
    missing = [str(f.relative_to(REPO)) for f in package.rglob("*.py") if str(f.relative_to(REPO)) not in shipped]
    assert not missing, f"modules missing from the wheel (pyproject.toml packages?): {missing}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import os, nnunet_adpfl.nnunet.paths as c; p = c.trainers_path(); print(p);"
        "os.environ['nnUNet_extTrainer'] = p;"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
        "print(f('nnUNetTrainerPSAC').__module__, f('nnUNetTrainerBaselineBudget').__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert out[0] == str(target / "nnunet_adpfl" / "ext_trainers")
    assert out[-1] == "nnunet_adpfl_dp_trainers nnunet_adpfl_baseline_trainers"
