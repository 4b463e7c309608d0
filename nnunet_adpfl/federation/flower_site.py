"""A site's Flower SuperNode that runs only the installed ClientApp, never code sent by the coordinator.

Flower 1.42's SuperNode, by default, installs the app package (FAB) that ``flwr run`` sends and imports the
ClientApp from it, as the site's user: whoever runs ``flwr run`` on the SuperLink (the coordinator) could run any
code at every site and read its images. ``nnunet-adpfl flower supernode`` starts ``flower-supernode`` with
``--isolation process`` (it then launches nothing) and takes its ClientApp tasks itself: each one runs in a
fresh process that pulls the message and context with Flower's own functions, never installs, imports or reads
the FAB, and answers with this package's ``flower_app.client_app``. The FAB's run config is not used at a site
(the ClientApp reads only the node config). The SuperNode gives tasks only to the holder of a secret the launcher
makes at each start (Flower's SuperExec authentication), so other local processes cannot take them.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TOKEN_ENV = "NNUNET_ADPFL_FLOWER_TASK_TOKEN"  # the environment, not argv: other users cannot read it
MAX_TASKS = 2  # ClientApp processes at once; more tasks wait in the SuperNode
TASK_LIMIT_S = 1800.0  # a task running longer is ended (a relay task takes seconds; its message's TTL is minutes)
TASK_RETRY_S = 120.0  # a task gives up when the SuperNode's Runtime API has not answered for this long


def flwr(name: str) -> str:
    """A Flower command of this environment (beside its python), else from PATH."""
    path = BIN / name
    return str(path) if path.exists() else name


def node_config(site: str, federation_dir: str, key_file: str) -> str:
    """flower-supernode's --node-config (Flower's parser takes "..." strings without quotes or escapes)."""
    pairs = {"site": site, "federation-dir": str(Path(federation_dir).resolve()),
             "key-file": str(Path(key_file).resolve())}
    for name, value in pairs.items():
        if any(c in value for c in '"\\\n'):
            raise SystemExit(f"{name} {value!r}: Flower's node config cannot carry quotes, backslashes or newlines")
    return " ".join(f'{k}="{v}"' for k, v in pairs.items())


def supernode_command(a, secret_file: Path) -> list[str]:
    """``secret_file``: the launcher's task-taking secret (only it may take the SuperNode's tasks)."""
    config = node_config(a.site, a.federation_dir, a.key_file)
    cmd = [flwr("flower-supernode"), "--superlink", a.superlink, "--root-certificates", a.root_certificates,
           "--auth-supernode-private-key", a.auth_supernode_private_key, "--node-config", config,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(a.runtime_port),
           "--superexec-auth-secret-file", str(secret_file)]
    return cmd + (["--max-retries", str(a.max_retries)] if a.max_retries is not None else [])


def _runtime_client(address: str, component: str, token: str | None = None, max_time: float | None = None,
                    secret: bytes | None = None):
    """A client of the SuperNode's Runtime API; gives up on a failed call after max_time seconds (None: one try).
    ``secret``: signs AcquireTask (the SuperNode gives tasks only to the holder of its secret)."""
    from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                             SuperExecAuthHttpInterceptor)
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    retry = make_simple_http_retry_invoker()
    retry.max_tries, retry.max_time = (1, None) if max_time is None else (None, max_time)
    client = RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                   interceptors=interceptors, retry_invoker=retry)
    return client, retry


def run_task(address: str, token: str, parent_pid: int) -> int:
    """One ClientApp task: Flower's protocol, our installed ClientApp; the FAB that comes with it is ignored."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from .flower_app import client_app

    start_parent_process_monitor(parent_pid)  # ends with 'nnunet-adpfl flower supernode' (by SIGINT)
    client, retry = _runtime_client(address, "flwr-clientapp", token, max_time=TASK_RETRY_S)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        try:
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as e:  # noqa: BLE001 (answered as an error reply, as Flower's flwr-clientapp does)
            details = f"{type(e).__name__}: {e}"[:500]
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        push_message(client, reply, context)
    except BaseException as e:  # noqa: BLE001 (no message or reply moved: the run stopped, SIGINT, API gone)
        status, details = SubStatus.FAILED, f"{type(e).__name__}: {e}"[:500]
    finally:
        if status != SubStatus.COMPLETED:
            print(f"ClientApp task failed: {details}", file=sys.stderr, flush=True)
        retry.max_tries, retry.max_time = 1, None  # the final status: one try, never a hang on exit
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except BaseException:  # noqa: BLE001 (the SuperNode expires the task without it)
            pass
        heartbeat.stop()
        client.close()
    return 0 if status == SubStatus.COMPLETED else 1


def still_running(tasks: list[tuple[subprocess.Popen, float]], now: float) -> list[tuple[subprocess.Popen, float]]:
    """The (process, start) of the tasks still running; one running longer than TASK_LIMIT_S is ended (a hung task
    would hold one of the MAX_TASKS slots for good; its message expired long before)."""
    alive = []
    for task, started in tasks:
        if task.poll() is None and now - started > TASK_LIMIT_S:
            print(f"ClientApp task {task.pid} ended after {TASK_LIMIT_S:.0f} s", file=sys.stderr, flush=True)
            task.kill()
            task.wait()
        elif task.poll() is None:
            alive.append((task, started))
    return alive


def serve_tasks(address: str, supernode: subprocess.Popen, poll: float = 0.5, secret: bytes | None = None) -> int:
    """Launch one ClientApp process per task of the SuperNode while it runs; its exit code at the end."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    client, running = None, []
    while supernode.poll() is None:
        running = still_running(running, time.time())
        try:
            client = client or _runtime_client(address, "SuperExec", secret=secret)[0]
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])) \
                if len(running) < MAX_TASKS else None
        except Exception:  # noqa: BLE001 (the SuperNode's Runtime API not up yet, or going down)
            res = None
        if res is not None and res.HasField("task") and res.token:
            env = {**os.environ, TOKEN_ENV: res.token}
            task = subprocess.Popen([sys.executable, "-P", "-m", __name__, address, str(os.getpid())],
                                    env=env)  # -P: not the working folder first on the import path
            running.append((task, time.time()))
        time.sleep(poll)
    return supernode.returncode


def _end_with_parent() -> None:
    """In the child, Linux only: SIGTERM when the launcher dies (SIGKILL included), so that restarting it finds no
    orphaned SuperNode holding the node's key."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_child(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, preexec_fn=_end_with_parent)


def cmd_supernode(a) -> int:
    with tempfile.TemporaryDirectory(prefix="nnunet_adpfl_supernode_") as private:  # mode 0700
        secret = secrets.token_bytes(32)  # other local processes cannot take (and answer) this site's tasks
        secret_file = Path(private) / "superexec.secret"
        secret_file.touch(mode=0o600)
        secret_file.write_bytes(secret)
        return _run_supernode(a, secret_file, secret)


def _run_supernode(a, secret_file: Path, secret: bytes) -> int:
    supernode = start_child(supernode_command(a, secret_file))

    def stop(signum, _frame):
        supernode.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return serve_tasks(f"127.0.0.1:{a.runtime_port}", supernode, secret=secret)
    finally:
        if supernode.poll() is None:
            supernode.terminate()


def add_cli(fsub) -> None:
    q = fsub.add_parser("supernode", help="site: Flower's SuperNode running only the installed ClientApp (never "
                                          "code from the coordinator's app package)")
    q.add_argument("--superlink", required=True, help="host:port the SuperNodes connect to (the proxy's)")
    q.add_argument("--root-certificates", required=True, help="ca.crt from 'nnunet-adpfl flower credentials'")
    q.add_argument("--auth-supernode-private-key", required=True, help="this site's node.key")
    q.add_argument("--site", required=True, help="this site's name, as in 'federation init'")
    q.add_argument("--federation-dir", required=True, help="the site's local copy of the federation folder")
    q.add_argument("--key-file", required=True, help="this site's key from 'federation init'")
    q.add_argument("--runtime-port", type=int, default=9094, help="port of the SuperNode's Runtime API (loopback)")
    q.add_argument("--max-retries", type=int, default=None, help="flower-supernode's --max-retries")
    q.set_defaults(func=cmd_supernode)


if __name__ == "__main__":
    sys.exit(run_task(sys.argv[1], os.environ.pop(TOKEN_ENV), int(sys.argv[2])))
