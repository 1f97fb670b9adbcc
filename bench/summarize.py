"""The short table at the end of scripts/gpu_h200.sh: every JSON the run wrote under one folder, a line
each (throughput configs with their rooflines, prefill-kernel rates, decode/prefill kernel rows, KV
quality, start-up). Full numbers stay in the JSON files.

    python -m bench.summarize $OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def throughput_lines(name: str, r: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {r['workload']} {r['model']} copy {r['copy_bandwidth_tb_s']:.2f} TB/s matmul "
             f"{r['matmul_tflop_s']:.0f} TFLOP/s, median of {r['repeats']}"]
    for kv in ("auto", "fp8"):
        roof = r.get(f"roofline_{kv}")
        if roof:
            lines.append(f"  roofline {kv:<26}{roof['roofline_tok_s']:>9.0f} tok/s {roof['roofline_s']:>7.2f} s "
                         f"(decode floor {roof['decode_floor_s']:.2f} s, prefill {roof['prefill_floor_s']:.2f} s)")
    for run in r["runs"]:
        lines.append(f"  {run['config']:<35}{run['tok_s']:>9.0f} tok/s {run['wall_s']:>7.2f} s "
                     f"[{run['tok_s_min']:.0f}-{run['tok_s_max']:.0f}] {run['of_roofline']:.3f} of roofline")
    for label, rate in r.get("prefill_kernel", {}).items():
        lines.append(f"  prefill kernel {label:<20}{rate['tflop_s']:>9.0f} TFLOP/s ({rate['of_matmul']:.2f} of matmul)")
    return lines


def kernels_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"kernels: copy {r['copy_bandwidth_tb_s']:.2f} TB/s"]
    for row in r["decode"]:
        if not (row["label"] in ("key", "workload") or row["label"].startswith(("auto", "fp8"))):
            continue  # the full run's tuning sweeps: in the JSON
        lines.append(f"  decode {row['label']:<10} b{row['batch']} ctx~{row['context']} D{row['head_dim']} "
                     f"parts {row['num_partitions']}: {row['time_us']:.1f} us {100 * row['fraction_of_copy']:.1f}% copy")
    for row in r["prefill"]:
        c = row["config"]
        lines.append(f"  prefill {row['kv_cache_dtype']:<4} rows{c['rows_per_tile']} n{c['block_n']} w{c['num_warps']} "
                     f"causal_split={c['causal_split']}: {row['tflop_s']:.0f} TFLOP/s")
    return lines


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out")
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("workload-"):
            continue
        r = json.loads(path.read_text())
        if "runs" in r and "workload" in r:
            lines = throughput_lines(path.stem, r)
        elif "decode" in r and "prefill" in r:
            lines = kernels_lines(r)
        elif "mean_kl" in r:
            lines = [f"kv quality {r['model']}: greedy identical {r['greedy_identical']:.3f}, prefix "
                     f"{r['greedy_prefix']:.3f}, next-token agreement {r['next_token_agreement']:.4f}, mean KL "
                     f"{r['mean_kl']:.2e}, max KL {r['max_kl']:.2e}, self {r['auto_self_agreement']:.4f}"]
        elif "runs" in r and "mode" in r:
            lines = [f"startup ({r['mode']} mode) {run}: ready {row['ready_s']:.1f} s = before load "
                     f"{row.get('before_model_load_s', float('nan')):.1f} + load {row.get('model_load_s', float('nan')):.1f}"
                     f" + kv profile {row.get('kv_profile_s', float('nan')):.1f} + graphs "
                     f"{row.get('graph_capture_s', float('nan')):.1f} + rest {row['rest_s']:.1f}"
                     for run, row in r["runs"].items()]
        else:
            continue
        print("\n".join(lines))


if __name__ == "__main__":
    main()
