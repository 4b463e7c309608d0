"""``nnunet-adpfl flower ...``: credentials, the Flower app folder and the SuperLink connection of the flwr CLI."""
from __future__ import annotations

import os
from pathlib import Path

from ..common.atomic import write_bytes_atomic
from . import flower_proxy, flower_site

CONNECTION = "nnunet-adpfl"

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "nnunet-adpfl-relay"
version = "0.1.0"
description = "nnunet-adpfl federation over Flower: relays the federation folder's files between coordinator and sites"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "nnunet-adpfl"

[tool.flwr.app.components]
serverapp = "nnunet_adpfl.federation.flower_app:server_app"
clientapp = "nnunet_adpfl.federation.flower_app:client_app"

[tool.flwr.app.config]
federation-dir = {federation_dir}
keys-dir = {keys_dir}
aggregate = {aggregate}
poll-interval = {poll_interval}
reply-timeout = {reply_timeout}
max-wait-s = {max_wait}
"""


def _toml_str(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(app_dir: Path, federation_dir: Path, keys_dir: Path, aggregate: bool = True,
              poll_interval: float = 1.0, reply_timeout: float = 60.0, max_wait: float = 0.0) -> Path:
    """The Flower app folder ('flwr run <app_dir> <connection>' builds the FAB from it; the code is our package,
    installed on the coordinator and every site: the sites' 'nnunet-adpfl flower supernode' never runs code from
    a FAB, so only the coordinator uses this pyproject)."""
    text = APP_TOML.format(federation_dir=_toml_str(Path(federation_dir).resolve()),
                           keys_dir=_toml_str(Path(keys_dir).resolve()), aggregate=str(aggregate).lower(),
                           poll_interval=float(poll_interval), reply_timeout=float(reply_timeout),
                           max_wait=float(max_wait))
    write_bytes_atomic(Path(app_dir) / "pyproject.toml", text.encode())
    return Path(app_dir)


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(name: str, address: str, ca_file: Path, home: Path | None = None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in the flwr CLI's $FLWR_HOME/config.toml (TLS with our
    CA); other connections are kept."""
    import tomli
    import tomli_w

    path = Path(home or flwr_home()) / "config.toml"
    config = tomli.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links.setdefault("default", name)
    links[name] = {"address": address, "root-certificates": str(Path(ca_file).resolve())}
    write_bytes_atomic(path, tomli_w.dumps(config).encode())
    return path


def cmd_credentials(a) -> int:
    from .flower_credentials import make_credentials

    sites = [s for s in a.sites.split(",") if s]
    paths = make_credentials(Path(a.out), [h for h in a.hosts.split(",") if h], sites)
    print(f"CA {paths['ca']} (keep {Path(a.out) / 'ca.key'} offline); SuperLink TLS {paths['certfile']} + "
          f"{paths['keyfile']} for {a.hosts}")
    for site in sites:
        print(f"site {site}: give it {paths[site]}/ (node.key, ca.crt); register {paths[site]}/node.pub at the "
              f"SuperLink with 'flwr supernode register {paths[site]}/node.pub {CONNECTION}'")
    return 0


def cmd_app(a) -> int:
    app = write_app(Path(a.app_dir), Path(a.federation_dir), Path(a.keys_dir), not a.no_aggregate,
                    a.poll_interval, a.reply_timeout, a.max_wait)
    print(f"Flower app written to {app}; start it with: flwr run {app} {CONNECTION} --stream")
    return 0


def cmd_connection(a) -> int:
    path = write_connection(a.name, a.address, Path(a.ca))
    print(f"SuperLink connection '{a.name}' ({a.address}, TLS with {a.ca}) written to {path}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("flower", help="the network transport (Flower): credentials, app, proxy, connection, supernode")
    fsub = p.add_subparsers(dest="flower_command", required=True)
    q = fsub.add_parser("credentials", help="CA, SuperLink TLS certificate and one node-auth key pair per site")
    q.add_argument("out", help="folder for the credentials (on the coordinator)")
    q.add_argument("--hosts", required=True, help="comma-separated names/IPs the sites reach the SuperLink by")
    q.add_argument("--sites", required=True, help="comma-separated site names, as in 'federation init'")
    q.set_defaults(func=cmd_credentials)

    q = fsub.add_parser("app", help="coordinator: write the Flower app folder for 'flwr run'")
    q.add_argument("app_dir")
    q.add_argument("--federation-dir", required=True, help="the coordinator's federation folder")
    q.add_argument("--keys-dir", required=True, help="all site keys (from 'federation init')")
    q.add_argument("--no-aggregate", action="store_true",
                   help="do not run the aggregator inside the ServerApp (run 'nnunet-adpfl aggregate' yourself)")
    q.add_argument("--poll-interval", type=float, default=1.0, help="seconds between relay cycles")
    q.add_argument("--reply-timeout", type=float, default=60.0, help="seconds to wait for the nodes' replies")
    q.add_argument("--max-wait", type=float, default=0.0, help="stop the run after this many seconds (0: never)")
    q.set_defaults(func=cmd_app)

    flower_proxy.add_cli(fsub)
    flower_site.add_cli(fsub)

    q = fsub.add_parser("connection", help="add the SuperLink (address + our CA) to the flwr CLI's configuration")
    q.add_argument("--name", default=CONNECTION)
    q.add_argument("--address", required=True, help="host:port of the SuperLink")
    q.add_argument("--ca", required=True, help="ca.crt from 'nnunet-adpfl flower credentials'")
    q.set_defaults(func=cmd_connection)
