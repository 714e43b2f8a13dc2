"""Decode-time speed of one sparse Linear on CPU: dense ``F.linear`` vs ``PackedLinear`` vs ``CSRLinear``.

At decode (1-8 tokens per step) a Linear reads its whole weight to do very little
arithmetic, so its time is bounded below by bytes read / memory bandwidth. This script
measures how close each kernel comes to that bound and how many bytes it reads:

* shapes: the Linears of the default model SmolLM2-135M -- q/o 576->576, k/v 576->192,
  gate/up 576->1536, down 1536->576;
* weights: unstructured sparsity 50/60/70/80/90 % (a random mask, the same sparsity in every
  row) and 2:4 (the 2 smallest magnitudes of every 4 consecutive inputs zeroed);
* batch (tokens per call) 1 and 8;
* kernels: ``dense`` (``torch.nn.functional.linear`` on the pruned dense weight),
  ``packed`` (:class:`graphprune.kernels.packed.PackedLinear`, the module call),
  ``packed-op`` (the same operator called directly on the buffers, i.e. without the
  module's Python overhead) and ``csr`` (:class:`graphprune.kernels.sparse_cpu.CSRLinear`).

Every timed pass calls one kernel on a cycle of distinct weight copies whose storage adds up
to more than ``--cache-mb`` (default 256 MB, above the last-level cache), so each call reads
its weight from memory as in a real model, where ~500 MB of layers pass between two uses of
one weight. The kernels are interleaved pass by pass; the median time per call of
``--repeats`` passes is reported. The machine's read bandwidth is measured in the same run
(``sum`` of a tensor several times the cache size, best of several passes); a kernel's
"x bound" is its time divided by (its bytes / that bandwidth): 1.0 is the memory limit.

Bytes read per call: the kernel's stored weight (dense: out*in*4; packed: bit mask, int64 row
offsets and float32 nonzeros; csr: int64 row pointers and column indices, float32 values), plus
the bias, the input and the output. Each kernel's first copy is checked against ``F.linear``.

    python benchmarks/kernel_decode.py              # a few minutes on 2 cores, ~3 GB of memory
    python benchmarks/kernel_decode.py --smoke      # ~20 s check that the script works; writes nothing

Writes benchmarks/results/kernel_decode.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latency import say  # noqa: E402
from provenance import Run  # noqa: E402

from graphprune.bench import machine_info  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.kernels.packed import PackedLinear, native_isa, packed_available, packed_unavailable_reason  # noqa: E402
from graphprune.kernels.sparse_cpu import CSRLinear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: (name, out_features, in_features) of SmolLM2-135M's Linears
SHAPES = (("q/o 576->576", 576, 576), ("k/v 576->192", 192, 576), ("gate/up 576->1536", 1536, 576), ("down 1536->576", 576, 1536))
PATTERNS = ("50%", "60%", "70%", "80%", "90%", "2:4")
BATCHES = (1, 8)
KINDS = ("dense", "packed", "packed-op", "csr")
#: distinct random weights per row; the copies cycle through them (values do not matter, addresses do)
BASES = 4


def make_weight(out: int, inp: int, pattern: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / inp**0.5
    if pattern == "2:4":
        groups = w.reshape(out, -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    else:
        drop = round(float(pattern.rstrip("%")) / 100 * inp)
        order = torch.rand(out, inp, generator=gen).argsort(dim=1)
        w.scatter_(1, order[:, :drop], 0.0)
    return w


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bandwidth(nbytes: int, passes: int) -> dict[str, float]:
    """Read bandwidth (``sum`` over a float32 tensor) and copy bandwidth (read + write), bytes/s, best pass."""
    n = nbytes // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    src.sum()
    dst.copy_(src)
    read, copy_ = [], []
    for _ in range(passes):
        t = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        copy_.append(time.perf_counter() - t)
    return {"bytes": float(n * 4), "read_bytes_per_s": n * 4 / min(read), "copy_bytes_per_s": 2 * n * 4 / min(copy_)}


def build_callers(out: int, inp: int, pattern: str, x: dict[int, torch.Tensor], cache_bytes: int, kinds: tuple[str, ...]) -> tuple[dict[str, list[Callable[[torch.Tensor], torch.Tensor]]], dict[str, int], int]:
    """Per kernel: callables over enough copies to exceed ``cache_bytes``, bytes per call of its weight, and the checked nnz."""
    weights = [make_weight(out, inp, pattern, seed) for seed in range(BASES)]
    bias = torch.randn(out, generator=torch.Generator().manual_seed(99)) * 0.1
    callers: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    stored: dict[str, int] = {}
    for kind in kinds:
        if kind == "dense":
            proto: list[Any] = weights
            stored[kind] = tensor_bytes(weights[0], bias)
        elif kind in ("packed", "packed-op"):
            proto = [PackedLinear.from_linear(w, bias) for w in weights]
            stored[kind] = proto[0].bytes_read()
        else:
            proto = [CSRLinear.from_linear(w, bias) for w in weights]
            m = proto[0]
            stored[kind] = tensor_bytes(m.crow_indices, m.col_indices, m.values, m.bias)
        # each copy's own storage: the cycle must exceed the cache by this kernel's bytes
        copies = max(BASES, math.ceil(cache_bytes / stored[kind]))
        fns: list[Callable[[torch.Tensor], torch.Tensor]] = []
        for i in range(copies):
            item = proto[i % BASES]
            item = item.clone() if kind == "dense" else copy.deepcopy(item)
            if kind == "dense":
                fns.append(lambda xx, w=item: F.linear(xx, w, bias))
            elif kind == "packed-op":
                fns.append(lambda xx, m=item, op=torch.ops.graphprune.packed_linear: op(xx, m.mask, m.offsets, m.values, m.bias, m.out_features))
            else:
                fns.append(item)
        for xt in x.values():  # correctness of this kernel's first copy
            torch.testing.assert_close(fns[0](xt), F.linear(xt, weights[0], bias), rtol=1e-4, atol=1e-4)
        callers[kind] = fns
    return callers, stored, int((weights[0] != 0).sum())


def time_row(callers: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]], xt: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each kernel, one pass over its copies per repeat, kernels interleaved."""
    times: dict[str, list[float]] = {k: [] for k in callers}
    for rep in range(repeats + 1):  # the first pass warms up
        for kind, fns in callers.items():
            start = time.perf_counter()
            for fn in fns:
                fn(xt)
            if rep:
                times[kind].append((time.perf_counter() - start) / len(fns))
    return times


def markdown(result: dict[str, Any]) -> str:
    prov, bw = result["provenance"], result["bandwidth"]
    m = result["machine"]
    lines = [
        "# Decode-time sparse Linear kernels on CPU (SmolLM2-135M shapes)",
        "",
        f"Commit {prov['commit_full']} ({prov['commit']}), {prov['date']}, load average {prov['load_average']}, "
        f"command `{prov['command']}`.",
        f"Machine: {m.get('cpu')} ({m.get('usable_cores')} usable cores), torch {m.get('torch')} with {result['threads']} threads; "
        f"packed kernel: {result['packed']}.",
        f"Memory bandwidth in this run: read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s (sum of {bw['bytes'] / 1e6:.0f} MB), "
        f"copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write).",
        f"Each call reads its weight from memory (cycling through > {result['cache_mb']} MB of copies per kernel); "
        f"median of {result['repeats']} interleaved passes, microseconds per call. "
        "'x bound' = time / (bytes read / read bandwidth): 1.0 is the memory limit. "
        "`packed` is the module call, `packed-op` the operator alone.",
        "",
        "| shape | weights | batch | dense µs | packed µs | packed-op µs | csr µs | dense / packed | dense / csr "
        "| MB dense | MB packed | MB csr | x bound dense | x bound packed | x bound packed-op | x bound csr |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], kind: str, key: str, fmt: str) -> str:
        value = row["kernels"].get(kind, {}).get(key)
        return "n/a" if value is None else format(value, fmt)

    for row in result["rows"]:
        dense = row["kernels"]["dense"]["median_s"]
        ratio = {k: (f"{dense / row['kernels'][k]['median_s']:.2f}" if k in row["kernels"] else "n/a") for k in ("packed", "csr")}
        lines.append(
            f"| {row['shape']} | {row['pattern']} | {row['batch']} | "
            + " | ".join(cell(row, k, "median_us", ".1f") for k in KINDS)
            + f" | {ratio['packed']} | {ratio['csr']} | "
            + " | ".join(cell(row, k, "bytes_mb", ".3f") for k in ("dense", "packed", "csr"))
            + " | "
            + " | ".join(cell(row, k, "x_bound", ".2f") for k in KINDS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-mb", type=int, default=256, help="bytes of weight copies each kernel cycles through per pass")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for kernel_decode.{md,json}")
    parser.add_argument("--smoke", action="store_true", help="tiny run (32 MB, 2 repeats, 50 %% and 2:4) that writes nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cache_mb, args.repeats, args.patterns = 32, 2, ["50%", "2:4"]
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run()
    kinds = KINDS if packed_available() else tuple(k for k in KINDS if not k.startswith("packed"))
    packed_note = {"avx512": "AVX-512", "avx2": "AVX2"}.get(native_isa() or "", "scalar") if packed_available() else f"unavailable ({packed_unavailable_reason()})"
    say(f"packed kernel: {packed_note}; torch threads {torch.get_num_threads()}")
    cache_bytes = args.cache_mb * 2**20
    bw = bandwidth(max(2 * cache_bytes, 256 * 2**20), passes=3 if args.smoke else 7)
    say(f"bandwidth: read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s, copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for shape, out, inp in SHAPES:
            x = {b: torch.randn(b, inp, generator=torch.Generator().manual_seed(b)) for b in args.batches}
            for pattern in args.patterns:
                callers, stored, nnz = build_callers(out, inp, pattern, x, cache_bytes, kinds)
                for batch in args.batches:
                    io = (batch * inp + batch * out) * 4
                    times = time_row(callers, x[batch], args.repeats)
                    kernels: dict[str, Any] = {}
                    for kind, ts in times.items():
                        med = statistics.median(ts)
                        nbytes = stored[kind] + io
                        kernels[kind] = {
                            "median_s": med,
                            "median_us": med * 1e6,
                            "times_s": ts,
                            "copies": len(callers[kind]),
                            "bytes": nbytes,
                            "bytes_mb": nbytes / 1e6,
                            "bound_s": nbytes / bw["read_bytes_per_s"],
                            "x_bound": med / (nbytes / bw["read_bytes_per_s"]),
                            "achieved_bytes_per_s": nbytes / med,
                        }
                    rows.append({"shape": shape, "out": out, "in": inp, "pattern": pattern, "sparsity": 1 - nnz / (out * inp), "batch": batch, "kernels": kernels})
                    say(
                        f"{shape:18s} {pattern:4s} b{batch}: "
                        + ", ".join(f"{k} {v['median_us']:.1f} µs ({v['x_bound']:.2f}x bound)" for k, v in kernels.items())
                    )
                del callers
    stamped = run.stamp({})
    provenance = {**stamped["provenance"], "commit_full": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    try:
        provenance["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        pass
    result = {
        "provenance": provenance,
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "packed": packed_note,
        "bandwidth": bw,
        "cache_mb": args.cache_mb,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.smoke:
        print(markdown(result))
        say("smoke run: nothing written")
        return 0
    write_json(args.results / "kernel_decode.json", result)
    write_text(args.results / "kernel_decode.md", markdown(result))
    say(f"wrote {args.results / 'kernel_decode.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
