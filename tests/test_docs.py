"""The README and docs/ against the code: every config key documented (and only real ones), every
command's flags accepted by the command it names, every linked page present, the README a front page."""
import contextlib
import dataclasses
import io
import re
import runpy
import shlex
import sys
import warnings
from functools import lru_cache

import pytest
import yaml
from conftest import REPO

from okd.config import default_tree
from okd.methods import METHODS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ROW = re.compile(r"^\| `([a-z_][a-z0-9_.]*)` \| `([^`]*)` \|", re.M)


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def configuration_page():
    """docs/configuration.md as {section: {key: documented default}}; section None: the general keys."""
    text = (REPO / "docs" / "configuration.md").read_text()
    general, _, methods = text.partition("\n## Method options\n")
    sections = {None: general}
    for name, body in re.findall(r"^### `(\w+)`\n(.*?)(?=^### |\Z)", methods, flags=re.M | re.S):
        sections[name] = body
    documented = {}
    for section, body in sections.items():
        rows = ROW.findall(body)
        keys = [k for k, _ in rows]
        assert len(keys) == len(set(keys)), f"a key is listed twice in docs/configuration.md ({section or 'keys'})"
        documented[section] = {k: yaml.safe_load(v) for k, v in rows}
    return documented


def test_every_config_key_is_documented_with_its_default_and_every_documented_key_exists():
    documented = configuration_page()
    general = flatten({k: v for k, v in default_tree("pcl").items() if k != "method"})
    general["method.name"] = "pcl"
    assert set(documented[None]) == set(general), (
        f"docs/configuration.md: missing {sorted(set(general) - set(documented[None]))}, "
        f"not in okd.config {sorted(set(documented[None]) - set(general))}")
    for key, value in general.items():
        assert documented[None][key] == value, f"docs/configuration.md: {key} default {documented[None][key]!r}, code {value!r}"
    assert set(documented) - {None} == set(METHODS.names()), "docs/configuration.md: one '### `name`' section per method"
    for name in METHODS.names():
        # the defaults as the Options dataclass declares them: a null that a method resolves itself
        # (CL's form-dependent temperature) is documented as null, as configs/methods/<name>.yml has it
        options = {f"method.{f.name}": f.default if f.default is not dataclasses.MISSING else f.default_factory()
                   for f in dataclasses.fields(METHODS.get(name).Options)}
        assert set(options) == set(flatten({"method": default_tree(name)["method"]})) - {"method.name"}
        assert set(documented[name]) == set(options), (
            f"docs/configuration.md, method {name}: missing {sorted(set(options) - set(documented[name]))}, "
            f"not an option {sorted(set(documented[name]) - set(options))}")
        for key, value in options.items():
            assert documented[name][key] == value, f"docs/configuration.md, {name}: {key} default {documented[name][key]!r}, code {value!r}"


def test_the_readme_is_a_front_page_with_the_two_commands_that_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    install_and_quickstart = "pip install -r requirements.txt && python main.py --config configs/quickstart.yml"
    install_and_test = "pip install -r requirements-dev.txt && python -m pytest -q"
    assert install_and_quickstart in readme and install_and_test in readme
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert install_and_test.replace("pip install -r", "pip install -q -r") in ci or install_and_test in ci
    # then the slow tests that guard a promise, which the README names too
    assert "python -m pytest -q -m ci" in ci and "python -m pytest -q -m ci" in readme


def test_every_linked_page_and_file_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def shell_commands():
    """(page, command line) of every line of the pages' ```bash blocks, continuation lines joined."""
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                for part in re.split(r"&&|\|\||;|\|", line):
                    if part.strip():
                        yield page.relative_to(REPO), part.strip()


TOOLS = {"main.py": ["main.py"], "okd-train": ["main.py"], "okd-report": ["-m", "okd.report"]}


def tool_and_flags(command):
    """The --help invocation of the command's tool (None if it is no okd tool) and the flags it passes."""
    words = shlex.split(command)
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("/usr/bin/time", "time")):
        words = words[1:]
    if not words:
        return None, []
    if words[0] == "torchrun":
        words = words[words.index("main.py"):] if "main.py" in words else []
    elif words[0] in ("python", "python3"):
        words = words[1:]
    if not words:
        return None, []
    if words[0] == "-m" and words[1].startswith("okd."):
        tool, rest = ["-m", words[1]], words[2:]
        if words[1] in ("okd.results", "okd.table") and rest and not rest[0].startswith("-"):  # a subcommand
            tool, rest = tool + [rest[0]], rest[1:]
    elif words[0] in TOOLS:
        tool, rest = TOOLS[words[0]], words[1:]
    elif re.fullmatch(r"benchmarks/\w+\.py", words[0]):
        tool, rest = [words[0]], words[1:]
    else:
        return None, []
    return tuple(tool), [w.split("=")[0] for w in rest if w.startswith("--")]


@lru_cache(maxsize=None)
def help_text(tool):
    """``TOOL --help``, run in this process (a fresh interpreter per tool would import torch each time)."""
    out, argv, path = io.StringIO(), sys.argv, list(sys.path)
    sys.argv = [tool[1], *tool[2:], "--help"] if tool[0] == "-m" else [tool[0], "--help"]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(), pytest.raises(SystemExit) as done:
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
            if tool[0] == "-m":
                runpy.run_module(tool[1], run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(REPO / tool[0]), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
    assert done.value.code in (0, None), f"{' '.join(tool)} --help exited {done.value.code}"
    return out.getvalue()


def test_every_documented_command_takes_the_flags_it_is_shown_with():
    checked = 0
    for page, command in shell_commands():
        for word in shlex.split(command):  # the repository's configs and scripts it names exist
            path = word.split("=")[-1].removeprefix("./")
            if re.fullmatch(r"(configs/[\w/.-]+\.yml|[\w/-]+\.sh|benchmarks/\w+\.py|main\.py)", path):
                assert (REPO / path).is_file(), f"{page}: `{command}` names a missing {path}"
        tool, flags = tool_and_flags(command)
        if tool is None:
            continue
        text = help_text(tool)
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{page}: `{command}` passes {flag}, which `{' '.join(tool)} --help` does not list")
        checked += 1
    assert checked >= 10
