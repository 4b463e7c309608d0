"""The sites' only way into the SuperLink: an nginx reverse proxy that forwards the Fleet API and nothing else.

Flower 1.42's SuperLink serves its Control API (``flwr run``, ``flwr supernode register``, ...), its Runtime API
(the ServerApp's) and its Fleet API (the SuperNodes') on one HTTPS port, and open-source Flower has no login for
the Control API. So the SuperLink is bound to loopback on the coordinator, and the sites reach it through this
proxy, which answers 404 to every path except the Fleet API's POST routes (listed below, checked against Flower's
own router by the tests) and sends each of those to the SuperLink under exactly that path. TLS is terminated
with the SuperLink's certificate from ``nnunet-adpfl flower credentials`` (the sites' SuperNodes check it with
the federation CA, as before), and the proxy checks the SuperLink's certificate with the same CA.

``nnunet-adpfl flower proxy`` writes the config; ``nginx -e <dir>/error.log -c <dir>/nginx.conf`` runs it in the
foreground (``daemon off``), as an unprivileged user when the listening port is above 1023.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..common.atomic import write_bytes_atomic

FLEET_ROUTES = ("register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
                "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
                "confirm-message-received")
MAX_BODY = "64m"  # a Flower object is sent in chunks of 5 MB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)

_CONF = """# nnunet-adpfl: the sites' door to the SuperLink. Fleet API only; written by 'nnunet-adpfl flower proxy'.
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server_tokens off;
    client_max_body_size {max_body};
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
{locations}
        location / {{ return 404; }}
    }}
}}
"""
_LOCATION = """        location = /v1/fleet/{route} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://{superlink}/v1/fleet/{route};
        }}"""


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost")


def write_proxy_config(out: str | Path, listen: str, superlink: str, credentials: str | Path) -> Path:
    """``out``/nginx.conf: listen on ``listen`` (host:port, e.g. 0.0.0.0:9093) for the sites, forward the Fleet
    API to the SuperLink at ``superlink`` (a loopback host:port), TLS from the ``credentials`` folder."""
    if not _loopback(superlink):
        raise ValueError(f"the SuperLink address {superlink} is not a loopback address: bind the SuperLink to "
                         "127.0.0.1 ('flower-superlink --host 127.0.0.1'), so that only this proxy reaches it")
    out, creds = Path(out).resolve(), Path(credentials).resolve()
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        if not (creds / name).is_file():
            raise FileNotFoundError(f"{creds / name} not found ('nnunet-adpfl flower credentials' first)")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (out / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    locations = "\n".join(_LOCATION.format(route=r, superlink=superlink) for r in FLEET_ROUTES)
    text = _CONF.format(dir=out, listen=listen, max_body=MAX_BODY, ca=creds / "ca.crt",
                        cert=creds / "superlink.crt", key=creds / "superlink.key", locations=locations)
    path = out / "nginx.conf"
    write_bytes_atomic(path, text.encode())
    return path


def nginx_binary() -> str | None:
    """nginx on PATH or in /usr/sbin (Debian's package; not on a normal user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def proxy_command(conf: Path) -> list[str]:
    conf = Path(conf).resolve()
    return [nginx_binary() or "nginx", "-e", str(conf.parent / "error.log"), "-c", str(conf)]


def cmd_proxy(a) -> int:
    try:
        conf = write_proxy_config(a.out, a.listen, a.superlink, a.credentials)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(f"nginx config written to {conf}: the sites reach the Fleet API on {a.listen}; every other path "
          f"(the Control and Runtime APIs) is refused there. Start it with:\n  {' '.join(proxy_command(conf))}")
    if nginx_binary() is None:
        print("nginx is not installed: 'apt-get install nginx' (Debian/Ubuntu)")
    return 0


def add_cli(fsub) -> None:
    q = fsub.add_parser("proxy", help="coordinator: nginx config that exposes only the Fleet API to the sites")
    q.add_argument("out", help="folder for nginx.conf, its logs and temporary files")
    q.add_argument("--credentials", required=True, help="the folder of 'nnunet-adpfl flower credentials'")
    q.add_argument("--listen", default="0.0.0.0:9093", help="host:port the sites connect to (default 0.0.0.0:9093)")
    q.add_argument("--superlink", default="127.0.0.1:9091",
                   help="the SuperLink's loopback host:port ('flower-superlink --host 127.0.0.1 --port 9091')")
    q.set_defaults(func=cmd_proxy)
