"""One admitted request's state in the engine: what preparation made, and the current attempt's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phi3v_tools.engine.types import RequestHandle

if TYPE_CHECKING:
    import torch

    from phi3v_tools.engine.model_runner import Prefill
    from phi3v_tools.engine.output import TextDeltas
    from phi3v_tools.engine.sampler import RowSampling
    from phi3v_tools.feature_cache import CachedFeatures
    from phi3v_tools.grammar import JsonConstraint


@dataclass
class Row:
    handle: RequestHandle
    ids: list[int]  # the prompt's token ids (images as runs of -k)
    keys: list[str]  # feature-cache key per image
    entries: list[CachedFeatures | None]  # per image: its features once known
    pixels: dict[int, tuple[torch.Tensor, tuple[int, int]]]  # image index -> (crops, HD size) still to encode
    image_tokens: int
    cached_images: int
    preprocess_s: float
    constraint: JsonConstraint | None
    sampling: RowSampling
    alone_above: int  # budgets above this cross the LongRoPE switch
    isolated: bool = False  # re-run after a failed step: runs with no company
    ready_at: float = 0.0  # when it reached the waiting queue (prepared)
    vision_s: float = 0.0
    prefill_s: float = 0.0
    prefill: Prefill | None = None
    tokens: list[int] = field(default_factory=list)
    text: TextDeltas | None = None  # streaming: the text pieces not yet sent
    produced: str = ""  # streamed text this attempt has produced
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    prefill_alone: bool = False  # its prompt is prefilled on its own (a group it was in failed)

    @property
    def budget(self) -> int:
        return len(self.ids) + self.handle.max_new_tokens

    @property
    def crosses_switch(self) -> bool:
        """Its prompt + answer may cross the LongRoPE switch: it is decoded by the switch-aware decoder."""
        return self.budget > self.alone_above

    @property
    def alone(self) -> bool:
        return self.isolated or self.crosses_switch

    def restart(self) -> None:
        """Back to the start of decoding (a re-run after a failed step): same seed, fresh grammar state."""
        self.prefill = None
        self.tokens = []
        self.text = None
        self.produced = ""
        self.prefill_s = 0.0
        self.sampling.restart()
        if self.constraint is not None:
            self.constraint.matcher.reset()
