"""The user-facing docs point at things that exist: every relative link and
#anchor in the repository's markdown resolves, the proxy's flags and error
kinds quoted in docs/proxy.md are the ones the code has, every command line
of ours in the docs and examples uses real flags, and docs/cli.md documents
each subcommand's flags and quotes no others."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = sorted(
    p for p in ROOT.rglob("*.md")
    if not any(part.startswith(".") or part in ("node_modules", "demo-work") for part in p.relative_to(ROOT).parts)
)
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", path.read_text()))
    bad = []
    for m in _LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
            continue
        file_part, _, frag = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{frag} in {dest.name}")
    return bad


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Several cores: `--workers N`\n\n## Port plan\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md#several-cores---workers-n) [ok](b.md#port-plan) [ok](#top)\n"
        "# Top\n[gone](c.md) [bad anchor](b.md#ports) `[in code](x.md)`\n"
        "```\n[in a fence](y.md)\n```\n[web](https://example.com/z.md)\n"
    )
    assert broken_links(tmp_path / "a.md") == [
        "c.md: no such file", "b.md#ports: no heading with anchor #ports in b.md"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def _proxy_flags() -> set[str]:
    from vllm_ascend_pd.proxy.config import build_parser

    flags: set[str] = set()
    for action in build_parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            flags.update(action.option_strings)
    return flags


def test_proxy_doc_quotes_only_real_flags():
    text = (ROOT / "docs" / "proxy.md").read_text()
    quoted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    # py-spy's flag, quoted where the doc says how the proxy was profiled.
    assert quoted - _proxy_flags() == {"--native"}


def test_proxy_doc_mentions_every_flag():
    text = (ROOT / "docs" / "proxy.md").read_text()
    from vllm_ascend_pd.proxy.config import build_parser

    missing = [a.option_strings[0] for a in build_parser()._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction)
               and not any(re.search(re.escape(o) + r"(?![\w-])", text) for o in a.option_strings)]
    assert missing == [], "document these proxy flags in docs/proxy.md"


def test_proxy_doc_lists_every_error_kind():
    from vllm_ascend_pd.proxy.metrics import ERROR_KINDS

    text = (ROOT / "docs" / "proxy.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `vllm_pd_proxy_errors_total`"))
    listed = re.findall(r"`(\w+)`", row.split("`kind`:", 1)[1])
    assert listed == list(ERROR_KINDS)


# --- Command lines: every flag the docs pass to one of our commands exists ---

def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _commands() -> dict[str, dict[str, argparse.Action]]:
    """The options of each of our command lines: `vllm-ascend-pd SUB` and the proxy."""
    from vllm_ascend_pd.cli import build_parser as cli_parser
    from vllm_ascend_pd.proxy.config import build_parser as proxy_parser

    subs = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: _options(p) for name, p in subs.choices.items()}
    commands["proxy"] = _options(proxy_parser())  # `vllm-ascend-pd proxy` hands over its argv
    return commands


# How the docs invoke them; group 1 names the parser (None: the proxy).
_INVOCATION = re.compile(
    r"(?:(?<![\w-])vllm-ascend-pd|-m vllm_ascend_pd\.cli)\s+([a-z]+)"
    r"|(?:(?<![\w-])p2p-disagg-proxy|-m vllm_ascend_pd\.proxy|p2p_disagg_proxy\.py)(?![\w-])")
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def _command_lines(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined) and inline code spans."""
    lines = []
    for block in _FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()[1:-1]
    lines += [span.strip("`") for span in _CODE.findall(_FENCE.sub("", text))]
    return lines


def flag_problems(text: str, commands: dict[str, dict[str, argparse.Action]]) -> list[str]:
    """Flags given to our commands in ``text`` that their parsers do not have,
    and literal values outside a flag's choices."""
    bad = []
    for line in _command_lines(text):
        if line.lstrip().startswith("#"):  # printed output, not a command
            continue
        for m in _INVOCATION.finditer(line):
            name = m.group(1) or "proxy"
            rest = re.split(r"\s#|\||&&|;", line[m.end():])[0]
            if name not in commands:
                if _FLAG.search(rest):  # a command line, not prose naming the package
                    bad.append(f"{m.group(0)}: no such command")
                continue
            try:
                tokens = shlex.split(rest)
            except ValueError:
                tokens = rest.split()
            bad += _check_tokens(name, tokens, commands)
    return bad


def _check_tokens(name: str, tokens: list[str], commands) -> list[str]:
    options, bad = commands[name], []
    for i, token in enumerate(tokens):
        token = token.strip("[]")
        if token == "--":  # `up`: the rest goes to vLLM
            break
        if not _FLAG.match(token):
            continue
        flag, eq, value = token.partition("=")
        action = options.get(flag)
        if action is None:
            bad.append(f"{name}: no flag {flag}")
            continue
        if not eq:
            value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if flag == "--proxy-arg" and value:
            bad += _check_tokens("proxy", [value], commands)
        elif action.choices and re.fullmatch(r"[a-z_]+", value) and value not in action.choices:
            bad.append(f"{name}: {flag} {value} is not one of {sorted(action.choices)}")
    return bad


def test_the_flag_checker_finds_unknown_flags_and_choices():
    commands = _commands()
    text = (
        "```bash\n.venv/bin/vllm-ascend-pd up --model m --gpus 2 \\\n    --prefill 1 -- --dtype float32\n"
        "# [up] started prefill-0 --not-a-flag\n"
        "p2p-disagg-proxy --port 8000 --policy fastest  # --comment\n```\n"
        "Run `vllm-ascend-pd doctor --kv-port P --reach-all` or `vllm-ascend-pd launch --model m`;"
        " `vllm-ascend-pd up --proxy-arg=--workers=2 --proxy-arg=--worker=2`,"
        " `python -m vllm_ascend_pd.proxy --prefill ... --decode ... --no-such`."
        " Install the same vllm-ascend-pd version on both.\n")
    assert flag_problems(text, commands) == [
        "up: no flag --gpus",
        "proxy: --policy fastest is not one of "
        "['least_requests', 'least_tokens', 'prefix_affinity', 'round_robin']",
        "doctor: no flag --reach-all",
        "vllm-ascend-pd launch: no such command",
        "proxy: no flag --worker",
        "proxy: no flag --no-such",
    ]


MARKDOWN_AND_EXAMPLES = MARKDOWN + sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("path", MARKDOWN_AND_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_in_the_docs_use_real_flags(path):
    text = path.read_text()
    if path.suffix == ".py":  # the module docstring, as a code block
        text = "```\n" + (ast.get_docstring(ast.parse(text)) or "") + "\n```\n"
    assert flag_problems(text, _commands()) == []


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's text per subcommand section (`## \\`up\\`...`)."""
    text = (ROOT / "docs" / "cli.md").read_text()
    parts = re.split(r"^## `([a-z]+)`.*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _vllm_flags_up_passes() -> set[str]:
    """vLLM's flags that `up` itself puts on the instances' command lines, or
    leaves to the user (the memory flags)."""
    from vllm_ascend_pd.cli.topology import MEMORY_FLAGS, make_plan

    flags = set(MEMORY_FLAGS)
    for device in ("cpu", "npu"):
        plan = make_plan(model="m", n_prefill=1, n_decode=1, device=device, proxy_port=0, env={})
        flags.update(a for i in plan.instances for a in i.argv if _FLAG.fullmatch(a))
    return flags


def test_cli_doc_sections_quote_only_their_commands_flags():
    commands, sections = _commands(), _cli_sections()
    assert sorted(sections) == sorted(commands)
    allowed = {"up": _vllm_flags_up_passes(), "proxy": set(), "doctor": set(), "demo": set()}
    bad = {}
    for name, text in sections.items():
        unknown = set()
        for span in _CODE.findall(_FENCE.sub("", text)):
            words = span.strip("`").split()
            if not words:
                continue
            span = " ".join(words)
            # `doctor --reach` in the up section speaks of doctor's flag.
            command = words[0] if words[0] in commands else name
            if span.startswith("--proxy-arg"):  # its value: a proxy flag
                command, span = "proxy", span.partition("=")[2]
            unknown |= set(_FLAG.findall(span)) - set(commands[command]) - allowed[command]
        if unknown:
            bad[name] = sorted(unknown)
    assert bad == {}


@pytest.mark.parametrize("name", ["demo", "up", "doctor"])
def test_cli_doc_mentions_every_flag(name):
    text = _cli_sections()[name]
    missing = sorted({a.option_strings[0] for a in _commands()[name].values()
                      if not isinstance(a, argparse._HelpAction)
                      and not any(re.search(re.escape(o) + r"(?![\w-])", text) for o in a.option_strings)})
    assert missing == [], f"document these `vllm-ascend-pd {name}` flags in docs/cli.md"
