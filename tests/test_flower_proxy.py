"""Issue 35, item 9: the sites reach the SuperLink only through the nginx proxy of 'nnunet-adpfl flower proxy',
which forwards Flower's Fleet API and nothing else; the SuperLink itself listens on loopback. Through the proxy an
outsider's (or a site's) 'flwr run', 'flwr supernode register' and any Control or Runtime API path are refused,
while a registered site's SuperNode connects and receives the relay's files through it."""
import http.client
import shutil
import ssl
import subprocess

import pytest

pytest.importorskip("flwr")
from nnunet_adpfl.federation import flower_proxy as fp  # noqa: E402
from nnunet_adpfl.federation.flower_commands import CONNECTION, write_app, write_connection  # noqa: E402
from nnunet_adpfl.federation.flower_credentials import make_credentials  # noqa: E402
from nnunet_adpfl.federation.flower_local import FlowerNet  # noqa: E402

needs_nginx = pytest.mark.skipif(fp.nginx_binary() is None, reason="nginx is not installed (scripts/setup_env.sh)")


def test_config_forwards_exactly_flowers_fleet_routes_to_a_loopback_superlink(tmp_path):
    from flwr.superlink.routers.fleet.router import router

    flower = sorted(r.path.removeprefix("/v1/fleet/") for r in router.routes)
    assert sorted(fp.FLEET_ROUTES) == flower, "Flower's Fleet API changed: update FLEET_ROUTES"
    assert all(r.methods == {"POST"} for r in router.routes)
    make_credentials(tmp_path / "creds", ["coord.example.org"], ["A"])
    conf = fp.write_proxy_config(tmp_path / "proxy", "0.0.0.0:9093", "127.0.0.1:9091", tmp_path / "creds")
    text = conf.read_text()
    assert "listen 0.0.0.0:9093 ssl;" in text
    passes = [line.split()[-1] for line in text.splitlines() if "proxy_pass" in line]
    assert passes == [f"https://127.0.0.1:9091/v1/fleet/{r};" for r in fp.FLEET_ROUTES]
    assert text.count("location = /v1/fleet/") == len(fp.FLEET_ROUTES) and "location / { return 404; }" in text
    with pytest.raises(ValueError, match="not a loopback address"):
        fp.write_proxy_config(tmp_path / "proxy", "0.0.0.0:9093", "10.0.0.5:9091", tmp_path / "creds")
    if fp.nginx_binary():
        out = subprocess.run([*fp.proxy_command(conf), "-t"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr


def test_proxy_command_writes_the_config_and_names_the_nginx_command(tmp_path, capsys):
    import argparse

    make_credentials(tmp_path / "creds", ["coord.example.org"], ["A"])
    parser = argparse.ArgumentParser()
    fp.add_cli(parser.add_subparsers())
    a = parser.parse_args(["proxy", str(tmp_path / "proxy"), "--credentials", str(tmp_path / "creds")])
    assert a.func(a) == 0
    assert "listen 0.0.0.0:9093 ssl;" in (tmp_path / "proxy" / "nginx.conf").read_text()
    assert "proxy_pass https://127.0.0.1:9091/v1/fleet/" in (tmp_path / "proxy" / "nginx.conf").read_text()
    assert f"-c {tmp_path / 'proxy' / 'nginx.conf'}" in capsys.readouterr().out
    a = parser.parse_args(["proxy", str(tmp_path / "p2"), "--credentials", str(tmp_path / "nothing")])
    assert a.func(a) == 2 and "not found" in capsys.readouterr().out


def _post(port: int, ca, path: str, method: str = "POST") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)),
                                       timeout=30)
    conn.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
    status = conn.getresponse().status
    conn.close()
    return status


def _api_lines(net: FlowerNet) -> list[str]:
    """The SuperLink's access log lines of its Control and Runtime APIs (and of anything not Fleet)."""
    return [line for line in net.log("superlink").splitlines() if '"POST /' in line or '"GET /' in line
            if "/v1/fleet/" not in line]


@needs_nginx
@pytest.mark.timeout(300)
def test_control_api_refused_through_the_proxy_while_a_sites_supernode_works_through_it(tmp_path):
    """~40 s on 2 busy cores. The relay's files through the proxy: test_flower_relay's federation test."""
    net = FlowerNet(tmp_path / "flower", ["A"], extra_keys=("outsider",))
    flwr_cli = shutil.which("flwr", path=net.env["PATH"])

    def flwr_as(address: str, *args: str) -> subprocess.CompletedProcess:
        """The flwr CLI of someone who knows ``address`` and holds the CA certificate."""
        home = tmp_path / f"home_{address.replace(':', '_')}"
        write_connection(CONNECTION, address, net.creds["ca"], home=home)
        return subprocess.run([flwr_cli, *args], env={**net.env, "FLWR_HOME": str(home)}, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    try:
        net.start_superlink()
        net.start_proxy()
        sites_door, ca = f"127.0.0.1:{net.fleet_port}", net.creds["ca"]
        app = write_app(tmp_path / "outsider_app", tmp_path / "anything", tmp_path / "anything")
        before = _api_lines(net)
        for args in (["ls", CONNECTION], ["supernode", "register", str(net.creds["outsider"] / "node.pub"),
                                          CONNECTION], ["run", str(app), CONNECTION]):
            out = flwr_as(sites_door, *args)
            assert out.returncode != 0 and "404" in out.stdout + out.stderr, (args, out.stdout + out.stderr)
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/acquire-task", "/docs",
                     "/openapi.json", "/health", "/v1/fleet/../control/list-runs",
                     "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/get-run/../../control/list-runs"):
            assert _post(net.fleet_port, ca, path) in (400, 404), path
        assert _post(net.fleet_port, ca, "/v1/fleet/get-run", "GET") == 403
        assert _api_lines(net) == before, "a request through the proxy reached an API other than the Fleet API"
        # the same CLI on the SuperLink's own port (what the README's earlier deployment exposed) is served
        assert flwr_as(f"127.0.0.1:{net.port}", "ls", CONNECTION).returncode == 0
        assert len(_api_lines(net)) == len(before) + 1

        net.register("A")  # the coordinator, on the SuperLink's loopback port
        net.start_supernode("A", tmp_path / "site_A", tmp_path / "A.key")  # through the proxy
        access = net.root / "proxy" / "access.log"
        net.wait_for(lambda: '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access.read_text(), 120,
                     "site A's SuperNode did not poll the Fleet API through the proxy")
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access.read_text()
    finally:
        net.close()
