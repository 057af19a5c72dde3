"""npm packages the tests run (MCP peers and clients written in TypeScript), installed once from the
npm registry into ``.cache/<name>`` (ignored by git), never globally."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def installed(name: str, package: str, entry: str) -> Path:
    """``entry`` (a path inside the install directory) of ``package``, installed first if missing."""
    directory = ROOT / ".cache" / name
    path = directory / entry
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is not installed: {package} needs Node and npm")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".gitignore").write_text("*\n")
    subprocess.run([npm, "install", "--prefix", str(directory), "--no-audit", "--no-fund", "--no-save", package],
                   check=True, capture_output=True, timeout=900)
    return path
