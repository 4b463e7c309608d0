"""The Flower apps of the network transport: a ServerApp (coordinator) and a ClientApp (each site's SuperNode).

The ServerApp runs the unchanged Aggregator on the coordinator's federation folder (in a thread; run config
``aggregate = false`` leaves that to a separate ``nnunet-adpfl aggregate``) and loops: one short ``query``
message per connected node and cycle (pushed with a TTL, never blocking a ClientApp for a round; each reply
pulled and checked on its own), built by flower_relay.Relay; it stops when every site holds the last round's
global model. Whatever a peer sends is refused with a logged reason if malformed (flower_checks.py).
The ClientApp answers from the site's local folder (node config: site, federation-dir, key-file); it keeps no
state, so SuperNode, ClientApp, ServerApp and SuperLink can each be restarted.

Run config (the FAB's pyproject, written by ``nnunet-adpfl flower app``): federation-dir, keys-dir, aggregate,
poll-interval, reply-timeout, max-wait-s (0: no limit).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..common.atomic import append_line_in, write_bytes_in
from .flower_checks import MAX_FILES_PER_MESSAGE, RelayError, parse_field, text
from .flower_relay import FEDERATION_FILE, Relay, site_exchange
from .keys import load_key

MESSAGE_TYPE = "query"
STATS_FILE = "relay_stats.json"
LOG_FILE = "relay.log"


# ---- wire format: a ConfigRecord of small fields, an ArrayRecord of raw byte strings ------------------
def pack(fields: dict, files: dict[str, bytes]) -> RecordDict:
    names = list(files)
    record = ConfigRecord({k: json.dumps(v, allow_nan=False) for k, v in {**fields, "names": names}.items()})
    arrays = ArrayRecord({f"f{i}": Array(dtype="uint8", shape=(len(files[n]),), stype="raw", data=files[n])
                          for i, n in enumerate(names)})
    return RecordDict({"relay": record, "files": arrays})


def unpack(content, fields_expected: set[str]) -> tuple[dict, dict[str, bytes]]:
    """Fields and files of a relay message from a peer; RelayError for anything malformed, never another
    exception: each field is bounded JSON (flower_checks.parse_field), the names a list of strings, one raw
    byte array per name. Fields outside ``fields_expected`` are refused."""
    if not isinstance(content, RecordDict) or not isinstance(content.get("relay"), ConfigRecord):
        raise RelayError("no 'relay' ConfigRecord in the message")
    raw = dict(content["relay"])
    unknown = set(raw) - fields_expected - {"names"}
    if unknown:
        raise RelayError(f"unexpected fields {sorted(str(k)[:40] for k in unknown)[:5]}")
    fields = {k: parse_field(k, v) for k, v in raw.items()}
    names = fields.pop("names", [])
    if not isinstance(names, list) or len(names) > MAX_FILES_PER_MESSAGE or \
            not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise RelayError(f"'names' is not a list of at most {MAX_FILES_PER_MESSAGE} distinct file names")
    arrays = content.get("files", ArrayRecord())
    if not isinstance(arrays, ArrayRecord) or set(arrays) != {f"f{i}" for i in range(len(names))}:
        raise RelayError("the file arrays do not match 'names'")
    files = {}
    for i, name in enumerate(names):
        array = arrays[f"f{i}"]
        if not isinstance(array, Array) or not isinstance(array.data, bytes):
            raise RelayError(f"file {name[:80]!r} is not a byte array")
        files[name] = array.data
    return fields, files


# ---- ClientApp ---------------------------------------------------------------------------------------
client_app = ClientApp()
REQUEST_FIELDS = {"nonce", "push_mac", "held"}
REPLY_FIELDS = {"site", "status", "mac", "error"}


@client_app.query()
def relay_query(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    site, fed = str(cfg["site"]), Path(str(cfg["federation-dir"]))
    try:
        fields, push = unpack(msg.content, REQUEST_FIELDS)
        key = load_key(str(cfg["key-file"]))
        status, files, mac = site_exchange(fed, site, key, fields.get("nonce"), push, fields.get("push_mac"),
                                           fields.get("held"))
        reply = {"site": site, "status": status, "mac": mac}
    except (RelayError, OSError, ValueError) as e:  # UnsafeInput is a ValueError
        print(f"site {site}: relay request refused: {e}", flush=True)
        reply, files = {"site": site, "error": str(e)[:2000]}, {}
    return Message(pack(reply, files), reply_to=msg)


# ---- ServerApp ---------------------------------------------------------------------------------------
server_app = ServerApp()


class RelayLog:
    """relay.log in the coordinator's folder, appended without following a symlink (one planted there is removed)."""

    def __init__(self, fed: Path):
        self.fed = Path(fed)

    def __call__(self, msg: str) -> None:
        line = f"[relay {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}] {msg}"
        print(line, flush=True)
        append_line_in(self.fed, self.fed / LOG_FILE, line + "\n")


def _start_aggregator(fed: Path, keys_dir: Path, log, failures: list) -> threading.Thread:
    from .aggregator import Aggregator, plans_files

    def run() -> None:
        try:
            while not plans_files(fed)[0].exists():  # before 'nnunet-adpfl plan' the relay only moves fingerprints
                time.sleep(1)
            Aggregator(fed, keys_dir, poll_interval=1.0, log=lambda m: log(f"aggregator: {m}")).run()
        except BaseException as e:  # reported by the relay loop, which then stops
            failures.append(e)

    thread = threading.Thread(target=run, name="aggregator", daemon=True)
    thread.start()
    return thread


def _write_stats(fed: Path, relay: Relay, start: float, cycles: int, messages: int) -> None:
    stats = {"seconds": round(time.time() - start, 3), "cycles": cycles, "messages": messages,
             "bytes_pushed": relay.bytes_pushed, "bytes_pulled": relay.bytes_pulled,
             "sites": sorted(set(relay.sites.values())), "refused_nodes": {str(k): v for k, v in relay.refused.items()}}
    write_bytes_in(fed, fed / STATS_FILE, json.dumps(stats, indent=2).encode())


def relay_cycle(grid: Grid, relay: Relay, reply_timeout: float, poll: float = 1.0) -> int:
    """One request to every connected node, replies handled; returns the number of messages sent.
    A peer's reply is pulled and handled on its own: one that cannot be read or fails a check is refused and
    logged, and the other nodes' replies are handled as usual (nothing a peer sends ends the cycle)."""
    messages = {}
    for node in (n for n in sorted(grid.get_node_ids()) if relay.may_ask(n)):
        try:
            fields, push = _split(relay.request(node))
        except (OSError, ValueError) as e:  # the coordinator's own folder (UnsafeInput is a ValueError)
            relay.log(f"relay: no request for node {node} this cycle: {e}")
            relay.pending.pop(node, None)
            continue
        messages[node] = Message(pack(fields, push), dst_node_id=node, message_type=MESSAGE_TYPE,
                                 ttl=reply_timeout + 30)
    ids = list(grid.push_messages(list(messages.values()))) if messages else []
    waiting = {mid: node for mid, node in zip(ids, messages) if mid}
    deadline = time.time() + reply_timeout
    while waiting and time.time() < deadline:
        for mid, node in list(waiting.items()):
            try:
                replies = list(grid.pull_messages([mid]))
            except Exception as e:  # noqa: BLE001 (a reply Flower cannot inflate: the node's, not ours)
                relay.refuse(node, f"unreadable reply: {type(e).__name__}: {str(e)[:300]}")
                waiting.pop(mid)
                continue
            if replies:
                waiting.pop(mid)
                _handle(relay, node, replies[0])
        if waiting:
            time.sleep(poll)
    for node in messages:  # no reply in time: asked again next cycle
        relay.pending.pop(node, None)
    return len(messages)


def _handle(relay: Relay, node: int, reply: Message) -> None:
    if reply.has_error() or not reply.has_content():
        why = f"{reply.error.code}: {reply.error.reason}" if reply.has_error() else "empty reply"
        relay.log(f"relay: no answer from node {node}: {text(why)}")
        return
    if reply.metadata.src_node_id != node:  # the SuperLink authenticated the sender: it must be the addressee
        relay.refuse(reply.metadata.src_node_id, f"answered a request sent to node {node}")
        return
    try:
        fields, files = unpack(reply.content, REPLY_FIELDS)
    except RelayError as e:
        relay.refuse(node, f"malformed reply: {e}")
        return
    if "error" in fields:
        relay.log(f"relay: site {text(fields.get('site'))} (node {node}) refused our request: "
                  f"{text(fields['error'])}")
        return
    try:
        relay.handle_reply(node, fields.get("site"), fields.get("status"), files, fields.get("mac"))
    except (OSError, ValueError) as e:  # writing to the coordinator's folder (UnsafeInput is a ValueError)
        relay.log(f"relay: files of node {node} not written: {e}")


def _split(request: dict) -> tuple[dict, dict[str, bytes]]:
    return {k: v for k, v in request.items() if k != "push"}, request["push"]


@server_app.main()
def relay_main(grid: Grid, context: Context) -> None:
    from .aggregator import load_federation, load_site_keys

    rc = context.run_config
    fed, keys_dir = Path(str(rc["federation-dir"])), Path(str(rc["keys-dir"]))
    if not (fed / FEDERATION_FILE).exists():
        raise FileNotFoundError(f"{fed / FEDERATION_FILE} not found ('nnunet-adpfl federation init' first)")
    log = RelayLog(fed)
    cfg = load_federation(fed)
    relay = Relay(fed, load_site_keys(keys_dir, cfg["sites"]), cfg["rounds"], log)
    failures: list = []
    aggregator = _start_aggregator(fed, keys_dir, log, failures) if rc.get("aggregate", True) else None
    poll, reply_timeout = float(rc.get("poll-interval", 1.0)), float(rc.get("reply-timeout", 60.0))
    max_wait = float(rc.get("max-wait-s", 0))
    start, cycles, messages = time.time(), 0, 0
    log(f"relay started for federation {cfg['id']} ({cfg['sites']}, {cfg['rounds']} rounds) on {fed}")
    while True:
        if failures:
            raise RuntimeError(f"the aggregator stopped: {failures[0]!r}")
        messages += relay_cycle(grid, relay, reply_timeout)
        cycles += 1
        if cycles % 10 == 0:
            _write_stats(fed, relay, start, cycles, messages)
        if relay.finished() and (aggregator is None or not aggregator.is_alive()):
            break
        if max_wait and time.time() - start > max_wait:
            _write_stats(fed, relay, start, cycles, messages)
            raise TimeoutError(f"relay: federation not finished after {max_wait:.0f} s")
        time.sleep(poll)
    _write_stats(fed, relay, start, cycles, messages)
    log(f"relay finished: every site holds the global model of round {cfg['rounds']} "
        f"({relay.bytes_pushed:,} bytes pushed, {relay.bytes_pulled:,} pulled, {messages} messages)")
