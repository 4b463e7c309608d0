import json
import os

import pytest

from nnunet_adpfl.common.config import ENV_VAR, SETTINGS, SettingsError, load_settings


def test_defaults_without_file(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    s = load_settings()
    assert s["target_epsilon"] == 8.0 and s["delta"] == 1e-5 and s["accountant"] == "rdp"
    assert set(s) == set(SETTINGS)


def test_file_from_env(tmp_path, monkeypatch):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"target_epsilon": 3, "max_grad_norm": 0.5, "log_alignment": True, "accountant": "prv"}))
    monkeypatch.setenv(ENV_VAR, str(f))
    s = load_settings()
    assert s["target_epsilon"] == 3.0 and isinstance(s["target_epsilon"], float)
    assert s["max_grad_norm"] == 0.5 and s["log_alignment"] is True and s["accountant"] == "prv"


@pytest.mark.parametrize("content,match", [
    ({"target_epsilom": 3}, "unknown setting"),
    ({"delta": 0}, "delta"),
    ({"delta": 1.5}, "delta"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"max_grad_norm": "1"}, "max_grad_norm' must be a number, got '1'$"),
    ({"adpfl_clip_max_ratio": 0.5}, "adpfl_clip_max_ratio' must be >= 1"),
    ({"expected_batch_size": 2.5}, "expected_batch_size"),
    ({"expected_batch_size": True}, "expected_batch_size"),
    ({"accountant": "gdp"}, "accountant"),
    ({"log_alignment": 1}, "log_alignment"),
    ({"target_epsilon": None}, "target_epsilon, noise_multiplier"),
    ({"max_grad_norm": None}, "may not be null"),
    ({"seed": 2 ** 64}, "'seed' must be >= 0 and < 2\\*\\*64"),  # torch.manual_seed would overflow mid-start
    ({"noise_seed": -1}, "'noise_seed' must be >= 0 and < 2\\*\\*64"),
])
def test_bad_values_are_named(tmp_path, content, match):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(content))
    with pytest.raises(SettingsError, match=match):
        load_settings(str(f))


def test_unreadable_files(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(SettingsError, match="JSON object"):
        load_settings(str(bad))


def test_noise_multiplier_alone_is_allowed():
    s = load_settings("", {"target_epsilon": None, "noise_multiplier": 1.3})
    assert s["noise_multiplier"] == 1.3 and s["target_epsilon"] is None


def test_every_setting_is_documented_in_the_settings_reference():
    from pathlib import Path
    reference = (Path(__file__).parents[1] / "docs" / "reference" / "settings.md").read_text()
    missing = [k for k, s in SETTINGS.items() if f"| `{k}` |" not in reference or not s.doc.strip()]
    assert not missing, f"settings without a description in docs/reference/settings.md: {missing}"


@pytest.mark.parametrize("bad", [{"morph_kernel": 4}, {"morph_operation": "dilate"}, {"morph_classes": [0]},
                                 {"morph_classes": [True]}, {"clipping_rule": "batch"},
                                 {"morph_thin_threshold": 0.8, "morph_thick_threshold": 0.5}])
def test_bad_morph_settings_are_refused(bad):
    with pytest.raises(SettingsError):
        load_settings("", bad)


def test_unknown_key_names_the_nearest_known_one():
    with pytest.raises(SettingsError, match=r"did you mean 'noise_multiplier' \(not 'noise_multipler'\)\?") as e:
        load_settings("", {"noise_multipler": 1.0, "zzz": 1})
    assert "not 'zzz'" not in str(e.value)  # nothing close: no guess


NUMERIC_KEYS = [k for k, s in SETTINGS.items()
                if {int, float} & set(s.kind if isinstance(s.kind, tuple) else (s.kind,))]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "NaN", "1e999", "1" + "0" * 400])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, key, token):
    f = tmp_path / "s.json"
    other = "target_epsilon" if key == "noise_multiplier" else "noise_multiplier"
    f.write_text(f'{{"{other}": 1.0, "{key}": {token}}}')
    with pytest.raises(SettingsError, match=f"setting '{key}' must be") as e:
        load_settings(str(f))
    assert "\n" not in str(e.value)


def test_an_integer_literal_beyond_pythons_limit_names_the_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"max_grad_norm": 1' + "0" * 5000 + "}")
    with pytest.raises(SettingsError, match="is not valid JSON"):
        load_settings(str(f))


def test_repeated_keys_are_refused(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"target_epsilon": 1, "delta": 1e-6, "target_epsilon": 100}')
    with pytest.raises(SettingsError, match=r"\['target_epsilon'\] appear more than once"):
        load_settings(str(f))


def test_folders_unreadable_and_non_utf8_files_give_one_line(tmp_path):
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(str(tmp_path))
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(str(binary))
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.json"
        locked.write_text("{}")
        locked.chmod(0)
        with pytest.raises(SettingsError, match="cannot be read"):
            load_settings(str(locked))


def test_an_empty_settings_variable_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    with pytest.raises(SettingsError, match="set but empty"):
        load_settings()
    assert load_settings("", {"noise_multiplier": 1.0})["noise_multiplier"] == 1.0  # "" passed in: no file
