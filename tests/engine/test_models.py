"""Our Llama-family models against HF transformers: same float32 logits in one step and when the prompt is
fed in chunks through a paged cache with a shuffled block table; loader errors name what is wrong."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from engine.attention import AttentionMetadata, bind_kv_cache
from engine.errors import UnsupportedModelError
from engine.loader import load_model
from engine.model_files import ModelFiles, ModelNotFoundError, resolve_model
from engine.models import LlamaForCausalLM, get_model_class
from tests.helpers.tiny_models import ARCHITECTURES, make_tiny_model

BLOCK_SIZE = 4
NUM_BLOCKS = 16
PROMPT = [5, 17, 42, 99, 123, 7, 250, 64, 3, 300, 18, 77, 140]


def _load(model_dir: Path) -> LlamaForCausalLM:
    return load_model(ModelFiles(str(model_dir), model_dir), AutoConfig.from_pretrained(model_dir), torch.float32,
                      "cpu")


def _hf_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:  # [T, vocab]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0]


def _bind_cache(model: LlamaForCausalLM) -> None:
    cfg = model.config
    # Filled with garbage: any read of a slot this test did not write would show in the logits.
    kv = torch.randn(cfg.num_layers, 2, NUM_BLOCKS, cfg.num_kv_heads, BLOCK_SIZE, cfg.head_dim) * 100
    bind_kv_cache(model, kv)


def _step(model: LlamaForCausalLM, seqs: list[tuple[list[int], int, int, list[int]]]) -> torch.Tensor:
    """One forward over several sequences; each is (token_ids, num_computed, num_new, block_ids).
    Returns the logits of every scheduled token, [T, vocab]."""
    input_ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for token_ids, num_computed, num_new, block_ids in seqs:
        for pos in range(num_computed, num_computed + num_new):
            input_ids.append(token_ids[pos])
            positions.append(pos)
            slots.append(block_ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + num_new)
        seq_lens.append(num_computed + num_new)
    max_blocks = max(len(s[3]) for s in seqs)
    block_tables = torch.tensor([s[3] + [0] * (max_blocks - len(s[3])) for s in seqs], dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        max_query_len=max(s[2] for s in seqs), max_seq_len=max(seq_lens))
    with torch.inference_mode():
        hidden = model(torch.tensor(input_ids), torch.tensor(positions), metadata)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_step_and_chunked_match_hf(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    model_dir = tiny_model_dirs[arch]
    expected = _hf_logits(model_dir, PROMPT)
    model = _load(model_dir)
    _bind_cache(model)
    blocks = random.Random(arch).sample(range(NUM_BLOCKS), 4)  # non-contiguous, out of order

    one_step = _step(model, [(PROMPT, 0, len(PROMPT), blocks)])
    torch.testing.assert_close(one_step, expected, atol=1e-4, rtol=1e-4)

    _bind_cache(model)  # fresh garbage: the chunked run must rebuild the context itself
    chunks, num_computed = [], 0
    for num_new in (5, 3, 2, 1, 1, 1):  # chunked prefill crossing block edges, then decodes
        chunks.append(_step(model, [(PROMPT, num_computed, num_new, blocks)]))
        num_computed += num_new
    assert num_computed == len(PROMPT)
    torch.testing.assert_close(torch.cat(chunks), expected, atol=1e-4, rtol=1e-4)


def test_batched_sequences_match_hf_separately(tiny_model_dirs: dict[str, Path]) -> None:
    """A decode of one sequence and a prefill chunk of another in one step stay independent."""
    model_dir = tiny_model_dirs["qwen3"]
    other = [9, 8, 7, 6, 5, 4]
    model = _load(model_dir)
    _bind_cache(model)
    _step(model, [(other, 0, 5, [11, 2])])  # the other sequence's first 5 tokens are cached
    logits = _step(model, [(other, 5, 1, [11, 2]), (PROMPT, 0, 7, [6, 0])])
    torch.testing.assert_close(logits[0], _hf_logits(model_dir, other)[5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1:], _hf_logits(model_dir, PROMPT)[:7], atol=1e-4, rtol=1e-4)


def test_linear_rope_scaling_matches_hf(tmp_path: Path) -> None:
    model_dir = make_tiny_model("llama", tmp_path / "linear", rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = _load(model_dir)
    _bind_cache(model)
    logits = _step(model, [(PROMPT, 0, len(PROMPT), [3, 1, 2, 0])])
    torch.testing.assert_close(logits, _hf_logits(model_dir, PROMPT), atol=1e-4, rtol=1e-4)


def test_unknown_architecture_names_supported_ones() -> None:
    config = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError) as excinfo:
        get_model_class(config)
    message = str(excinfo.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_in_checkpoint_fails_at_load(tiny_model_dirs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tiny_model_dirs["llama"], tmp_path / "renamed")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"LlamaForSequenceClassification.*Qwen3ForCausalLM"):
        _load(model_dir)


def test_missing_weight_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tiny_model_dirs["llama"], tmp_path / "broken")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    del tensors["lm_head.weight"]  # not tied in the llama tiny model: required
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"missing 2 weights") as excinfo:
        _load(model_dir)
    assert "model.layers.1.self_attn.k_proj.weight" in str(excinfo.value)
    assert "lm_head.weight" in str(excinfo.value)


def test_sharded_checkpoint_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dirs["qwen2"]
    model_dir = _copy_checkpoint(src, tmp_path / "sharded")
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, model_dir / file)
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = _load(model_dir)
    _bind_cache(model)
    logits = _step(model, [(PROMPT, 0, len(PROMPT), [4, 9, 1, 5])])
    torch.testing.assert_close(logits, _hf_logits(src, PROMPT), atol=1e-4, rtol=1e-4)


def test_directory_without_safetensors(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _copy_checkpoint(tiny_model_dirs["qwen3"], tmp_path / "empty")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match=r"no \*\.safetensors files"):
        _load(model_dir)


def test_hub_id_that_cannot_be_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast either way
    with pytest.raises(ModelNotFoundError, match="not a local path and could not be downloaded") as info:
        resolve_model("tokenrelay-tests/no-such-model")
    assert "\n" not in str(info.value), "one line of ours, not the hub client's multi-line message"
