"""The user-facing docs point at things that exist: every relative link and
#anchor in the repository's markdown resolves, and the proxy's flags and
error kinds quoted in docs/proxy.md are the ones the code has."""

from __future__ import annotations

import argparse
import re
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
