import os

from nnunet_adpfl.cli import trainers_path
from nnunet_adpfl.pipeline import nnunet_env


def test_env_adds_our_trainers_and_keeps_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", f"/site/trainers{os.pathsep}{trainers_path()}")
    env = nnunet_env(tmp_path)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [trainers_path(), "/site/trainers"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert os.path.isdir(env[key]) and env[key].startswith(str(tmp_path))
    monkeypatch.delenv("nnUNet_extTrainer")
    assert nnunet_env(tmp_path)["nnUNet_extTrainer"] == trainers_path()
