"""max_physical_batch_size 'auto': the largest chunk of cases whose estimated memory fits the bound."""
import pytest
import torch

from nnunet_adpfl.common.config import SettingsError, load_settings
from nnunet_adpfl.privacy import per_case_grads
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients, case_bytes, default_memory_limit_mib
from tests.test_per_case_grads import engine_grads, setup


def _engine(engine="hooks", chunk="auto", limit=None, batch=5):
    net, x, y, loss = setup(2, False, True, False, batch=batch, dtype=torch.float32)
    params = {n: p for n, p in net.named_parameters() if "seg_layers.0" not in n}
    return PerCaseGradients(net, loss.per_case, params, engine, chunk, memory_limit_mib=limit), net, x, y, loss


def test_auto_chunk_is_the_most_cases_that_fit_the_bound_and_gives_the_same_gradients():
    pc, net, x, y, loss = _engine()
    one = case_bytes(net, loss.per_case, pc.params, x[:1], [t[:1] for t in y])
    pc.memory_limit_mib = 2.5 * one / 2 ** 20  # room for two and a half cases
    sizes = [grads[0].shape[0] for grads, _ in pc.chunks(x, y)]
    assert pc.chunk_size == 2 and sizes == [2, 2, 1]
    got = torch.cat([torch.cat([g.flatten(1) for g in grads], 1) for grads, _ in pc.chunks(x, y)])
    torch.testing.assert_close(got, engine_grads("hooks", net, loss, dict(zip(pc.names, pc.params)), x, y, chunk=5))


def test_case_bytes_count_activations_and_per_case_gradients_not_data():
    pc, net, x, y, loss = _engine()
    y1 = [t[:1] for t in y]
    small = case_bytes(net, loss.per_case, pc.params, x[:1], y1)
    assert case_bytes(net, loss.per_case, pc.params, 100 * x[1:2], [t[1:2] for t in y]) == small  # shape only
    big_x = torch.zeros(1, x.shape[1], 2 * x.shape[2], 2 * x.shape[3])
    with torch.no_grad():
        big_y = [torch.zeros(1, 1, *o.shape[2:]) for o in net(big_x)]
    grads = sum(p.numel() * 4 for p in pc.params) * per_case_grads.GRAD_COPIES * per_case_grads.PEAK_MARGIN
    # 4x the pixels: 4x the saved activations, the same per-case gradients
    assert case_bytes(net, loss.per_case, pc.params, big_x, big_y) - grads == pytest.approx(4 * (small - grads),
                                                                                            rel=0.05)
    assert small > grads


def test_explicit_chunk_wins_loop_is_one_case_and_bad_values_are_refused():
    pc = _engine(chunk=3, limit=1e-6)[0]
    list(pc.chunks(*_engine()[2:4]))
    assert pc.chunk_size == 3
    loop, _, x, y, _ = _engine("loop", limit=1e9)
    list(loop.chunks(x, y))
    assert loop.chunk_size == 1
    tiny, _, x, y, _ = _engine(limit=1e-6)
    assert [g[0].shape[0] for g, _ in tiny.chunks(x, y)] == [1] * 5  # never below one case
    for bad in (0, "big", 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            _engine(chunk=bad)
    with pytest.raises(SettingsError, match="'auto' or an integer >= 1"):
        load_settings(overrides={"max_physical_batch_size": 0, "noise_multiplier": 1.0})
    assert load_settings(overrides={"noise_multiplier": 1.0})["max_physical_batch_size"] == "auto"


def test_default_memory_limit_is_a_quarter_of_available_ram_on_cpu():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    assert default_memory_limit_mib(torch.device("cpu")) == pytest.approx(0.25 * available, rel=0.2)


def test_without_proc_meminfo_the_limit_falls_back_and_auto_chunks_still_run(monkeypatch):
    real_open = open

    def no_proc(path, *args, **kwargs):  # macOS (and -device mps) has no /proc
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert default_memory_limit_mib(torch.device("cpu")) == per_case_grads.AUTO_FALLBACK_MIB
    pc, net, x, y, loss = _engine()
    assert sum(g[0].shape[0] for g, _ in pc.chunks(x, y)) == 5 and pc.chunk_size >= 1


def test_auto_chunk_on_cpu_stays_within_the_throughput_cap_however_much_memory_is_allowed(monkeypatch):
    pc, net, x, y, loss = _engine(limit=1e9, batch=6)
    one = case_bytes(net, loss.per_case, pc.params, x[:1], [t[:1] for t in y])
    monkeypatch.setattr(per_case_grads, "AUTO_CPU_CHUNK_MIB", 3.5 * one / 2 ** 20)  # room for three and a half
    assert [g[0].shape[0] for g, _ in pc.chunks(x, y)] == [3, 3] and pc.chunk_size == 3


def test_the_settings_reference_states_the_cpu_cap():
    from nnunet_adpfl.common.config import SETTINGS
    assert f"{per_case_grads.AUTO_CPU_CHUNK_MIB} MiB" in SETTINGS["max_physical_batch_size"].doc
