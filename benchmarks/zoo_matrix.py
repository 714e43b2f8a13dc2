"""Architecture support matrix: every zoo family x every capability, each checked for real.

Runs :func:`graphprune.pipeline.support.check` for each (family, capability) -- the public
path a user runs on the family's 2-layer, 64-wide tiny model, with its result verified
(logits parity, exact sparsity over every decoder weight matrix, reload, exporter parity) --
and writes ``benchmarks/results/zoo_matrix.{json,md}``. The README's support table is
generated from the JSON (``scripts/readme_tables.py``). A cell that disagrees with
``support.GAPS`` (a listed gap that passes, or an unlisted failure) is flagged in the output.

    python benchmarks/zoo_matrix.py                       # everything (about 15 min on 2 cores)
    python benchmarks/zoo_matrix.py --families gpt2 phi3  # some families
    python benchmarks/zoo_matrix.py --render              # re-render the .md from the .json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import Run  # noqa: E402

from graphprune.models.zoo import FAMILIES, ZOO  # noqa: E402
from graphprune.pipeline.support import CAPABILITIES, GAPS, check  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def render(data: dict[str, Any]) -> str:
    cells = {(c["family"], c["capability"]): c for c in data["cells"]}
    families = [f.name for f in FAMILIES if any(k[0] == f.name for k in cells)]
    lines = [
        "# Architecture support matrix",
        "",
        f"Commit `{data['provenance']['commit']}`, {data['provenance']['date']}, load average {data['provenance']['load_average']}, "
        f"command `{data['provenance']['command']}`.",
        "",
        "Each cell runs the capability on the family's tiny model (2 layers, width 64) and verifies the result; "
        "see `graphprune/pipeline/support.py` for what each check asserts.",
        "",
        "| family | " + " | ".join(CAPABILITIES) + " |",
        "|---|" + "---|" * len(CAPABILITIES),
    ]
    for fam in families:
        row = []
        for cap in CAPABILITIES:
            cell = cells.get((fam, cap))
            row.append("" if cell is None else ("yes" if cell["ok"] else "**no**"))
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    lines += ["", "## Gaps", ""]
    for fam in families:
        for cap in CAPABILITIES:
            cell = cells.get((fam, cap))
            if cell is not None and not cell["ok"]:
                known = GAPS.get((fam, cap))
                lines.append(f"- {fam} / {cap}: {known or 'unexpected failure'} -- `{cell['detail'][:200]}`")
    unexpected = [f"{c['family']}/{c['capability']}" for c in data["cells"] if c["ok"] == ((c["family"], c["capability"]) in GAPS)]
    if unexpected:
        lines += ["", f"Cells that disagree with `support.GAPS`: {', '.join(unexpected)}."]
    lines += ["", "## Families", ""] + [f"- **{f.name}** ({f.model}): {f.features}" for f in FAMILIES if f.name in families]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=[f.name for f in FAMILIES], choices=list(ZOO))
    ap.add_argument("--capabilities", nargs="*", default=list(CAPABILITIES), choices=list(CAPABILITIES))
    ap.add_argument("--render", action="store_true", help="only re-render zoo_matrix.md from zoo_matrix.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.render:
        data = json.loads((args.out / "zoo_matrix.json").read_text())
        (args.out / "zoo_matrix.md").write_text(render(data))
        return
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    run = Run()
    cells = []
    for fam in args.families:
        for cap in args.capabilities:
            cell = check(fam, cap)
            flag = "" if cell.ok != ((fam, cap) in GAPS) else "  <-- disagrees with support.GAPS"
            print(f"{fam:10s} {cap:12s} {'yes' if cell.ok else 'no ':3s} {cell.seconds:6.1f}s  {cell.detail[:150]}{flag}", flush=True)
            cells.append({**cell.as_dict(), "gap": None if cell.ok else GAPS.get((fam, cap), "unexpected failure")})
    data = {"provenance": run.stamp({})["provenance"], "capabilities": list(args.capabilities), "cells": cells,
            "families": {f.name: {"model": f.model, "features": f.features} for f in FAMILIES if f.name in args.families}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_matrix.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "zoo_matrix.md").write_text(render(data))


if __name__ == "__main__":
    main()
