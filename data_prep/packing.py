"""Packing examples into rows of max_seq_len tokens, where it is exact.

A packed row holds several examples back to back, with ``seq_lengths`` saying where
each ends. TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=
True)``) turns those into position ids that restart at 0 for each example (and
flash-attention's ``cu_seq_lens``); transformers (masking_utils) then builds a
block-diagonal causal mask from the restarting position ids, so no token attends to
another example. That only holds for models whose attention mask is built from the position ids, which
is a property of the installed transformers release, not of the architecture (5.23's
Falcon built its mask without them; 5.24's uses them; BLOOM's ALiBi biases come from
the attention mask). So it is measured, not listed: finetune.probes.packing runs a
tiny random-weight copy of the model's architecture packed and unpacked on the
installed release and compares the logits (cached per release). Where packing is not
exact, or cannot be measured, the data stage falls back to ordinary padded batches and
says why in the report.

Bins are filled best-fit-decreasing (the "Fewer Truncations" paper's BFD, as TRL's
``pack_dataset(strategy="bfd")``), but over a bounded window of examples at a time, so
that a corpus larger than memory packs in a stream; TRL's packs a whole Arrow table in
memory (in batches of the map's batch size).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any


def decide(requested: bool, model_type: str | None, model_config: dict[str, Any] | None = None,
           probe: Callable[[dict[str, Any]], Any] | None = None) -> tuple[bool, str]:
    """(pack?, why) for dataset.packing and the model's architecture: `model_config` is its config.json
    (structural flags such as ALiBi matter), else the defaults of `model_type`'s config class. `probe` answers
    whether padding-free packing is exact for a config (an object with ``exact`` and ``detail``): the pipeline
    hands over finetune.probes.packing.padding_free_packing, so that the data stage imports nothing of the
    model layers."""
    if not requested:
        return False, "dataset.packing is false"
    if model_type is None:
        return False, "the model's architecture is unknown, so padding-free packing cannot be verified; " \
                      "training uses padded batches"
    if probe is None:
        return False, "no packing probe was given, so padding-free packing cannot be verified; training uses " \
                      "padded batches"
    config = dict(model_config) if model_config else _default_config(model_type)
    if config is None:
        return False, (f"padding-free packing cannot be verified for '{model_type}' (transformers has no "
                       "config class for it); training uses padded batches")
    config.setdefault("model_type", model_type)
    measured = probe(config)
    if not measured.exact:
        return False, f"padding-free packing is not exact for '{model_type}' ({measured.detail}); " \
                      "training uses padded batches instead"
    return True, f"padding-free packing is exact for '{model_type}' (position ids restart per example; " \
                 f"{measured.detail})"


def _default_config(model_type: str) -> dict[str, Any] | None:
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type).to_dict()
    except (ValueError, KeyError):
        return None


class _MaxTree:
    """Which free spaces (1..capacity) some open bin has; finds the smallest one >= a length."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 1 << max(0, (capacity - 1).bit_length())
        self.tree = [0] * (2 * self.size)

    def set(self, space: int, present: bool) -> None:
        i = self.size + space - 1
        self.tree[i] = space if present else 0
        i >>= 1
        tree = self.tree
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            tree[i] = left if left >= right else right
            i >>= 1

    def smallest_at_least(self, length: int) -> int:
        """The smallest present space >= length, or 0 when none."""
        tree = self.tree
        if tree[1] < length:
            return 0
        i = 1
        while i < self.size:
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        return tree[i]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity`.

    Longest first; each goes into the open bin it fills most tightly, else a new bin.
    Deterministic (ties keep the input order).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    tree = _MaxTree(capacity)
    open_bins: dict[int, deque[int]] = defaultdict(deque)  # free space -> bins with exactly that much free
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n <= 0 or n > capacity:
            raise ValueError(f"cannot pack an example of {n} tokens into rows of {capacity}")
        space = tree.smallest_at_least(n)
        if space:
            b = open_bins[space].popleft()
            if not open_bins[space]:
                tree.set(space, False)
        else:
            b, space = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if not open_bins[left]:
                tree.set(left, True)
            open_bins[left].append(b)
    return bins
