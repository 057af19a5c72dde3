"""The guides work as written: quoted offline commands run, internal links resolve."""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "README-TwinMCP.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(?:sh|bash|console)?\n(.*?)```", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"(^|\|\s*)(\.venv/bin/)?python3? (manage\.py|-c) ")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(), flags=re.M)}


def quoted_commands(path: Path) -> list[str]:
    commands = []
    for block in FENCE.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if RUNNABLE.search(line) and not re.search(r"[<$…]|tmcp_", line):
                commands.append(line)
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no section #{anchor} in {path.name}"


def test_quoted_commands_run(tmp_path):
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "DEBUG": "false",
        "SECRET_KEY": "docs-" + "k" * 60, "TWINMCP_ENCRYPTION_KEYS": key, "ALLOWED_HOSTS": "twinmcp.example.com",
        "TWINMCP_VAR_DIR": str(tmp_path / "var"),
    }
    python = shlex.quote(sys.executable)
    ran = []
    for doc in DOCS:
        commands = quoted_commands(doc)
        if not commands:
            continue
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / (doc.stem + '.sqlite3')}"  # each guide starts afresh
        subprocess.run(f"{python} manage.py migrate -v 0", shell=True, cwd=ROOT, env=env, check=True, timeout=300)
        for command in commands:
            runnable = re.sub(r"(\.venv/bin/)?python3? ", f"{python} ", command)
            result = subprocess.run(runnable, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, f"{doc.name}: `{command}` failed:\n{result.stderr[-2000:]}"
            ran.append(command)
    assert any("createworkspace" in c for c in ran) and any("addmember" in c for c in ran)
    assert any("create_api_key" in c for c in ran) and any("check --deploy" in c for c in ran)
