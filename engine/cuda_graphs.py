"""DecodeGraphs: CUDA graphs of the model's forward for pure-decode steps, one per padded batch size.

A decode step launches ~10 kernels per layer; replaying a captured graph removes the launch and
Python overhead (PERFORMANCE.md: without graphs, launches alone eat the ~7 ms step budget). The host
sends one packed [4, B] int64 tensor per step; block tables live on the device (the runner keeps
them up to date incrementally) and slot mappings are computed inside the graph."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata
from kernels.reference import PAD_SLOT_ID

logger = logging.getLogger(__name__)

ModelForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

# Rows of the packed per-step input.
INPUT_IDS, POSITIONS, TABLE_ROWS, SEQ_LENS = range(4)
PADDING_ROW = 0  # block-table row of padded batch slots (never assigned to a request)
# An input id the host does not know yet (async scheduling): the previous step sampled it on the device.
PENDING_TOKEN = -1


def fill_pending_tokens(input_ids: torch.Tensor, token_buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Replace each PENDING_TOKEN by the last token sampled for its request's row (token_buffer[row])."""
    return torch.where(input_ids == PENDING_TOKEN, token_buffer.index_select(0, rows), input_ids)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (padding wastes < 16 rows)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(self, forward: ModelForward, block_table: torch.Tensor, token_buffer: torch.Tensor, *,
                 max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.forward = forward
        self.block_table = block_table  # [num_rows, max_blocks] int32 on the device, owned by the runner
        self.token_buffer = token_buffer  # [num_rows] int64: each row's last sampled token, owned by the runner
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch_size = self.batch_sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        device = block_table.device
        n = self.max_batch_size
        # Static inputs: a replay reads whatever these hold, so each step copies into them.
        self.packed = torch.zeros((4, n), dtype=torch.int64, device=device)
        # Two pinned staging buffers, used in turn: with async scheduling step n+1 is staged while step n's
        # copy may still sit in the stream's queue; step n-1's copy has run (its tokens were read).
        self.staging = [torch.zeros((4, n), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._num_runs = 0
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token each
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _forward_packed(self, batch_size: int) -> torch.Tensor:
        packed = self.packed[:, :batch_size]
        positions = packed[POSITIONS]
        seq_lens = packed[SEQ_LENS].to(torch.int32)
        block_tables = self.block_table.index_select(0, packed[TABLE_ROWS])  # [B, max_blocks]
        input_ids = fill_pending_tokens(packed[INPUT_IDS], self.token_buffer, packed[TABLE_ROWS])
        block_ids = block_tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        slot_mapping = torch.where(seq_lens > 0, slot_mapping, PAD_SLOT_ID)  # padded rows write nothing
        # max_seq_len is the captured upper bound: the kernel skips rows past their seq_len (and padded
        # rows with seq_len 0), so one graph serves every context length.
        meta = AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=self.query_start_loc[:batch_size + 1],
                                 seq_lens=seq_lens, block_tables=block_tables, max_query_len=1,
                                 max_seq_len=self.max_model_len)
        return self.forward(input_ids, positions, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self.packed.zero_()  # all rows padding: row PADDING_ROW, seq_len 0
        # Largest first, so the smaller graphs fit in the memory the largest already took.
        for bs in reversed(self.batch_sizes):
            for _ in range(2):  # warm up: Triton compiles outside the capture
                self._forward_packed(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward_packed(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    def table_rows(self, num_seqs: int) -> torch.Tensor:
        """The block-table rows of the last run's requests, on the device (valid until the next run)."""
        return self.packed[TABLE_ROWS, :num_seqs]

    def run(self, input_ids: list[int], positions: list[int], table_rows: list[int]) -> torch.Tensor:
        """One decode step of B requests; returns hidden states [B, hidden] (a view, valid until the
        next replay). An input id of PENDING_TOKEN is read from the token buffer at the request's row."""
        num_seqs = len(input_ids)
        bs = next(b for b in self.batch_sizes if b >= num_seqs)
        staging = self.staging[self._num_runs % 2][:, :bs]
        self._num_runs += 1
        staging[:, :num_seqs] = torch.tensor([input_ids, positions, table_rows,
                                              [p + 1 for p in positions]], dtype=torch.int64)
        if bs > num_seqs:
            staging[:, num_seqs:] = 0  # padding: token 0 at row PADDING_ROW with seq_len 0
        self.packed[:, :bs].copy_(staging, non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:num_seqs]
