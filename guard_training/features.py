"""Steps 2-3 of building a guard: label every generated token, extract its hidden state.

Label: tree-sitter finds where the function the prompt opened closes (guard/labeler.py); tokens
before the cut are `continue` (1), after it `stop` (0). Done label (for the done head): 1 on a
line-end token after which no expected code is left, 0 on other expected line ends, -1 (not
trained) elsewhere: the done rule is only consulted at line ends of lines the votes keep.
Feature: the guard votes on token i with the hidden state that produced token i's logits, i.e.
the last hidden state (after the final norm) at position prompt_len + i - 1. One batched forward
over prompt + completion gives all of them; nothing is regenerated.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from evals.labeler import find_cut, label_tokens
from guard.policy import count_blank_lines


def token_char_ends(tokenizer, completion_ids: list[int]) -> list[int]:
    """Where each token's text ends in the decoded completion (prefix decoding, O(n^2) but n<=300)."""
    return [len(tokenizer.decode(completion_ids[:i + 1], skip_special_tokens=True))
            for i in range(len(completion_ids))]


def done_labels(completion: str, char_ends: list[int], labels: list[int], cut_char: int) -> list[int]:
    """Per token: 1 = an expected line end with only whitespace left before the cut (the code is
    done), 0 = an expected line end with code still to come, -1 = not a line end or excess."""
    done, start = [], 0
    for end, label in zip(char_ends, labels):
        if label != 1 or "\n" not in completion[start:end]:
            done.append(-1)
        else:
            done.append(int(not completion[end:cut_char].strip()))
        start = max(start, end)
    return done


def done_ends_opening_blank_line(samples: list[dict]) -> tuple[int, int]:
    """(done line ends that also open a blank line, all done line ends) over labeled samples:
    whether the model ends a finished unit with a merged `\n\n` token, which lets the done rule
    wait for one (StopPolicy.done_needs_blank_line; the same test on the same line text)."""
    num_opening = num_done = 0
    for sample in samples:
        line_start = start = 0
        for end, done in zip(sample["char_ends"], sample["done_labels"]):
            if done == 1:
                num_done += 1
                num_opening += count_blank_lines(0, sample["completion"][line_start:end]) > 0
            if "\n" in sample["completion"][start:end]:
                line_start = end
            start = max(start, end)
    return num_opening, num_done


def label_samples(tokenizer, samples: list[dict]) -> tuple[list[dict], Counter]:
    """Attach `labels` (one per completion token) and `cut_char`; skip unparseable completions."""
    labeled, counts = [], Counter()
    for sample in samples:
        if not sample["completion_ids"]:
            counts["empty"] += 1
            continue
        cut = find_cut(sample["language"], sample["prompt"], sample["completion"], sample["entry_point"],
                       ends_at_eos=sample.get("finish_reason") == "eos")
        if not cut.is_parseable:
            counts[f"skipped: {cut.reason}"] += 1
            continue
        ends = token_char_ends(tokenizer, sample["completion_ids"])
        labels = label_tokens(ends, cut.cut_char)
        labeled.append({**sample, "cut_char": cut.cut_char, "labels": labels, "char_ends": ends,
                        "done_labels": done_labels(sample["completion"], ends, labels, cut.cut_char)})
        counts["labeled"] += 1
    return labeled, counts


@torch.inference_mode()
def extract_features(model, tokenizer, samples: list[dict], batch_size: int = 8) -> dict[str, np.ndarray]:
    """Hidden states of all generated positions, with labels and (sample, token) indices."""
    backbone = model.base_model
    features, labels, dones, sample_index, token_index = [], [], [], [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        sequences = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] + s["completion_ids"]
                     for s in batch]
        length = max(len(s) for s in sequences)
        input_ids = torch.tensor([[0] * (length - len(s)) + s for s in sequences])
        mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        for row, sample in enumerate(batch):
            num_generated = len(sample["completion_ids"])
            # Left padding: the sequence ends at the last column; token i was produced at column
            # length - num_generated - 1 + i.
            first = length - num_generated - 1
            features.append(hidden[row, first:first + num_generated].float().numpy().astype(np.float16))
            labels.append(np.asarray(sample["labels"], dtype=np.int8))
            dones.append(np.asarray(sample.get("done_labels", [-1] * num_generated), dtype=np.int8))
            sample_index.append(np.full(num_generated, start + row, dtype=np.int32))
            token_index.append(np.arange(num_generated, dtype=np.int32))
    return {"features": np.concatenate(features), "labels": np.concatenate(labels),
            "done_labels": np.concatenate(dones),
            "sample_index": np.concatenate(sample_index), "token_index": np.concatenate(token_index)}


def save_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
