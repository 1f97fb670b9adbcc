"""The fp8 decode kernel's tile and launch configs on the workload's ragged shape, then the engine with the
best one as the default (H200 sweep of 2026-12-01 in BENCHMARKS.md).

    python -m bench.fp8_decode_sweep            # GPU only: the sweep, then bench.throughput --configs fp8
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import torch

from bench.kernels import DecodeCase, bench_decode, copy_bandwidth

# `kernels` re-exports the decode_attention function under the module's name, and bench.kernels has imported
# the module: take it from sys.modules.
decode_module = sys.modules["kernels.decode_attention"]

# (use_dot, block_n, num_warps, num_stages); None stages: the launcher's default.
VARIANTS: list[tuple[bool, int, int, int | None]] = [
    (True, 64, 4, None), (True, 64, 4, 1), (True, 64, 4, 2), (True, 64, 8, 3), (True, 32, 4, 2),
    (True, 128, 8, 2), (True, 16, 4, 2), (False, 16, 4, 2), (False, 32, 4, 2), (False, 64, 4, 2),
    (False, 32, 8, 2), (False, 64, 8, 2), (False, 16, 2, 2), (False, 32, 4, 3),
]


def sweep(device: torch.device) -> tuple[list[dict[str, Any]], Any]:
    """Every variant for fp8 (a few for bf16, for scale) at head_dim 128 and 64; the fastest fp8 config
    at head_dim 128."""
    copy_bw = copy_bandwidth(device)
    rows: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    for kv in ("auto", "fp8"):
        for use_dot, block_n, num_warps, num_stages in (VARIANTS if kv == "fp8" else VARIANTS[:1] + VARIANTS[7:10]):
            config = decode_module.DecodeConfig(block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                                                use_dot=use_dot)
            for head_dim, group in ((128, 2), (64, 4)):
                case = DecodeCase(256, 2048, head_dim, group, ragged=True, config=config, kv_cache_dtype=kv)
                result = bench_decode(case, device, copy_bw)
                rows.append(result)
                print(f"{kv:4} dot={use_dot!s:5} n={block_n:3} w={num_warps} s={num_stages} D={head_dim:3}: "
                      f"{result['time_us']:7.1f} us {100 * result['fraction_of_copy']:5.1f}% of copy", flush=True)
                if kv == "fp8" and head_dim == 128 and (best is None or result["time_us"] < best[0]):
                    best = (result["time_us"], config)
            torch.cuda.empty_cache()
    assert best is not None
    return rows, best[1]


def main() -> None:
    out_dir = os.environ.get("OUT", "bench/out")
    os.makedirs(out_dir, exist_ok=True)
    rows, best = sweep(torch.device("cuda"))
    with open(os.path.join(out_dir, "fp8-decode-sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("best fp8 config at head_dim 128:", best, flush=True)
    # The engine runs in this process (LLMEngine): make the best config the launcher's default.
    defaults = {f.name: getattr(best, f.name) for f in dataclasses.fields(best)}
    decode_module.DecodeConfig = dataclasses.make_dataclass(
        "SweptDecodeConfig", [(name, Any, dataclasses.field(default=value)) for name, value in defaults.items()],
        bases=(decode_module.DecodeConfig,), frozen=True)
    import bench.throughput

    sys.argv = ["bench.throughput", "--workload", "benchmark", "--baselines", "0", "--configs", "fp8",
                "--repeats", "2", "--json", os.path.join(out_dir, "throughput-fp8-swept.json")]
    bench.throughput.main()


if __name__ == "__main__":
    main()
