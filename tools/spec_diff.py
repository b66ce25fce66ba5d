"""Has the upstream contract changed since docs/reference/ was built from it?

    python tools/spec_diff.py PATH/TO/UPSTREAM/spec

compares RULES.md and PROTOCOL.md in that folder with the SHA-256 recorded in
docs/reference/README.md and prints, for each file that changed, the unified
diff against the verbatim copy kept in docs/reference/upstream/. Exit status
0 when nothing changed, 1 when something did, 2 on a usage error. It never
runs in CI (a clone has no upstream folder); it is the first step of
"Updating" in docs/reference/README.md.
"""
import difflib
import hashlib
import re
import sys
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "docs" / "reference"
UPSTREAM_COPY_DIR = REFERENCE_DIR / "upstream"
UPSTREAM_FILES = ("RULES.md", "PROTOCOL.md")
# A row of the table in docs/reference/README.md: | `RULES.md` | `<sha256>` |
HASH_ROW = re.compile(r"^\|\s*`(?P<name>[A-Z]+\.md)`\s*\|\s*`(?P<sha>[0-9a-f]{64})`\s*\|", re.M)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_hashes() -> dict[str, str]:
    """The hashes docs/reference/README.md records, by file name."""
    text = (REFERENCE_DIR / "README.md").read_text(encoding="utf-8")
    hashes = {m["name"]: m["sha"] for m in HASH_ROW.finditer(text)}
    missing = [name for name in UPSTREAM_FILES if name not in hashes]
    if missing:
        raise ValueError(f"docs/reference/README.md records no hash for {', '.join(missing)}")
    return hashes


def diff_one(name: str, upstream_dir: Path, recorded: str) -> list[str]:
    """Lines to print for one upstream file; empty when it is unchanged."""
    new_path = upstream_dir / name
    if not new_path.is_file():
        return [f"{name}: missing in {upstream_dir}"]
    new_sha = sha256_of(new_path)
    if new_sha == recorded:
        return []
    old_lines = (UPSTREAM_COPY_DIR / name).read_text(encoding="utf-8").splitlines(keepends=True)
    new_lines = new_path.read_text(encoding="utf-8").splitlines(keepends=True)
    head = [f"{name}: changed (recorded {recorded[:12]}, now {new_sha[:12]})\n"]
    return head + list(difflib.unified_diff(old_lines, new_lines, f"docs/reference/upstream/{name}",
                                            str(new_path)))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    upstream_dir = Path(argv[0])
    if not upstream_dir.is_dir():
        print(f"spec_diff: {upstream_dir} is not a folder", file=sys.stderr)
        return 2
    recorded = recorded_hashes()
    changed = False
    for name in UPSTREAM_FILES:
        lines = diff_one(name, upstream_dir, recorded[name])
        changed = changed or bool(lines)
        sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
    if not changed:
        print(f"unchanged: {', '.join(UPSTREAM_FILES)} match the hashes in docs/reference/README.md")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
