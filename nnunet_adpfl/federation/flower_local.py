"""A Flower deployment on one machine (loopback), as `nnunet-adpfl simulate --transport flower` and the tests run
it: a SuperLink with TLS and node authentication, one SuperNode per site running our ClientApp, the relay
ServerApp started with 'flwr run' -- the same commands as in a real deployment (docs/FLOWER.md), on free local ports,
with FLWR_HOME inside ``root``. ``start_proxy`` puts the Fleet-only nginx proxy between the SuperNodes and the
SuperLink, as docs/FLOWER.md deploys it (simulate does without: everything is on loopback). Every process runs in its own process group; ``close`` kills them all."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .flower_commands import CONNECTION, write_app, write_connection
from .flower_credentials import make_credentials
from .flower_proxy import proxy_command, write_proxy_config
from .flower_site import BIN, flwr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class FlowerNet:
    def __init__(self, root: Path, sites: list[str], extra_keys: tuple[str, ...] = ()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.creds = make_credentials(self.root / "credentials", ["127.0.0.1"], [*sites, *extra_keys])
        self.home = self.root / "flwr_home"
        self.port = free_port()        # the SuperLink, on loopback: Control, Runtime and Fleet API
        self.fleet_port = self.port    # where the SuperNodes connect: the proxy's port once start_proxy ran
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.may_fail: set[str] = set()  # processes expected to exit with an error (e.g. a refused SuperNode)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        write_connection(CONNECTION, f"127.0.0.1:{self.port}", self.creds["ca"], home=self.home)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.procs[name] = subprocess.Popen(cmd, stdout=open(self.logs / f"{name}.log", "a"), stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True, cwd=self.root)
        return self.procs[name]

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        c = self.creds
        self.start("superlink", [flwr("flower-superlink"), "--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile",
                                 str(c["certfile"]), "--ssl-keyfile", str(c["keyfile"]), "--enable-supernode-auth",
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", str(self.port),
                                 "--database", str(self.root / "superlink.db")])
        self.wait_for(lambda: "Uvicorn running" in self.log("superlink"), 60, "SuperLink did not start")

    def start_proxy(self) -> None:
        """nginx in front of the SuperLink, as in a real deployment: the SuperNodes connect to it, and only the
        Fleet API goes through."""
        self.fleet_port = free_port()
        conf = write_proxy_config(self.root / "proxy", f"127.0.0.1:{self.fleet_port}", f"127.0.0.1:{self.port}",
                                  self.root / "credentials")
        self.start("proxy", proxy_command(conf))
        self.wait_for(lambda: _listening(self.fleet_port), 30, "nginx did not start")

    def flwr_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flwr("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)

    def register(self, key_name: str) -> None:
        out = self.flwr_cli("supernode", "register", str(self.creds[key_name] / "node.pub"), CONNECTION)
        assert out.returncode == 0 and "registered successfully" in out.stdout, out.stdout + out.stderr

    def start_supernode(self, site: str, fed: Path, key_file: Path, node_key: str | None = None,
                        name: str | None = None, max_retries: int | None = None) -> subprocess.Popen:
        """A site's 'nnunet-adpfl flower supernode' (flower-supernode that runs only the installed ClientApp)."""
        d = self.creds[node_key or site]
        cmd = [flwr("nnunet-adpfl"), "flower", "supernode", "--superlink", f"127.0.0.1:{self.fleet_port}",
               "--root-certificates", str(d / "ca.crt"), "--auth-supernode-private-key", str(d / "node.key"),
               "--site", site, "--federation-dir", str(fed), "--key-file", str(key_file),
               "--runtime-port", str(free_port())]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self.start(name or f"supernode_{site}", cmd)

    def start_relay(self, fed: Path, keys_dir: Path, **app_options) -> subprocess.Popen:
        app = write_app(self.root / "app", fed, keys_dir, **app_options)
        return self.start("flwr_run", [flwr("flwr"), "run", str(app), CONNECTION, "--stream"])

    def wait_for(self, condition, timeout: float, what: str, poll: float = 0.5) -> None:
        deadline = time.time() + timeout
        while not condition():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() not in (None, 0) and n not in self.may_fail}
            assert not dead, f"{what}: processes exited {dead}; logs in {self.logs}"
            assert time.time() < deadline, f"{what} (after {timeout:.0f} s); logs in {self.logs}"
            time.sleep(poll)

    def kill(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        # the ServerApp process the SuperLink started (its command line names our credentials folder)
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(self.root).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
