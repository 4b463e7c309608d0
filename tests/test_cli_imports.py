"""CLI start cost: help and light commands never import torch or nnU-Net (they took minutes on a loaded machine);
a command's module is imported only when that command is parsed, with the same arguments as the full parser."""
import argparse
import json
import subprocess
import sys

import pytest

from nnunet_adpfl import cli

HEAVY = ("torch", "nnunetv2", "opacus")
WATCHED = HEAVY + ("nnunet_adpfl.data.synthetic", "nnunet_adpfl.workflows.compare")


def imported_after(argv: list[str]) -> dict:
    """Runs ``nnunet-adpfl argv`` in a fresh interpreter; returns its exit code and which WATCHED modules it
    loaded."""
    code = ("import json, sys\nfrom nnunet_adpfl.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps({{'rc': rc, 'loaded': [m for m in {WATCHED!r} if m in sys.modules]}}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["recipe", "--help"], ["calibrate", "--help"], ["trainers-path"]])
def test_help_and_light_commands_do_not_import_torch(argv):
    assert imported_after(argv) == {"rc": 0, "loaded": []}


def test_a_command_imports_its_own_module_only():
    """make-dataset loads the generator's module (the check sees what is loaded), not compare's, nor torch."""
    assert imported_after(["make-dataset", "--help"]) == {"rc": 0, "loaded": ["nnunet_adpfl.data.synthetic"]}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in action._choices_actions}
    return {name: (helps[name], sub) for name, sub in action.choices.items()}


def _arguments(parser: argparse.ArgumentParser) -> list:
    """Every option of a parser and its nested subcommands (names, defaults, choices, help)."""
    out = [(a.option_strings, a.dest, repr(a.default), a.choices if not isinstance(a.choices, dict) else None, a.help)
           for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if nested:
        out += [(name, help_line, _arguments(sub)) for name, (help_line, sub) in _subcommands(parser).items()]
    return out


def test_lazy_parser_lists_every_command_with_the_modules_help_and_arguments():
    full = _subcommands(cli.build_parser())
    light = _subcommands(cli.build_parser(None))
    assert list(light) == list(full)  # same commands, same order
    assert {name: h for name, (h, _) in light.items()} == {name: h for name, (h, _) in full.items()}
    for module, helps in cli.COMMAND_MODULES:
        name = next(iter(helps))
        one = _subcommands(cli.build_parser(name))
        assert list(one) == list(full)
        for command in helps:  # the command's module defines all of its commands, as in the full parser
            assert _arguments(one[command][1]) == _arguments(full[command][1]), command
