"""The documentation matches the code: the generated reference pages are current, every `nnunet-adpfl` command
and option the README and docs/ show exists in the CLI's parser, every settings snippet uses known keys, every
trainer named exists, and every relative link (with its #anchor) and every repository path named resolves."""
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# JSON objects in code that are not settings files: their top-level keys
OTHER_JSON = [{"sites"}]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


@pytest.fixture(scope="module")
def parsers(generator):
    """'federation init' -> its argparse parser, for every command and subcommand."""
    return {" ".join(words): sub for words, sub, _ in generator.commands()}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _code(text: str, blocks_only: bool = False) -> list[str]:
    """Code blocks (backslash continuations joined) and inline code spans of a Markdown text."""
    blocks = [b.replace("\\\n", " ") for b in CODE_BLOCK.findall(text)]
    return blocks if blocks_only else blocks + INLINE_CODE.findall(CODE_BLOCK.sub("", text))


def _command_lines(text: str, blocks_only: bool = False):
    """Each `nnunet-adpfl ...` invocation in the page's code, as its shell words up to the end of the command."""
    for code in _code(text, blocks_only):
        for line in code.splitlines():
            for start in [m.start() for m in re.finditer(r"(?<![\w/-])nnunet-adpfl ", line)]:
                before = line[:start].rstrip()
                if before and not (before.endswith(("&&", ";", "|", "(", "$", "#", ":")) or "#" in before
                                   or re.search(r"(^|\s)\w+=\S*$", before)):
                    continue  # an argument of another command (flwr run APP nnunet-adpfl), not a command
                lexer = shlex.shlex(line[start:], posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                words = []
                try:
                    for word in lexer:
                        if word in ("&&", "||", "|", ";", "&", ")", "(", ">", "<"):
                            break
                        words.append(word)
                except ValueError:  # an unclosed quote: the snippet continues in prose
                    pass
                yield words[1:]


def _resolve(words: list[str], parsers) -> tuple[str, list[str]]:
    """The longest command name the words start with, and the words after it."""
    for n in (2, 1):
        name = " ".join(words[:n])
        if len(words) >= n and name in parsers:
            return name, words[n:]
    return "", words


def _assert_current(generator, pages):
    stale = generator.stale(pages)
    assert not stale, (f"docs/reference/{', docs/reference/'.join(stale)} differ from the code; regenerate with: "
                       f"{generator.REGENERATE}")


def test_the_generated_reference_pages_are_current(generator):
    _assert_current(generator, generator.pages(slow=False))


@pytest.mark.slow
def test_the_generated_dp_defaults_examples_are_current(generator):
    """A noise calibration per candidate (minutes on 2 cores), so in the slow suite only."""
    _assert_current(generator, {name: text for name, text in generator.pages().items() if name in generator.SLOW_PAGES})


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_and_option_shown_exists(page, parsers):
    if "reference" in page.parts:
        return  # written from the parser itself
    problems = []
    for words in _command_lines(page.read_text()):
        if not words or words[0].startswith(("<", "...")):
            continue
        name, rest = _resolve(words, parsers)
        if not name:
            problems.append(f"unknown command: nnunet-adpfl {' '.join(words[:2])}")
            continue
        known = {o for a in parsers[name]._actions for o in a.option_strings}
        for word in rest:
            option = word.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", option) and option not in known:
                problems.append(f"nnunet-adpfl {name}: no option {option}")
    assert not problems, f"{_rel(page)}: " + "; ".join(sorted(set(problems)))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_command_in_a_code_block_gives_its_required_options(page, parsers):
    """A whole command shown in a code block can be copied: it names every required option (inline mentions in
    prose may show a part)."""
    problems = []
    for words in _command_lines(page.read_text(), blocks_only=True):
        name, rest = _resolve(words, parsers)
        if not name or "reference" in page.parts:
            continue
        given = {w.split("=", 1)[0] for w in rest}
        for action in parsers[name]._actions:
            if action.required and action.option_strings and not given & set(action.option_strings):
                problems.append(f"nnunet-adpfl {name} without {action.option_strings[-1]}")
    assert not problems, f"{_rel(page)}: " + "; ".join(sorted(set(problems)))


def _json_objects(code: str):
    """The outermost JSON objects in a code text."""
    start = code.find('{"')
    while start >= 0:
        depth, end = 0, None
        for i, ch in enumerate(code[start:], start):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                end = i + 1
                break
        try:
            obj = json.loads(code[start:end]) if end else None
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        start = code.find('{"', end if isinstance(obj, dict) else start + 1)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_settings_snippet_uses_known_keys(page):
    from nnunet_adpfl.common.config import SETTINGS, load_settings

    problems = []
    for code in _code(page.read_text()):
        for obj in _json_objects(code):
            if any(set(obj) <= other for other in OTHER_JSON):
                continue
            unknown = sorted(set(obj) - set(SETTINGS))
            if unknown:
                problems.append(f"unknown settings {unknown} in {json.dumps(obj)}")
                continue
            try:
                load_settings("", obj)
            except ValueError as e:
                problems.append(f"{json.dumps(obj)}: {e}")
    assert not problems, f"{_rel(page)}: " + "; ".join(problems)


def _trainer_names() -> set[str]:
    """The classes the trainers folder (nnUNet_extTrainer) defines or exports, and nnU-Net's own."""
    names = {"nnUNetTrainer"}
    for module in (REPO / "trainers").glob("*.py"):
        for defined, imported in re.findall(r"^class (nnUNetTrainer\w+)|^from \S+ import (nnUNetTrainer\w+)",
                                            module.read_text(), re.M):
            names.add(defined or imported)
    return names


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_trainer_named_exists(page):
    known = _trainer_names()
    named = set(re.findall(r"\bnnUNetTrainer\w*", page.read_text()))
    # the audit trainer's results folder is named after the audited trainer: <trainer>Audit__...
    unknown = {n for n in named - known if not n.endswith("Audit") and n.split("__")[0] not in known}
    assert not unknown, f"{_rel(page)} names trainers that do not exist: {sorted(unknown)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_and_anchor_resolves(page):
    problems = []
    for target in LINK.findall(CODE_BLOCK.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    assert not problems, f"{_rel(page)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_named_exists(page):
    """`docs/X.md`, `scripts/x.py`, `tests/test_x.py::name`, `nnunet_adpfl/...` in code spans are real files."""
    problems = []
    for code in _code(page.read_text()):
        for path in re.findall(r"(?<![\w/.-])((?:docs|scripts|tests|nnunet_adpfl|trainers)/[\w./-]*\w)", code):
            if not (REPO / path.replace("nnunet_adpfl/ext_trainers", "trainers")).exists():
                problems.append(path)
    assert not problems, f"{_rel(page)} names paths that do not exist: {sorted(set(problems))}"


def test_every_privacy_report_field_the_audit_guide_lists_is_written_by_the_code():
    """The report's fields live in several modules (report.py and each trainer's extra), so the guide's table is
    written by hand; each field it names must be a key the package writes."""
    text = (REPO / "docs" / "AUDIT.md").read_text()
    table = text[text.index("## Read the privacy report"):text.index("## Audit the mechanism")]
    fields = {f for row in re.findall(r"^\| (.+?) \|", table, re.M) for f in re.findall(r"`(\w+)`", row)}
    code = "".join(p.read_text() for p in (REPO / "nnunet_adpfl").rglob("*.py"))
    missing = sorted(f for f in fields if f'"{f}"' not in code)
    assert fields and not missing, f"docs/AUDIT.md lists privacy report fields the code never writes: {missing}"
