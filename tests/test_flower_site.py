"""A site's 'nnunet-adpfl flower supernode' never runs code from the coordinator's app package (FAB)."""
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.cli.build import build_fab_from_disk  # noqa: E402
from flwr.supercore.fab import Fab  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supernode.runtime import run_clientapp  # noqa: E402

from nnunet_adpfl.federation import flower_site  # noqa: E402
from nnunet_adpfl.federation.flower_app import REPLY_FIELDS, pack, unpack  # noqa: E402
from nnunet_adpfl.federation.flower_commands import write_app  # noqa: E402


def hostile_fab(tmp_path):
    """Our app's pyproject, plus a package of the same name whose ClientApp writes a marker when imported."""
    app = write_app(tmp_path / "app", tmp_path / "fed", tmp_path / "keys")
    pkg = app / "nnunet_adpfl" / "federation"
    pkg.mkdir(parents=True)
    (app / "nnunet_adpfl" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    marker = tmp_path / "PWNED"
    (pkg / "flower_app.py").write_text(f"open({str(marker)!r}, 'w').write('FAB code ran')\n"
                                       "from flwr.clientapp import ClientApp\nclient_app = ClientApp()\n")
    content = build_fab_from_disk(app)
    return Fab(hash_str=__import__("hashlib").sha256(content).hexdigest(), content=content, verifications={}), marker


def task_harness(tmp_path, monkeypatch, fab):
    """run_task against a fake Runtime API: what it pushes (replies, final statuses)."""
    for name in ("_run_id", "_node_id", "_task_id"):  # Message() needs the identity of the task's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    context = Context(run_id=1, node_id=7, node_config={"site": "A", "federation-dir": str(tmp_path / "site_fed"),
                                                        "key-file": str(tmp_path / "A.key")},
                      state=RecordDict(), run_config={})
    request = Message(pack({}, {}), dst_node_id=7, message_type="query")
    request.metadata.__dict__["_message_id"] = request.object_id
    pushed, outputs = [], []
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: (request, context, None, fab))
    monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda **kw: outputs.append(kw["sub_status"]))
    monkeypatch.setattr(flower_site, "_runtime_client", lambda *a, **kw: (SimpleNamespace(close=lambda: None),
                                                                          SimpleNamespace()))
    monkeypatch.setattr("flwr.supercore.heartbeat.HeartbeatSender.start", lambda self: None)
    monkeypatch.setattr("flwr.supercore.heartbeat.HeartbeatSender.stop", lambda self: None)
    monkeypatch.setattr("flwr.supercore.app_utils.start_parent_process_monitor", lambda pid: None)
    return pushed, outputs


def test_a_task_answers_with_the_installed_clientapp_and_never_installs_the_fab(tmp_path, monkeypatch):
    fab, marker = hostile_fab(tmp_path)
    pushed, outputs = task_harness(tmp_path, monkeypatch, fab)
    assert flower_site.run_task("127.0.0.1:1", "token", 1) == 0
    fields, _ = unpack(pushed[0].content, REPLY_FIELDS)  # the installed relay's answer (it refused the empty request)
    assert fields["site"] == "A" and "error" in fields and outputs == ["completed"]
    assert not marker.exists() and not (tmp_path / "flwr_home").exists()  # nothing from the FAB imported or installed


def test_the_launcher_ends_with_its_supernode_even_before_the_runtime_api_is_up():
    supernode = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(5)"])
    start = time.time()
    assert flower_site.serve_tasks("127.0.0.1:9", supernode, poll=0.1) == 5  # a refused SuperNode's exit code
    assert time.time() - start < 30


def test_supernode_runs_process_isolated_with_its_runtime_api_on_loopback(tmp_path):
    a = SimpleNamespace(superlink="h:9093", root_certificates="ca.crt", auth_supernode_private_key="node.key",
                        site="A", federation_dir=str(tmp_path / "fed"), key_file=str(tmp_path / "A.key"),
                        runtime_port=9094, max_retries=None)
    cmd = flower_site.supernode_command(a, tmp_path / "secret")
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert f'federation-dir="{tmp_path / "fed"}"' in cmd[cmd.index("--node-config") + 1]
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "secret")
    with pytest.raises(SystemExit, match="quotes"):
        flower_site.node_config("A", str(tmp_path / 'a"b'), "k")


@pytest.mark.parametrize("kind", ["symlink", "oversized"])
def test_the_clientapp_reads_its_site_key_by_the_folder_rules(tmp_path, monkeypatch, kind):
    from nnunet_adpfl.federation.flower_app import client_app

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    real = tmp_path / "real.key"
    real.write_text("ab" * 32)
    key = tmp_path / "A.key"
    if kind == "symlink":
        key.symlink_to(real)
    else:
        key.write_text("ab" * 100_000)
    context = Context(run_id=1, node_id=7, node_config={"site": "A", "federation-dir": str(tmp_path / "fed"),
                                                        "key-file": str(key)}, state=RecordDict(), run_config={})
    request = Message(pack({}, {}), dst_node_id=7, message_type="query")
    request.metadata.__dict__["_message_id"] = request.object_id
    fields, _ = unpack(client_app(message=request, context=context).content, REPLY_FIELDS)
    assert "key file" in fields["error"] and "status" not in fields


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_supernode_ends_when_its_launcher_is_killed():
    """Restarting a killed launcher must not find an orphaned SuperNode still holding the node."""
    import os
    import signal
    launcher = subprocess.Popen([sys.executable, "-c", "import sys, time; from nnunet_adpfl.federation import "
                                 "flower_site; p = flower_site.start_child(['sleep', '60']); print(p.pid, flush=True); "
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()

    def running(pid: int) -> bool:  # a zombie (ended, not yet reaped by init) counts as ended
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while running(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(child)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])  # SIGINT (parent gone), the API gone
def test_a_task_whose_reply_cannot_be_pushed_ends_failed_without_a_traceback(tmp_path, monkeypatch, failure):
    fab, _ = hostile_fab(tmp_path)
    _, outputs = task_harness(tmp_path, monkeypatch, fab)

    def push_message(client, reply, context):
        raise failure("gone")

    monkeypatch.setattr(run_clientapp, "push_message", push_message)
    assert flower_site.run_task("127.0.0.1:1", "token", 1) == 1
    assert outputs == ["failed"]


def test_a_hung_task_is_ended_and_frees_its_slot():
    hung, fresh = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    now = time.time()
    left = flower_site.still_running([(hung, now - flower_site.TASK_LIMIT_S - 1), (fresh, now)], now)
    assert left == [(fresh, now)] and hung.poll() is not None
    fresh.kill()
    fresh.wait()


PROBE = """import signal, sys
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from nnunet_adpfl.federation import flower_site
signal.signal(signal.SIGINT, lambda *a: sys.exit(3))  # Flower's client answers a 401 with SIGINT to itself
secret = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
client = flower_site._runtime_client(sys.argv[1], "SuperExec", secret=secret)[0]
client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
"""


def listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_only_the_launcher_may_take_the_supernodes_tasks(tmp_path):
    """The SuperNode's Runtime API (loopback) gives tasks only to the holder of the launcher's secret: another local
    process cannot take, and answer, this site's requests."""
    import socket
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = SimpleNamespace(superlink="127.0.0.1:9", root_certificates="ca.crt", auth_supernode_private_key="node.key",
                        site="A", federation_dir=str(tmp_path), key_file=str(tmp_path / "A.key"), runtime_port=port,
                        max_retries=1000)
    cmd = [c for c in flower_site.supernode_command(a, secret) if c not in ("--root-certificates", "ca.crt",
                                                                           "--auth-supernode-private-key", "node.key")]
    supernode = subprocess.Popen([*cmd, "--insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not listening(port):
            assert time.time() < deadline and supernode.poll() is None, "the SuperNode's Runtime API did not start"
            time.sleep(0.2)
        probe = [sys.executable, "-c", PROBE, f"127.0.0.1:{port}"]
        assert subprocess.run([*probe, str(secret)], timeout=60).returncode == 0
        assert subprocess.run(probe, timeout=60).returncode == 3  # refused without the secret
    finally:
        supernode.kill()
        supernode.wait()
