"""Quality of the fp8 KV cache against the model-dtype cache: greedy agreement and the KL divergence of
next-token distributions, over 64 prompts, with everything else equal (same weights, same kernels).

    python -m bench.kv_quality                      # GPU: the benchmark shape (Qwen3-0.6B, random bf16)
    python -m bench.kv_quality --model tiny         # CPU smoke run
    python -m bench.kv_quality --synthetic          # a tiny model trained on bench/synthetic_lm.py's language
    python -m bench.kv_quality --embedded           # the embedded real model (SmolLM2-135M-Instruct)
    python -m bench.kv_quality --model-dir DIR      # any checkpoint (HF dir, .gguf file)

Per prompt, both engines decode --max-tokens greedy tokens; then the fp8 engine is teacher-forced on the
auto engine's continuation (one prefill forward over prompt + continuation, whose attention reads the
fp8 cache just written, as decode would), so every position compares the two distributions on the
same context. Metrics:
- greedy_identical: share of prompts whose whole continuation is the same;
- greedy_prefix: mean share of the continuation before the first differing token;
- next_token_agreement: share of teacher-forced positions whose argmax is the same;
- mean_kl / max_kl: KL(p_auto || p_fp8) in nats per position (float32 softmax over the whole vocab);
- auto_self_agreement: the teacher-forced auto pass against the auto engine's own greedy tokens (1.0
  but for near-ties between kernels: the check that the teacher-forced pass computes what decode did).
Random weights give near-uniform distributions: tiny KL, but argmax ties flip easily (bench/synthetic_lm.py
says why), so the trained model's figures are the ones that speak for a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.workload import MODEL_SHAPES, make_checkpoint, make_workload

TEXT_TOPICS = ["the ocean", "a small town", "machine learning", "the history of Rome", "coffee", "winter",
               "a friendly robot", "the stock market", "gardening", "the moon", "jazz music", "a library"]
TEXT_TEMPLATES = ["Write a short story about {}.", "Explain {} to a child.",
                  "Here are three facts about {}:", "The most surprising thing about {} is",
                  "Q: What do you know about {}?\nA:", "A poem about {}:\n"]


def text_prompts(tokenizer: Any, num_prompts: int) -> list[list[int]]:
    """Short instructions and openings (the tokenizer's own encoding), for real checkpoints."""
    texts = [t.format(topic) for t in TEXT_TEMPLATES for topic in TEXT_TOPICS][:num_prompts]
    return [tokenizer.encode(text) for text in texts]


def synthetic_checkpoint(path: Path, args: argparse.Namespace) -> tuple[Path, list[list[int]]]:
    """bench/gpu_correctness.py's trained Qwen3-style model (4 layers, head_dim 128) and prompts cut
    from its language: peaked distributions, as a real checkpoint has."""
    import random

    from bench.synthetic_lm import make_language, train
    from tests.helpers.tiny_models import make_tiny_model

    model_dir = make_tiny_model("qwen3", path, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                head_dim=128)
    language = make_language(3, 300)
    on_gpu = args.device.startswith("cuda")
    train(model_dir, language, steps=600 if on_gpu else 60, batch_size=32 if on_gpu else 8,
          seq_len=512 if on_gpu else 128, device=args.device)
    rng = random.Random(0)
    prompts = [language.text(rng.randint(32, 300), rng) for _ in range(args.num_prompts)]
    return model_dir, prompts


def make_engine(model_dir: Path | None, args: argparse.Namespace, kv_cache_dtype: str, num_kv_blocks: int,
                dtype: str = "auto") -> Any:
    """An engine for the comparison (model_dir None: the embedded default model)."""
    from engine import EngineConfig
    from engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model=None if model_dir is None else str(model_dir), device=args.device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,  # type: ignore[arg-type]
        num_kv_blocks=num_kv_blocks, max_num_seqs=args.num_prompts,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.num_prompts),
        max_model_len=args.max_model_len, enable_prefix_caching=False))


@torch.inference_mode()
def teacher_forced_logprobs(engine: Any, token_ids: list[int], first: int) -> torch.Tensor:
    """log-softmax [len(token_ids) - first, vocab] of the distributions predicting token_ids[first:],
    from one prefill of the whole sequence over the engine's (idle) KV cache, blocks 0, 1, 2, ..."""
    from engine.attention import AttentionMetadata

    runner = engine.model_runner
    device, block_size, num_tokens = runner.device, runner.block_size, len(token_ids)
    num_blocks = -(-num_tokens // block_size)
    if num_blocks > engine.num_kv_blocks:
        raise ValueError(f"a {num_tokens}-token sequence needs {num_blocks} KV blocks, the pool has "
                         f"{engine.num_kv_blocks}")
    positions = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(
        slot_mapping=positions.clone(),  # blocks 0..n-1 in order: slot == position
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_tokens, max_seq_len=num_tokens)
    hidden = runner.model(torch.tensor(token_ids, device=device), positions, meta)
    logits = runner.model.compute_logits(hidden[first - 1:num_tokens - 1])
    return torch.log_softmax(logits.float(), dim=-1)


def compare(auto: Any, fp8: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    auto_out = [o.token_ids for o in auto.generate(prompts, params)]
    fp8_out = [o.token_ids for o in fp8.generate(prompts, params)]
    identical, prefix = 0, 0.0
    for a, f in zip(auto_out, fp8_out, strict=True):
        first_diff = next((i for i, (x, y) in enumerate(zip(a, f, strict=True)) if x != y), len(a))
        identical += first_diff == len(a)
        prefix += first_diff / len(a)
    # Teacher forcing overwrites cache blocks from 0 on: the engines serve nothing after this.
    agree = positions = self_agree = 0
    kl_sum, kl_max = 0.0, 0.0
    for prompt, continuation in zip(prompts, auto_out, strict=True):
        sequence = prompt + continuation
        lp_auto = teacher_forced_logprobs(auto, sequence, len(prompt))
        lp_fp8 = teacher_forced_logprobs(fp8, sequence, len(prompt))
        kl = (lp_auto.exp() * (lp_auto - lp_fp8)).sum(dim=-1)  # [positions] nats
        agree += int((lp_auto.argmax(-1) == lp_fp8.argmax(-1)).sum())
        # The teacher-forced pass must reproduce the auto engine's own greedy tokens (ties aside).
        self_agree += int((lp_auto.argmax(-1).cpu() == torch.tensor(continuation)).sum())
        positions += kl.numel()
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    return dict(greedy_identical=identical / len(prompts), greedy_prefix=prefix / len(prompts),
                next_token_agreement=agree / positions, mean_kl=kl_sum / positions, max_kl=kl_max,
                auto_self_agreement=self_agree / positions, num_positions=float(positions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=sorted(MODEL_SHAPES),
                        help="random-weight shape (default: qwen3-0.6b on CUDA, tiny on the CPU)")
    parser.add_argument("--model-dir", default=None, help="a checkpoint (HF dir, .gguf) instead of a random shape")
    parser.add_argument("--embedded", action="store_true", help="the embedded default model (SmolLM2-135M)")
    parser.add_argument("--synthetic", action="store_true", help="train bench/synthetic_lm.py's tiny model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the longest sequence")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--candidate-kv", default="fp8", choices=["auto", "fp8"],
                        help="the compared engine's KV cache (auto with --candidate-dtype: a noise floor)")
    parser.add_argument("--candidate-dtype", default="auto",
                        help="the compared engine's model dtype, e.g. bfloat16 against the CPU's float32")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT or bench/out)")
    args = parser.parse_args()
    started = time.perf_counter()
    model_dir: Path | None
    prompts: list[list[int]] | None
    with tempfile.TemporaryDirectory() as tmp:
        if args.embedded or args.model_dir:
            model_dir = Path(args.model_dir) if args.model_dir else None
            label = model_dir.name if model_dir else "embedded"
            prompts = None
        elif args.synthetic:
            model_dir, prompts = synthetic_checkpoint(Path(tmp) / "synthetic", args)
            label = "synthetic"
        else:
            label = args.model or ("qwen3-0.6b" if args.device.startswith("cuda") else "tiny")
            dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
            model_dir = make_checkpoint(label, Path(tmp) / "model", device=args.device, dtype=dtype)
            if label == "tiny":
                prompts = make_workload(args.num_prompts, 16, 128, max_token_id=4000).prompts
            else:  # the benchmark workload's prompts (100-1024 random ids)
                prompts = make_workload(256).prompts[:args.num_prompts]
        if prompts is None:  # a real checkpoint: text, its own tokenizer (engine/tokenizer.py's loader)
            from engine.model_files import resolve_model
            from engine.tokenizer import load_tokenizer

            files = resolve_model(None if model_dir is None else str(model_dir))
            prompts = text_prompts(load_tokenizer(files.config_dir), args.num_prompts)
        args.max_model_len = args.max_model_len or max(len(p) for p in prompts) + args.max_tokens
        # Room for every prompt's continuation at once (generate runs them together), 16-token blocks.
        num_kv_blocks = sum(-(-(len(p) + args.max_tokens) // 16) for p in prompts) + 64
        auto = make_engine(model_dir, args, "auto", num_kv_blocks)
        fp8 = make_engine(model_dir, args, args.candidate_kv, num_kv_blocks, args.candidate_dtype)
        metrics = compare(auto, fp8, prompts, args.max_tokens)
    result: dict[str, object] = dict(
        model=label, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        date=time.strftime("%Y-%m-%d"), candidate_kv=args.candidate_kv, candidate_dtype=args.candidate_dtype,
        num_prompts=len(prompts), max_tokens=args.max_tokens,
        mean_prompt_len=sum(len(p) for p in prompts) / len(prompts), wall_s=time.perf_counter() - started,
        **metrics)
    out_path = Path(args.json) if args.json else Path(os.environ.get("OUT", "bench/out")) / f"kv-quality-{label}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"\n{args.candidate_kv} KV cache, {args.candidate_dtype} model vs auto, {label} on {result['device']}: "
          f"{len(prompts)} prompts "
          f"(mean {result['mean_prompt_len']:.0f} tokens), {args.max_tokens} greedy tokens each")
    print(f"{'greedy identical':<24}{metrics['greedy_identical']:>10.3f}")
    print(f"{'greedy prefix':<24}{metrics['greedy_prefix']:>10.3f}")
    print(f"{'next-token agreement':<24}{metrics['next_token_agreement']:>10.4f}")
    print(f"{'mean KL (nats)':<24}{metrics['mean_kl']:>10.2e}")
    print(f"{'max KL (nats)':<24}{metrics['max_kl']:>10.2e}")
    print(f"{'auto self-agreement':<24}{metrics['auto_self_agreement']:>10.4f}")
    print(f"json: {out_path}")


if __name__ == "__main__":
    main()
