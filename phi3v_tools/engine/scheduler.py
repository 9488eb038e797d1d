"""Admission: which waiting requests join the running batch at this step. Pure policy, no torch.

vLLM V1's scheduler spends a per-step token budget on running rows first, then admits waiting requests
whose prompts are then prefilled in chunks. Here the decode step always runs every running row (one
token each); the budget limits the prompt tokens prefilled per step (``prefill_chunk_tokens``) and the
images encoded per step (``max_step_images``), so a running row waits at most one bounded chunk between
its tokens. Admission itself is bounded by:

- ``max_batch_size`` rows (running + being prefilled);
- the KV budget ``max_batch_tokens``: rows are left-padded to one length, so the cache can grow to
  ``rows x the longest row's prompt + max_new_tokens``; a request joins only when that bound, with it,
  stays within the budget. It is reserved in full at admission, so a running row never needs memory that
  is not there: when the budget is full, requests wait (first come, first served). Unset, the budget is
  what memory holds (:func:`kv_budget_tokens`): a share of the GPU memory left free once the model is
  loaded, or a fixed amount of host memory on CPU and MPS, as vLLM sizes its KV cache from
  ``gpu_memory_utilization``;
- the LongRoPE rule: a request whose prompt + max_new_tokens crosses the model's
  ``original_max_position_embeddings`` (4096) switches rotary factors mid-answer for the whole batch, so
  it runs with no company. So does a request re-run after a failed step (``isolated``), so that only the
  row the failure came from fails.

Admission is first come, first served: when the oldest waiting request cannot join, no younger one
overtakes it (no request starves behind a stream of small ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Schedulable(Protocol):
    @property
    def budget(self) -> int: ...  # prompt tokens + max_new_tokens: the most KV positions it can need

    @property
    def alone(self) -> bool: ...  # must run with no company (LongRoPE switch, or an isolated re-run)


KV_GPU_FRACTION = 0.4  # of the memory free after loading (a join briefly holds two copies: 0.8 at worst)
KV_HOST_BYTES = 4 * 2**30  # CPU and MPS: at most this much (host memory is shared with everything else)


def kv_budget_tokens(bytes_per_token: int, memory_bytes: int, max_rows: int, max_context: int) -> int:
    """The KV bound, in tokens, that ``memory_bytes`` holds.

    Never more than ``max_rows`` full contexts (the padded cache cannot grow past that, so a larger bound
    would only hide a memory figure that is never used), never less than one (an idle engine runs any
    request that passed submission)."""
    fits = memory_bytes // max(bytes_per_token, 1)
    return int(max(max_context, min(fits, max_rows * max_context)))


@dataclass(frozen=True)
class AdmissionLimits:
    max_rows: int  # max_batch_size
    kv_tokens: int  # max_batch_tokens: rows x the longest row's budget


def can_admit(candidate: Schedulable, active: Sequence[Schedulable], limits: AdmissionLimits) -> bool:
    """Whether ``candidate`` may join the ``active`` rows (running or being prefilled) now."""
    if not active:
        return True  # an idle engine takes anything that passed submission (even one above the KV budget)
    if candidate.alone or any(row.alone for row in active):
        return False
    if len(active) + 1 > limits.max_rows:
        return False
    longest = max(candidate.budget, *(row.budget for row in active))
    return (len(active) + 1) * longest <= limits.kv_tokens


def admit(waiting: Sequence[Schedulable], active: Sequence[Schedulable], limits: AdmissionLimits) -> int:
    """How many of ``waiting`` (oldest first) join now: a prefix, so nobody is overtaken."""
    joined: list[Schedulable] = list(active)
    count = 0
    for candidate in waiting:
        if not can_admit(candidate, joined, limits):
            break
        joined.append(candidate)
        count += 1
    return count


def prefill_plan(remaining: Sequence[int], chunk: int, budget: int) -> list[int]:
    """Prompt tokens to prefill this step for each row being prefilled (oldest first).

    Each row's prompt is cut at fixed multiples of ``chunk`` (so its prefill, and therefore its tokens, do not
    depend on its companions); chunks are taken oldest row first while ``budget`` lasts, and the first chunk
    always runs (a step makes progress).
    """
    plan: list[int] = []
    left = budget
    for need in remaining:
        size = min(chunk, need)
        if plan and size > left:
            break
        plan.append(size)
        left -= size
        if left <= 0:
            break
    return plan
