import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_adpfl.nnunet.paths import trainers_path
from nnunet_adpfl.nnunet.pipeline import nnunet_env, run


def test_env_adds_our_trainers_and_keeps_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", f"/site/trainers{os.pathsep}{trainers_path()}")
    env = nnunet_env(tmp_path)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [trainers_path(), "/site/trainers"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert os.path.isdir(env[key]) and env[key].startswith(str(tmp_path))
    monkeypatch.delenv("nnUNet_extTrainer")
    assert nnunet_env(tmp_path)["nnUNet_extTrainer"] == trainers_path()



def test_simulated_sites_share_the_cores_for_nnunets_workers(tmp_path, monkeypatch):
    """3 sites on 2 cores: 1 validation/export worker each, not 2 (twice the time); the user's setting wins."""
    from nnunet_adpfl.workflows.stages import Layout
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    lay = Layout(tmp_path, ["A", "B", "C"])
    assert lay.site_env("A")["nnUNet_def_n_proc"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert lay.site_env("A")["nnUNet_def_n_proc"] == "4"
    assert Layout(tmp_path, ["A", "B"]).site_env("A")["nnUNet_def_n_proc"] == "4"
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert Layout(tmp_path, ["A", "B"]).site_env("A")["nnUNet_def_n_proc"] == "3"
    monkeypatch.setenv("nnUNet_def_n_proc", "3")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert lay.site_env("A")["nnUNet_def_n_proc"] == "3"
    assert nnunet_env(tmp_path)["nnUNet_def_n_proc"] == "3"

def _terminate_and_check_children_stop(tmp_path, script: str, argv: tuple = ()) -> None:
    """Run ``script`` (Python) whose first nnU-Net command hangs, SIGTERM it, and check that it exits through our
    handler and that the command's whole process group is gone."""
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    hang_command = ['bash', '-c', f'echo $$ > {pid_file}; sleep 120 & sleep 120']
    hang = ("import os, nnunet_adpfl.nnunet.pipeline as pipeline\n"  # run, and run_together (the sites at once)
            "_run, _together = pipeline.run, pipeline.run_together\n"
            f"pipeline.run = lambda args, env, *a, **k: _run({hang_command!r}, dict(os.environ))\n"
            f"pipeline.run_together = lambda jobs: _together({{'A': ({hang_command!r}, dict(os.environ), "
            f"{str(tmp_path / 'A.log')!r})}})\n")
    parent = subprocess.Popen([sys.executable, "-c", hang + script, *argv], cwd=tmp_path)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.1)
    group = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while alive := subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split():
        assert time.time() < deadline, f"left running: {alive}"
        time.sleep(0.2)


def test_terminated_command_stops_its_children(tmp_path):
    """SIGTERM to a running ``nnunet-adpfl`` command stops the nnU-Net command it runs, workers included."""
    _terminate_and_check_children_stop(tmp_path, "from nnunet_adpfl.cli import install_sigterm_handler\n"
                                                 "install_sigterm_handler(); pipeline.run(['x'], {})")


@pytest.mark.parametrize("script, argv", [
    ("morph_experiment.py", ("--tasks", "skin", "--num-cases", "4", "--num-test-cases", "1")),
    ("adpfl_experiment.py", ("--tasks", "skin", "--num-cases", "6", "--num-test-cases", "1")),
])
def test_terminated_experiment_script_stops_its_training(tmp_path, script, argv):
    """A scheduler's SIGTERM to an experiment script must not leave its nnU-Net training running as an orphan."""
    path = Path(__file__).resolve().parents[1] / "scripts" / script
    _terminate_and_check_children_stop(
        tmp_path, f"import runpy; runpy.run_path({str(path)!r}, run_name='__main__')",
        ("--work-dir", str(tmp_path / "work"), *argv))


def _report_sigterm_action(queue) -> None:
    import signal
    queue.put(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)


def test_forked_workers_get_the_default_sigterm_action():
    """nnU-Net's pools fork the CLI process. With our unwinding handler inherited, Pool.terminate() hung
    forever on a worker that missed its SIGTERM (seen in ``nnunet-adpfl fingerprint``)."""
    import multiprocessing
    import signal

    from nnunet_adpfl.cli import _exit_on_sigterm, install_sigterm_handler
    previous = signal.getsignal(signal.SIGTERM)
    try:
        install_sigterm_handler()
        assert signal.getsignal(signal.SIGTERM) is _exit_on_sigterm
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        worker = ctx.Process(target=_report_sigterm_action, args=(queue,))
        worker.start()
        assert queue.get(timeout=30) is True
        worker.join(timeout=30)
        assert signal.getsignal(signal.SIGTERM) is _exit_on_sigterm  # the parent keeps its handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_failed_command_names_its_first_error(tmp_path):
    """The cause, not the teardown noise after it: nnU-Net's predictor raises, then its worker manager does."""
    script = ("import sys\nprint('ok')\nprint('RuntimeError: Encountered inf in predicted array')\n"
              "for _ in range(60): print('noise')\nprint(\"KeyError: '7f0d'\")\nsys.exit(1)\n")
    with pytest.raises(RuntimeError) as failed:
        run([sys.executable, "-c", script], dict(os.environ), tmp_path / "log.txt")
    message = str(failed.value)
    assert "first error: RuntimeError: Encountered inf in predicted array" in message
    assert message.rstrip().endswith("KeyError: '7f0d'")  # the tail is still there
    from nnunet_adpfl.workflows.compare import _failure_reason
    assert _failure_reason(message).startswith("RuntimeError: Encountered inf")


def test_killed_command_names_the_signal_and_the_likely_cause(tmp_path):
    """A training killed by the out-of-memory killer leaves no Python error: the message must say what happened."""
    with pytest.raises(RuntimeError) as e:
        run(["bash", "-c", "echo epoch 3; kill -KILL $$"], dict(os.environ))
    assert "killed by SIGKILL" in str(e.value) and "out-of-memory" in str(e.value)
    with pytest.raises(RuntimeError, match=r"command failed \(exit status 3\)"):
        run(["bash", "-c", "exit 3"], dict(os.environ))


def test_federation_failure_names_each_sites_exit(tmp_path):
    from nnunet_adpfl.workflows.compare import _failure_reason
    from nnunet_adpfl.workflows.stages import _failure_message

    (tmp_path / "train_A.log").write_text("epoch 3\nCurrent learning rate: 0.00462\n")
    (tmp_path / "train_B.log").write_text("Traceback (most recent call last):\nValueError: bad plan\n")
    message = _failure_message({"A": -9, "B": 1}, tmp_path)
    assert message.splitlines()[0].startswith("['A', 'B'] failed (A: killed by SIGKILL (often the system's out-of-")
    assert "B: exit status 1" in message.splitlines()[0]
    assert message.splitlines()[1:] == ["A: Current learning rate: 0.00462", "B: ValueError: bad plan"]
    assert "killed by SIGKILL" in _failure_reason(_failure_message({"A": -9}, tmp_path))


@pytest.mark.parametrize("through", ["run", "train_federated"])
def test_sigterm_stops_the_commands_a_workflow_started(tmp_path, through):
    """`timeout` or a scheduler ends a workflow with SIGTERM: the commands it started (a federation's sites, their
    data-loader workers) stop with it instead of running on as orphans."""
    pid_file = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(120)"]
    workflow = {
        "run": f"from nnunet_adpfl.nnunet.pipeline import run\nrun({child!r}, dict(os.environ))",
        "train_federated": (
            "import subprocess\nfrom nnunet_adpfl.workflows import stages\n"
            f"start = lambda *a, **k: subprocess.Popen({child!r}, start_new_session=True)\n"
            "stages.start_aggregator = start\nstages.start_site = start\n"
            f"class Lay: sites = []; logs = None; fed = __import__('pathlib').Path({str(tmp_path)!r})\n"
            "stages.train_federated(Lay(), 't', '2d', {}, 1)"),
    }[through]
    proc = subprocess.Popen([sys.executable, "-c", "import os\nfrom nnunet_adpfl.cli import install_sigterm_handler\n"
                             f"install_sigterm_handler()\n{workflow}"])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(grandchild, signal.SIGKILL)
    pytest.fail("the started command outlived the workflow that SIGTERM ended")


def test_sites_commands_run_at_once_and_a_failure_stops_the_others(tmp_path):
    """run_together: each command waits for the other's file, so run one after the other they would time out."""
    from nnunet_adpfl.nnunet.pipeline import run_together

    def waits_for(own, other):
        return [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(tmp_path / own)!r}).touch()\n"
                f"deadline = time.time() + 60\nwhile not pathlib.Path({str(tmp_path / other)!r}).exists():\n"
                f"    assert time.time() < deadline\n    time.sleep(0.05)\nprint('{own} done')"]
    (tmp_path / "A.log").write_text("an earlier run\n")
    run_together({"A": (waits_for("a", "b"), dict(os.environ), tmp_path / "A.log"),
                  "B": (waits_for("b", "a"), dict(os.environ), tmp_path / "B.log")})
    assert (tmp_path / "A.log").read_text() == "an earlier run\na done\n"  # appended
    assert (tmp_path / "B.log").read_text() == "b done\n"

    pid_file = tmp_path / "sleeper.pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(120)"]
    fails = [sys.executable, "-c", f"import pathlib, time\nwhile not pathlib.Path({str(pid_file)!r}).exists(): "
             "time.sleep(0.05)\nraise ValueError('bad fingerprint')"]
    (tmp_path / "C.log").write_text("ValueError: an earlier run's error\n")
    start = time.time()
    with pytest.raises(RuntimeError) as failed:
        run_together({"B": (sleeper, dict(os.environ), tmp_path / "B.log"),
                      "C": (fails, dict(os.environ), tmp_path / "C.log")})
    message = str(failed.value)
    assert message.startswith("C: command failed (exit status 1)")
    assert "first error: ValueError: bad fingerprint" in message and "earlier run" not in message
    assert time.time() - start < 60  # B was stopped, not waited for
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_wait_all_returns_at_the_first_failure_and_polls_between(tmp_path):
    from nnunet_adpfl.nnunet.pipeline import stop, wait_all

    def start(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    polls = []
    assert wait_all({"a": start("pass"), "b": start("import time; time.sleep(1)")}, 0.05,
                    lambda: polls.append(1)) == {}
    assert len(polls) >= 3  # called while b still ran
    sleeper = start("import time; time.sleep(120)")
    begin = time.time()
    try:
        assert wait_all({"sleeper": sleeper, "fails": start("raise SystemExit(3)")}) == {"fails": 3}
        assert time.time() - begin < 60 and sleeper.poll() is None  # returned without waiting for the sleeper
    finally:
        stop([sleeper])


def test_the_workflow_logs_each_closed_round_once(tmp_path):
    from nnunet_adpfl.federation import files as ff
    from nnunet_adpfl.workflows.stages import closed_rounds_logger
    logged = []
    log_closed_rounds = closed_rounds_logger(tmp_path, 3, time.time(), logged.append)

    def close(r):
        path = ff.global_paths(tmp_path, r)[1]
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    log_closed_rounds()
    close(1)
    log_closed_rounds()
    log_closed_rounds()
    close(2)
    close(3)
    log_closed_rounds()
    assert [line.split(" (")[0] for line in logged] == ["round 1/3 closed", "round 3/3 closed"]
