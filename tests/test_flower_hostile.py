"""Hostile peers of the Flower relay (issue 35, item 8), without Flower processes: a fake Grid hands the relay's
requests to an honest site A (site_exchange on its local folder) and to an attacker, a registered node that holds
no site key or that holds site B's key. Whatever the attacker answers, relay_cycle returns, the attacker is refused
with a logged reason, nothing it sent is written, and site A is served in the same cycle."""
import json
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from nnunet_adpfl.federation import flower_app as fa  # noqa: E402
from nnunet_adpfl.federation import flower_relay as fr  # noqa: E402

HONEST, ATTACKER = 1, 2
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(autouse=True)
def _run_id(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # Message() needs the identity of the ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 1)


class FakeGrid:
    """The two halves of Flower's Grid the relay uses, with one responder per node."""

    def __init__(self, responders: dict):
        self.responders, self.sent = responders, {}

    def get_node_ids(self):
        return list(self.responders)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{len(self.sent) + i}")
            self.sent[ids[-1]] = m
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            msg = self.sent[mid]
            node = msg.metadata.dst_node_id
            content = self.responders[node](*_decode(msg.content))
            out.append(SimpleNamespace(has_error=lambda: False, has_content=lambda: True, content=content,
                                       metadata=SimpleNamespace(src_node_id=node, group_id=str(node),
                                                                reply_to_message_id=mid)))
        return out

    def send_and_receive(self, messages, timeout=None):  # the relay before issue 35 used this
        return self.pull_messages(self.push_messages(messages))


def _decode(content):
    """Our own request, as a site reads it (trusted here)."""
    fields = {k: json.loads(v) for k, v in content["relay"].items()}
    arrays = content["files"] if "files" in content else {}
    return fields, {n: bytes(arrays[f"f{i}"].data) for i, n in enumerate(fields.pop("names", []))}


def record(fields: dict[str, str], files: dict[str, bytes] | None = None) -> RecordDict:
    """A reply with raw (attacker-chosen) JSON texts as fields."""
    files = files or {}
    names = list(files)
    arrays = ArrayRecord({f"f{i}": Array(dtype="uint8", shape=(len(files[n]),), stype="raw", data=files[n])
                          for i, n in enumerate(names)})
    return RecordDict({"relay": ConfigRecord({"names": json.dumps(names), **fields}), "files": arrays})


def honest_site(folder, key):
    def respond(fields, push):
        status, files, mac = fr.site_exchange(folder, "A", key, fields["nonce"], push, fields["push_mac"],
                                              fields["held"])
        return fa.pack({"site": "A", "status": status, "mac": mac}, files)
    return respond


def key_holder(key, status=None, files=None, site="B"):
    """Site B's key in the attacker's hands: a valid MAC over whatever it sends."""
    def respond(fields, push):
        st = {"files": {}, "globals": [], "updates": []} if status is None else status
        fl = files or {}
        mac = fr.relay_mac(key, "reply", fields["nonce"], site, {"status": st, "files": fr._digests(fl)})
        return record({"site": json.dumps(site), "status": json.dumps(st), "mac": json.dumps(mac)}, fl)
    return respond


@pytest.fixture
def setup(tmp_path):
    fed = tmp_path / "coordinator"
    (fed / "round_0000").mkdir(parents=True)
    (fed / "federation.json").write_bytes(b'{"id": "fed"}')
    (fed / "round_0000" / "global.safetensors").write_bytes(b"\0" * 64)
    (fed / "round_0000" / "global.json").write_bytes(b'{"round": 0}')
    keys = {"A": os.urandom(32), "B": os.urandom(32)}
    log = []
    relay = fr.Relay(fed, keys, rounds=2, log=log.append)
    return SimpleNamespace(fed=fed, keys=keys, relay=relay, log=log, site_a=tmp_path / "site_A")


def cycles(s, attacker, n=3, known_as=None):
    """``n`` relay cycles; ``known_as``: the attacker authenticated as that site before each cycle."""
    grid = FakeGrid({HONEST: honest_site(s.site_a, s.keys["A"]), ATTACKER: attacker})
    for _ in range(n):
        if known_as:
            s.relay.sites[ATTACKER] = known_as
            s.relay.status[known_as] = {"files": {}, "globals": [], "updates": []}
        fa.relay_cycle(grid, s.relay, reply_timeout=5)
        s.relay.refused_at.clear()  # ask the refused attacker again at once
    return grid


def assert_refused_and_a_served(s, reason: str):
    assert ATTACKER in s.relay.refused and reason in s.relay.refused[ATTACKER], s.relay.refused
    assert any("REFUSED node 2" in line and reason in line for line in s.log), s.log
    assert s.relay.sites == {HONEST: "A"}
    assert (s.site_a / "federation.json").read_bytes() == (s.fed / "federation.json").read_bytes()
    assert (s.site_a / "round_0000" / "global.json").exists()  # A got round 0 in the same cycles


def test_keyless_node_with_deeply_nested_json(setup):
    s = setup
    cycles(s, lambda f, p: record({"site": '"B"', "status": DEEP, "mac": '"00"'}))
    assert_refused_and_a_served(s, "nested deeper")


def test_keyless_node_with_huge_fields(setup):
    s = setup
    huge = json.dumps({"files": {"x" * (2 << 20): "0"}, "globals": [], "updates": []})
    cycles(s, lambda f, p: record({"site": '"B"', "status": huge, "mac": '"00"'}))
    assert_refused_and_a_served(s, "exceeds the limit")


@pytest.mark.parametrize("field, value, reason", [
    ("site", "{}", "not a site name"),
    ("site", "1e999", "not finite"),
    ("status", "NaN", "not allowed"),
    ("mac", "[1, 2]", "not a sha256"),
    ("names", '{"a": 1}', "'names' is not a list"),
    ("extra", '"x"', "unexpected fields"),
])
def test_keyless_node_with_wrong_types_and_non_finite_numbers(setup, field, value, reason):
    s = setup
    fields = {"site": '"B"', "status": '{"files": {}, "globals": [], "updates": []}', "mac": json.dumps("0" * 64)}
    cycles(s, lambda f, p: record({**fields, field: value}))
    assert_refused_and_a_served(s, reason)


def test_node_whose_reply_flower_cannot_read(setup):
    """Flower inflates the reply's objects (JSON metadata the node wrote) inside pull_messages: one node's
    unreadable reply must not cost the other nodes theirs."""
    s = setup

    def unreadable(fields, push):
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
    cycles(s, unreadable)
    assert_refused_and_a_served(s, "unreadable reply")


def test_flower_error_reply_without_group_id_is_logged(setup):
    s = setup
    grid = FakeGrid({HONEST: honest_site(s.site_a, s.keys["A"])})
    pull = grid.pull_messages

    def pull_with_error(ids):  # what Flower returns when a reply's objects never arrived (group_id "")
        if grid.sent[ids[0]].metadata.dst_node_id == HONEST and len(grid.sent) == 1:
            err = SimpleNamespace(code=0, reason="Reply message objects are unavailable")
            return [SimpleNamespace(has_error=lambda: True, has_content=lambda: False, error=err,
                                    metadata=SimpleNamespace(src_node_id=HONEST, group_id="",
                                                             reply_to_message_id=ids[0]))]
        return pull(ids)
    grid.pull_messages = pull_with_error
    for _ in range(3):
        fa.relay_cycle(grid, s.relay, reply_timeout=5)
    assert any("no answer from node 1" in line for line in s.log)
    assert (s.site_a / "round_0000" / "global.json").exists()


@pytest.mark.parametrize("status, reason", [
    ({"files": 5, "globals": [], "updates": []}, "status.files"),
    ({}, "status has keys"),
    ({"files": {}, "globals": "all", "updates": []}, "status.globals"),
    ({"files": {}, "globals": [True], "updates": []}, "status.globals"),
    ({"files": {"../../etc/passwd": "0" * 64}, "globals": [], "updates": []}, "status.files"),
])
def test_key_holder_with_malformed_status(setup, status, reason):
    s = setup
    cycles(s, key_holder(s.keys["B"], status))
    assert_refused_and_a_served(s, reason)
    assert "B" not in s.relay.status


@pytest.mark.parametrize("name", ["round_0001/updates/B.json\n", "fingerprints/B.json\n",
                                  "round_0001/updates/B.json/../../../x.json",
                                  "round_\u0661\u0662\u0663\u0664/updates/B.json"])  # Arabic-Indic digits
def test_key_holder_file_names_are_matched_whole(setup, name):
    s = setup
    cycles(s, key_holder(s.keys["B"], files={name: b"{}"}), known_as="B")
    assert_refused_and_a_served(s, "not its own")
    assert not list(s.fed.rglob("B.json*")) and not (s.fed.parent / "x.json").exists()


def test_key_holder_files_too_large_too_many_or_of_a_round_outside_the_federation(setup, monkeypatch):
    s = setup
    monkeypatch.setattr(fr, "MIN_TENSOR_FILE_BYTES", 1 << 10, raising=False)
    attacks = [({"round_0001/updates/B.safetensors": b"\0" * (2 << 20), "round_0001/updates/B.json": b"{}"},
                "larger than"),
               ({f"round_{r:04d}/updates/B.json": b"{}" for r in range(1, 20)}, "at most 16"),
               ({"round_9999/updates/B.json": b"{}"}, "outside 1..2")]
    for files, reason in attacks:
        cycles(s, key_holder(s.keys["B"], files=files), known_as="B")
        assert_refused_and_a_served(s, reason)
    assert not (s.fed / "round_0001").exists() and not (s.fed / "round_9999").exists()


def test_site_refuses_pushed_names_with_a_trailing_newline(tmp_path):
    key = os.urandom(32)
    push = {"federation.json\n": b"{}"}
    nonce = "ab" * 16
    mac = fr.relay_mac(key, "push", nonce, "A", {"files": fr._digests(push)})
    with pytest.raises(fr.RelayError, match="not a path"):
        fr.site_exchange(tmp_path, "A", key, nonce, push, mac, None)
    assert not list(tmp_path.iterdir())


def test_site_accepts_a_signed_global_larger_than_the_minimum_limit_before_it_knows_the_model(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(fr, "MIN_TENSOR_FILE_BYTES", 1 << 10)
    key, nonce = os.urandom(32), "cd" * 16
    push = {"round_0000/global.safetensors": b"\0" * (2 << 20), "round_0000/global.json": b"{}"}
    mac = fr.relay_mac(key, "push", nonce, "A", {"files": fr._digests(push)})
    status, _, _ = fr.site_exchange(tmp_path, "A", key, nonce, push, mac, None)
    assert status["globals"] == [0]


def test_clientapp_answers_malformed_requests_with_an_error(tmp_path):
    """A compromised SuperLink (or anyone forging requests) gets a refusal, not an exception in the ClientApp."""
    key_file = tmp_path / "A.key"
    key_file.write_text(os.urandom(32).hex())
    context = Context(run_id=1, node_id=5, node_config={"site": "A", "federation-dir": str(tmp_path / "fed"),
                                                        "key-file": str(key_file)}, state=RecordDict(), run_config={})
    for fields in ({"nonce": DEEP}, {"nonce": '"' + "ab" * 16 + '"', "held": '{"updates": "x"}'},
                   {"nonce": '"' + "ab" * 16 + '"', "held": '[1]'}):
        request = Message(record(fields), dst_node_id=5, message_type="query")
        reply = fa.relay_query(request, context)
        got = {k: json.loads(v) for k, v in reply.content["relay"].items()}
        assert set(got) == {"site", "error", "names"} and got["names"] == [], got
    assert not (tmp_path / "fed").exists()


def test_relay_log_is_not_written_through_a_symlink(tmp_path):
    (tmp_path / "fed").mkdir()
    outside = tmp_path / "A.key"
    outside.write_text("secret")
    (tmp_path / "fed" / fa.LOG_FILE).symlink_to(outside)
    fa.RelayLog(tmp_path / "fed")("relay: REFUSED node 2: 'x'")
    assert outside.read_text() == "secret"
    assert "REFUSED node 2" in (tmp_path / "fed" / fa.LOG_FILE).read_text()
    assert not (tmp_path / "fed" / fa.LOG_FILE).is_symlink()


def test_coordinator_folder_oddities_do_not_stop_the_relay_nor_leak_files(setup):
    """A keyless writer of the coordinator's folder: a stray round_x folder, a plan file that is a symlink to a
    key file. The relay goes on, and never sends the key's bytes to a site."""
    s = setup
    (s.fed / "round_x").mkdir()
    (s.fed / "round_x" / "global.json").write_text("{}")
    secret = s.fed.parent / "keys_A.key"
    secret.write_text("the coordinator's key file")
    (s.fed / "plans").mkdir()
    (s.fed / "plans" / "nnUNetPlans.json").symlink_to(secret)
    grid = FakeGrid({HONEST: honest_site(s.site_a, s.keys["A"])})
    for _ in range(3):
        fa.relay_cycle(grid, s.relay, reply_timeout=5)
    assert s.relay.sites == {HONEST: "A"}
    assert not (s.site_a / "plans" / "nnUNetPlans.json").exists()
    assert any("symlink" in line for line in s.log), s.log
