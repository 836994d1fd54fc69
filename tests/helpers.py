"""Shared test fixtures: a tiny causal LM, ragged data, and a 2-rank launcher."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


class RaggedLM(torch.utils.data.Dataset):
    """Fixed-width rows whose valid length varies (labels -100 past it), so
    micro-batches hold different numbers of targets: a mean of micro-batch
    means is then measurably wrong, a token-weighted mean is right."""

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(3, SEQ + 1, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
            mask = (torch.arange(SEQ) < length).long()
            labels = ids.masked_fill(mask == 0, -100)
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update({
        "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
    })
    torch.set_num_threads(1)
    try:
        fn(local_rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        if torch.distributed.is_initialized():
            import time

            time.sleep(0.2)  # let gloo's worker free the last work first (see Strategy.teardown)
            torch.distributed.destroy_process_group()
    # A normal interpreter exit lets gloo's worker thread free a tensor during
    # shutdown and abort the process now and then (SIGABRT, seen in CI for an
    # FSDP resume job; CPU notes measured 1 in 20 runs). The job has finished
    # and written its results, so skip the shutdown as the CLI does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 240.0) -> None:
    """Run fn(rank, *args) on `world_size` spawned processes; a child's
    exception fails the test with its traceback, a hang fails after `timeout`."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False,
                             start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout}s")


def tiny_llama(seed: int = 0, **config):
    """SmolLM2's architecture (Llama, tied embeddings) at toy size, nn.Linear layers; `config` overrides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
                         **config})
    return LlamaForCausalLM(cfg)


def summed_lm_loss(net, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A causal LM's cross-entropy over padded rows (input_ids, attention_mask, labels), summed over their
    targets, and the target count: a plain-PyTorch reference, written without scaletrain."""
    import torch.nn.functional as F

    logits = net(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]
    targets = rows["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((targets != -100).sum())


def plain_adamw_steps(net, batches: list[dict[str, torch.Tensor]], lr: float, clip: float) -> list[float]:
    """One AdamW step (no weight decay) per batch on its loss summed over its targets and divided by their count,
    gradients clipped to `clip`; each step's loss."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for rows in batches:
        loss, count = summed_lm_loss(net, rows)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / count)
    return losses


def mean_target_loss(net, batches: list[dict[str, torch.Tensor]]) -> float:
    """The loss over every target of `batches` (evaluation's eval_loss), without gradients."""
    with torch.no_grad():
        sums = [summed_lm_loss(net, rows) for rows in batches]
    return sum(loss.item() for loss, _ in sums) / sum(count for _, count in sums)
