"""Packing examples into rows of max_seq_len tokens, where it is exact.

A packed row holds several examples back to back, with ``seq_lengths`` saying where
each ends. TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=
True)``) turns those into position ids that restart at 0 for each example (and
flash-attention's ``cu_seq_lens``); transformers (masking_utils) then builds a
block-diagonal causal mask from the restarting position ids, so no token attends to
another example. That only holds for models whose attention mask is built from the
position ids. tests/test_data_packing.py runs every family below packed and unpacked
and compares the logits:

* exact (differences ~1e-7, float reassociation): Llama, Mistral, Mixtral, GPT-J,
  GPT-NeoX, Phi, Phi-3, Gemma, Gemma 2, Qwen2;
* not exact: Falcon and BLOOM build their mask without the position ids (and BLOOM's
  ALiBi biases come from the attention mask), so a packed example attends to the ones
  before it. For them, and for any architecture not verified, the data stage falls
  back to ordinary padded batches and says so in the report.

Bins are filled best-fit-decreasing (the "Fewer Truncations" paper's BFD, as TRL's
``pack_dataset(strategy="bfd")``), but over a bounded window of examples at a time, so
that a corpus larger than memory packs in a stream; TRL's packs a whole Arrow table in
memory (in batches of the map's batch size).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

# model_type -> verified by tests/test_data_packing.py
PADDING_FREE_EXACT = frozenset({
    "llama", "mistral", "mixtral", "gptj", "gpt_neox", "phi", "phi3", "gemma", "gemma2", "qwen2",
})
PADDING_FREE_LEAKS = {
    "falcon": "Falcon builds its attention mask without the position ids, so packed examples would attend "
              "to each other",
    "bloom": "BLOOM builds its attention mask and ALiBi biases without the position ids, so packed examples "
             "would attend to each other",
}


def decide(requested: bool, model_type: str | None) -> tuple[bool, str]:
    """(pack?, why) for dataset.packing and the model's architecture."""
    if not requested:
        return False, "dataset.packing is false"
    if model_type is None:
        return False, "the model's architecture is unknown, so padding-free packing cannot be verified; " \
                      "training uses padded batches"
    if model_type in PADDING_FREE_LEAKS:
        return False, f"{PADDING_FREE_LEAKS[model_type]}; training uses padded batches instead"
    if model_type not in PADDING_FREE_EXACT:
        return False, (f"padding-free packing is not verified for '{model_type}' (verified: "
                       f"{', '.join(sorted(PADDING_FREE_EXACT))}); training uses padded batches")
    return True, f"padding-free packing is exact for '{model_type}' (position ids restart per example)"


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
