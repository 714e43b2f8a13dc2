"""Where a committed figure came from: commit, date, load average and the exact command.

Every benchmark script stamps each result row it writes with :func:`stamp`, so a figure in
``benchmarks/results/`` (and the README tables generated from them) can be traced to the code
that produced it and the conditions it ran under (docs/PROTOCOL.md, "Provenance").
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files under graphprune/ or
    benchmarks/ differ from it (the figure then comes from uncommitted code)."""
    head = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "graphprune", "benchmarks/*.py")
    return head + ("+dirty" if dirty else "")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def command() -> str:
    """The command line that is running, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *(shlex.quote(a) for a in sys.argv[1:])])


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the figures (the model's forward pass, its loading)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("torch", "transformers", "gguf", "tokenizers", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class Run:
    """Conditions of one benchmark run: call :meth:`stamp` when a row is finished."""

    def __init__(self) -> None:
        self.commit = commit()
        self.command = command()
        self.load_start = load_average()

    def stamp(self, row: dict[str, Any], cli: str | None = None) -> dict[str, Any]:
        """``row`` plus commit, UTC date, load average at the run's start and now, the
        command, and torch's thread count when torch is loaded; ``cli`` is the equivalent ``graphprune`` command (the same code path)."""
        info: dict[str, Any] = {
            "commit": self.commit,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": {"start": self.load_start, "end": load_average()},
            "command": self.command,
            "versions": versions(),
        }
        if "torch" in sys.modules:  # float reductions, and so the last digits of a figure, follow the thread count
            info["torch_threads"] = sys.modules["torch"].get_num_threads()
            # ... and the CPU's matmul kernels (AVX2 and AVX-512 round float32 differently)
            info["cpu_capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
        if cli:
            info["cli"] = cli
        return {**row, "provenance": info}


def measured_process(cmd: list[str], log: Path, cwd: Path = REPO) -> tuple[float, float, str]:
    """Run ``cmd`` (stderr to ``log``): its wall seconds, its peak RSS in MiB (``wait4``, the
    process's own high-water mark) and its stdout. A failure stops the benchmark, naming the
    command, its exit code and the end of its log."""
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; its log {log} ends:\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024.0, out


def last_json(text: str) -> dict[str, Any]:
    """The last complete JSON object printed on stdout (llm-compressor logs before it; graphprune's
    ``--json`` prints an indented object)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                break
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.find("{"):])
