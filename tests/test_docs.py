"""The repository is its own reference: a plain clone holds the contract, and
the docs' links lead somewhere.

- no tracked file (outside .ci/) refers to the upstream folder next to the
  checkout, which a clone does not have;
- every relative Markdown link in the repository's .md files resolves;
- docs/reference/upstream/ holds the upstream files whose SHA-256
  docs/reference/README.md records, and rules.md / protocol.md contain every
  line of them, in order (the reference follows upstream; see
  docs/reference/README.md, "Updating").
"""
import hashlib
import importlib.util
import re
import subprocess
from pathlib import Path


def repo_root() -> Path:
    """The folder holding pyproject.toml, wherever this test file sits."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("no pyproject.toml above tests/")


ROOT = repo_root()
REFERENCE_DIR = ROOT / "docs" / "reference"
UPSTREAM_REF = "../" + "shared"          # split, so that this file does not match itself
SKIPPED_DIRS = {".git", ".venv", "build", ".ci", "__pycache__", ".pytest_cache", ".hypothesis"}
FILES_MAX = 20_000                       # bound on the walk; the repository has a few hundred
# [text](target) and ![alt](target); target up to whitespace or the closing parenthesis
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
BLOCK_MARK = "**Scanpay"


def tracked_files() -> list[Path]:
    """git's tracked files; a tree without git (an sdist) is walked instead."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    assert 0 < len(names) <= FILES_MAX, len(names)
    return [ROOT / n for n in names if not n.startswith(".ci/") and (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_refers_to_the_upstream_folder():
    offenders = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if UPSTREAM_REF in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "cite docs/reference/ instead:\n" + "\n".join(offenders)


CONFLICT_MARK = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)


def test_no_tracked_file_holds_a_merge_conflict_marker():
    """A merge resolved by hand must not leave both sides in a page."""
    offenders = []
    for path in tracked_files():
        text = text_of(path)
        if text is not None and CONFLICT_MARK.search(text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], offenders


def markdown_links(text: str) -> list[str]:
    """Relative link targets of a Markdown text, outside code."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = []
    for match in MD_LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                     # http:, mailto:, an anchor in the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_markdown_links_finds_relative_links_only():
    text = ("[a](docs/x.md) ![p](peers.png) [w](https://example.com) [s](#top)\n"
            "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[b](y.md#part)")
    assert markdown_links(text) == ["docs/x.md", "peers.png", "y.md"]


def test_every_relative_markdown_link_resolves():
    pages = [p for p in tracked_files() if p.suffix == ".md"]
    assert ROOT / "README.md" in pages and REFERENCE_DIR / "rules.md" in pages
    broken = []
    for page in pages:
        for target in markdown_links(page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == [], "links to nothing:\n" + "\n".join(broken)


def spec_diff_module():
    """tools/spec_diff.py, the one owner of how the hashes are recorded."""
    spec = importlib.util.spec_from_file_location("spec_diff", ROOT / "tools" / "spec_diff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upstream_copies_match_the_recorded_hashes():
    spec_diff = spec_diff_module()
    recorded = spec_diff.recorded_hashes()
    for name in spec_diff.UPSTREAM_FILES:
        data = (REFERENCE_DIR / "upstream" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == recorded[name], (
            f"docs/reference/upstream/{name} is not the file docs/reference/README.md records: "
            "record its new SHA-256 there when you update it")


def upstream_lines(text: str, other_page: str) -> list[str]:
    """A reference page with its Scanpay blocks and headings taken out, and its
    links to the other page written back as upstream names them."""
    kept = []
    for line in text.splitlines():
        if line.startswith(">") or not line.strip() or line.rstrip().endswith("(Scanpay)"):
            continue
        kept.append(line.replace(f"[{other_page.lower()}]({other_page.lower()})", other_page))
    return kept


def test_reference_pages_hold_the_upstream_text_in_order():
    for page, name, other in (("rules.md", "RULES.md", "PROTOCOL.md"),
                              ("protocol.md", "PROTOCOL.md", "RULES.md")):
        upstream = [line for line in (REFERENCE_DIR / "upstream" / name).read_text(
            encoding="utf-8").splitlines() if line.strip()]
        ours = upstream_lines((REFERENCE_DIR / page).read_text(encoding="utf-8"), other)
        first_difference = next((i for i, (a, b) in enumerate(zip(upstream, ours)) if a != b), None)
        assert first_difference is None and len(upstream) == len(ours), (
            f"docs/reference/{page} departs from upstream/{name} at line "
            f"{first_difference}: mark Scanpay's text as a '> **Scanpay' block")
        assert BLOCK_MARK in (REFERENCE_DIR / page).read_text(encoding="utf-8")
