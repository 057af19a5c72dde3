"""Run the official MCP conformance suite against a server URL and return per-check results.

    from tests.conformance.runner import ensure_cli, run_suite
    results = run_suite("http://127.0.0.1:8931/mcp", cli=ensure_cli())
    # {"dns-rebinding-protection/localhost-host-rebinding-rejected": "SUCCESS", ...}

    python -m tests.conformance.runner http://127.0.0.1:8931/mcp      # prints the mapping as JSON

The result maps "<scenario>/<check id>" to the check's status, one of SUCCESS, FAILURE,
WARNING, INFO or SKIPPED, for every check of every scenario of `--suite all`. The suite
reuses some check ids within a scenario (the INFO trace entries of server-sse-polling:
outgoing-request, incoming-response, incoming-sse-event, ...): the first keeps the plain
key and later ones get "#2", "#3", ... in the order the suite recorded them. A scenario
that crashed the harness (no checks.json written) appears as "<scenario>/<scenario>":
"FAILURE", the same synthetic check the CLI itself counts.

The mapping carries statuses only (no timestamps, messages or details), so two runs
against equivalent servers compare equal with `==`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALLER = REPO_ROOT / ".ci" / "conformance.sh"

# createResultDir(): <output-dir>/server-<scenario>-<new Date().toISOString() with ':' and '.' -> '-'>
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_RUNNING = re.compile(r"^=== Running scenario: (?P<scenario>\S+) ===$", re.MULTILINE)
_SUMMARY = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ConformanceRunError(RuntimeError):
    """The suite could not be run to completion (installer failure, timeout, unusable output)."""


def ensure_cli(conformance_dir: str | os.PathLike[str] | None = None, *, timeout: float = 900) -> str:
    """Install the suite if missing (via .ci/conformance.sh) and return the path of its CLI wrapper."""
    env = dict(os.environ)
    if conformance_dir is not None:
        env["CONFORMANCE_DIR"] = str(conformance_dir)
    try:
        proc = subprocess.run(
            ["bash", str(INSTALLER)], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConformanceRunError(f"{INSTALLER} did not finish within {timeout:.0f}s") from exc
    cli = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not cli or not os.access(cli, os.X_OK):
        raise ConformanceRunError(f"{INSTALLER} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return cli


def parse_results(results_dir: str | os.PathLike[str], stdout: str = "") -> dict[str, str]:
    """Build the "<scenario>/<check id>" -> status mapping from a `-o` results directory.

    `stdout` (the CLI's output) adds scenarios that were run but left no checks.json.
    """
    results: dict[str, str] = {}
    seen_scenarios: set[str] = set()
    root = Path(results_dir)
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for entry in entries:
        match = _RESULT_DIR.match(entry.name)
        checks_file = entry / "checks.json"
        if not match or not checks_file.is_file():
            continue
        scenario = match["scenario"]
        seen_scenarios.add(scenario)
        try:
            checks = json.loads(checks_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConformanceRunError(f"unreadable {checks_file}: {exc}") from exc
        counts: Counter[str] = Counter()
        for check in checks:
            check_id = str(check.get("id", "?"))
            counts[check_id] += 1
            key = f"{scenario}/{check_id}" + (f"#{counts[check_id]}" if counts[check_id] > 1 else "")
            results[key] = str(check.get("status", "UNKNOWN"))
    text = _ANSI.sub("", stdout)
    ran = {m["scenario"] for m in _RUNNING.finditer(text)} | {m["scenario"] for m in _SUMMARY.finditer(text)}
    for scenario in sorted(ran - seen_scenarios):
        results[f"{scenario}/{scenario}"] = "FAILURE"
    return dict(sorted(results.items()))


def run_suite(
    url: str,
    *,
    cli: str,
    timeout: float = 600,
    scenario: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Run `conformance server --url URL --suite all` (or one `scenario`) and return per-check statuses.

    The CLI runs in a fresh temporary directory (its cwd, holding the `-o` results, removed
    afterwards). The whole run is bounded by `timeout` seconds: past that the CLI's
    process group is killed and `ConformanceRunError` is raised, as it is when the CLI
    produced no parseable results (bad URL, missing server, crashed harness).
    """
    cli = os.path.abspath(cli)  # the CLI runs with a temporary cwd
    if not os.access(cli, os.X_OK):
        raise ConformanceRunError(f"conformance CLI {cli} is missing or not executable (run .ci/conformance.sh)")
    with tempfile.TemporaryDirectory(prefix="mcp-conformance-") as tmp:
        results_dir = Path(tmp) / "results"
        selection = ["--scenario", scenario] if scenario else ["--suite", "all"]
        cmd = [cli, "server", "--url", url, *selection, "--output-dir", str(results_dir)]
        env = {
            **os.environ,
            "NO_COLOR": "1",
            "FORCE_COLOR": "0",
            # Loopback targets only: never route them through a proxy from the environment.
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            **(extra_env or {}),
        }
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise ConformanceRunError(
                f"conformance suite against {url} did not finish within {timeout:.0f}s; output tail:\n"
                + _tail(stdout + stderr)
            ) from exc
        results = parse_results(results_dir, stdout)
        # Exit 0: nothing failed; 1: some check failed, but also a rejected argument or a crash.
        # A run that got to the end printed its summary ("=== SUMMARY ===" / "Test Results:").
        finished = ("=== SUMMARY ===" if scenario is None else "Test Results:") in stdout
        if not results or not finished or proc.returncode not in (0, 1):
            raise ConformanceRunError(
                f"conformance CLI exited {proc.returncode} without completing a run against {url} "
                f"({len(results)} checks recorded):\n" + _tail(stdout + stderr)
            )
        return results


@contextlib.contextmanager
def fixture_server(*, port: int = 0, startup_timeout: float = 30, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Run tests/conformance/fixture_server.py in a subprocess on 127.0.0.1; yield its /mcp URL.

    The server is stopped (SIGTERM, then SIGKILL after 5 s) when the block exits.
    """
    with tempfile.TemporaryFile(mode="w+", prefix="conformance-fixture-", suffix=".log") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.conformance.fixture_server", "--port", str(port), *extra_args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            url = _await_ready(proc, startup_timeout)
            if url is None:
                log.seek(0)
                state = "timed out" if proc.poll() is None else f"exited {proc.returncode}"
                raise ConformanceRunError(
                    f"fixture server not ready ({state}, limit {startup_timeout:.0f}s):\n{_tail(log.read())}"
                )
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _await_ready(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The URL from the server's `READY <url>` line, or None if it exits or times out first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
        if readable:
            line = proc.stdout.readline()
            if not line:  # EOF: the server exited
                return None
            if line.startswith("READY "):
                return line.split(maxsplit=1)[1].strip()
        elif proc.poll() is not None:
            return None
    return None


def summarize(results: Mapping[str, str]) -> dict[str, int]:
    """Count of checks per status, e.g. {"SUCCESS": 44, "WARNING": 2, "INFO": 6}."""
    return dict(sorted(Counter(results.values()).items()))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(_ANSI.sub("", text).strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the MCP conformance suite against URL and print {'<scenario>/<check>': status} as JSON."
    )
    parser.add_argument("url", nargs="?", help="streamable HTTP endpoint, e.g. http://127.0.0.1:8931/mcp")
    parser.add_argument(
        "--fixture", action="store_true", help="start tests/conformance/fixture_server.py and run against it"
    )
    parser.add_argument("--cli", help="conformance CLI (default: installed/located by .ci/conformance.sh)")
    parser.add_argument("--timeout", type=float, default=600, help="bound on the whole run, seconds (default 600)")
    parser.add_argument("--scenario", help="run one scenario instead of --suite all")
    parser.add_argument("--summary", action="store_true", help="also print status counts on stderr")
    args = parser.parse_args(argv)
    if bool(args.url) == args.fixture:
        parser.error("give either URL or --fixture")
    try:
        cli = args.cli or ensure_cli()
        if args.fixture:
            with fixture_server() as url:
                results = run_suite(url, cli=cli, timeout=args.timeout, scenario=args.scenario)
        else:
            results = run_suite(args.url, cli=cli, timeout=args.timeout, scenario=args.scenario)
    except ConformanceRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, sort_keys=True))
    if args.summary:
        print(json.dumps(summarize(results)), file=sys.stderr)
    return 1 if "FAILURE" in results.values() else 0


if __name__ == "__main__":
    sys.exit(main())
