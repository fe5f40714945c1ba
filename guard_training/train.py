"""Step 4 of building a guard: train Linear(hidden, 2) (and the done head) and report how it stops.

Class-balanced cross entropy (excess tokens are the minority or the majority depending on the
model), AdamW, early stopping on a validation split made of whole samples (never tokens of a
sample on both sides). One guard for all languages.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from guard.policy import StopPolicy, find_stop
from guard.probe import CONTINUE_INDEX, STOP_INDEX, GenGuard


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 3
    val_fraction: float = 0.15
    seed: int = 0


def split_by_sample(sample_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation tokens, choosing whole samples."""
    unique = np.unique(sample_ids)
    rng = np.random.default_rng(seed)
    num_val = max(1, int(round(len(unique) * val_fraction)))
    val_samples = rng.choice(unique, size=num_val, replace=False)
    return np.isin(sample_ids, val_samples)


def fit(module: torch.nn.Module, loss_of, x_train: torch.Tensor, y_train: torch.Tensor,
        x_val: torch.Tensor, y_val: torch.Tensor, config: TrainConfig) -> tuple[float, int]:
    """AdamW with early stopping on validation loss; leaves `module` at its best state.
    `loss_of(module, x, y)` is the loss. Returns (best validation loss, epochs run)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    best_loss, best_state, epochs_without_gain, num_epochs = float("inf"), None, 0, 0
    for _ in range(config.max_epochs):
        num_epochs += 1
        module.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = loss_of(module, x_train[idx], y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            val_loss = float(loss_of(module, x_val, y_val))
        if val_loss < best_loss - 1e-4:
            best_loss, epochs_without_gain = val_loss, 0
            best_state = {k: v.clone() for k, v in module.state_dict().items()}
        else:
            epochs_without_gain += 1
            if epochs_without_gain >= config.patience:
                break
    module.load_state_dict(best_state)
    module.eval()
    return best_loss, num_epochs


def train_guard(features: np.ndarray, labels: np.ndarray, is_val: np.ndarray, hidden_size: int,
                config: TrainConfig = TrainConfig(), model_name: str = "",
                policy: StopPolicy | None = None, done_labels: np.ndarray | None = None,
                ) -> tuple[GenGuard, dict]:
    """Train the stop head; with `done_labels` (1 / 0 / -1 = not trained) also the done head."""
    torch.manual_seed(config.seed)
    x_train = torch.from_numpy(features[~is_val]).float()
    y_train = torch.from_numpy(labels[~is_val]).long()
    x_val, y_val = torch.from_numpy(features[is_val]).float(), torch.from_numpy(labels[is_val]).long()
    counts = torch.bincount(y_train, minlength=2).float().clamp(min=1)
    class_weights = counts.sum() / (2 * counts)  # balanced: each class weighs half the loss
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights)
    guard = GenGuard(hidden_size, model_name, policy, has_done_head=done_labels is not None)
    best_loss, num_epochs = fit(guard.linear, lambda m, x, y: loss_fn(m(x), y),
                                x_train, y_train, x_val, y_val, config)
    report = {"num_train_tokens": int(len(x_train)), "num_val_tokens": int(len(x_val)),
              "epochs": num_epochs, "best_val_loss": best_loss,
              "val": token_metrics(guard, x_val, y_val)}
    if done_labels is not None:
        report["done_head"] = train_done_head(guard, features, done_labels, is_val, config)
    return guard.eval(), report


def train_done_head(guard: GenGuard, features: np.ndarray, done_labels: np.ndarray,
                    is_val: np.ndarray, config: TrainConfig) -> dict:
    """Fit `guard.done_linear` on the rows with a done label (expected line ends)."""
    rows = done_labels >= 0
    train_rows, val_rows = rows & ~is_val, rows & is_val
    x_train, x_val = torch.from_numpy(features[train_rows]).float(), torch.from_numpy(features[val_rows]).float()
    y_train = torch.from_numpy(done_labels[train_rows]).float()
    y_val = torch.from_numpy(done_labels[val_rows]).float()
    # Unweighted, unlike the stop head: p_done is compared with a high threshold and must be a
    # calibrated probability (few line ends end the code; balancing would inflate p_done).
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best_loss, num_epochs = fit(guard.done_linear, lambda m, x, y: loss_fn(m(x)[:, 0], y),
                                x_train, y_train, x_val, y_val, config)
    with torch.no_grad():
        is_pred = guard.done_probs(x_val) >= 0.5
    is_done = y_val == 1
    hits = int((is_pred & is_done).sum())
    return {"num_train_line_ends": int(len(y_train)), "num_val_line_ends": int(len(y_val)),
            "epochs": num_epochs, "best_val_loss": best_loss,
            "val_precision": hits / max(int(is_pred.sum()), 1),
            "val_recall": hits / max(int(is_done.sum()), 1)}


@torch.no_grad()
def token_metrics(guard: GenGuard, x: torch.Tensor, y: torch.Tensor) -> dict:
    predicted = guard(x).argmax(dim=-1)
    is_pred_stop, is_stop = predicted == STOP_INDEX, y == STOP_INDEX
    true_stop = int((is_pred_stop & is_stop).sum())
    return {"token_accuracy": float((predicted == y).float().mean()),
            "stop_precision": true_stop / max(int(is_pred_stop.sum()), 1),
            "stop_recall": true_stop / max(int(is_stop.sum()), 1),
            "stop_fraction": float(is_stop.float().mean())}


def simulate_stop_line(p_stops: list[float], token_texts: list[str], policy: StopPolicy,
                       p_dones: list[float] | None = None) -> int | None:
    """Line index (0-based) of the first line the policy drops, or None if it never stops. The
    syntax gate is left out: it is chosen per model after the build, on held-out prompts."""
    stop = find_stop(p_stops, token_texts, replace(policy, syntax_gate=False), p_dones)
    return None if stop is None else "".join(token_texts[:stop[1]]).count("\n")


def ideal_stop_line(token_texts: list[str], labels: list[int]) -> int | None:
    """Line index (counted as simulate_stop_line counts) of the first token labelled stop: the
    first excess line, which is the line a perfect line vote stops on. None if nothing is excess."""
    line_index = 0
    for text, label in zip(token_texts, labels):
        if label == STOP_INDEX:
            return line_index
        line_index += text.count("\n")
    return None


def line_stop_errors(guard: GenGuard, samples: list[dict], features_by_sample: dict[int, np.ndarray],
                     policy: StopPolicy) -> dict:
    """Per sample: the line the policy stops on vs the first excess line from the labeler's cut.
    Error in lines: < 0 stopped too early (cut expected code), > 0 too late (kept excess)."""
    line_errors, never = [], 0
    for index, sample in features_by_sample.items():
        s = samples[index]
        hidden = torch.from_numpy(sample).float()
        p_stops = guard.stop_probs(hidden).tolist()
        p_dones = guard.done_probs(hidden)
        ends = s["char_ends"]
        texts = [s["completion"][(ends[i - 1] if i else 0):ends[i]] for i in range(len(ends))]
        num_lines = s["completion"].count("\n") + 1  # "never stopped" = ran to the end
        ideal = ideal_stop_line(texts, s["labels"])
        predicted = simulate_stop_line(p_stops, texts, policy, None if p_dones is None else p_dones.tolist())
        never += predicted is None
        line_errors.append((num_lines if predicted is None else predicted)
                           - (num_lines if ideal is None else ideal))
    errors = np.asarray(line_errors)
    n = max(len(errors), 1)
    return {"num_samples": len(errors), "stopped_early": float((errors < 0).sum()) / n,
            "stopped_exact_line": float((errors == 0).sum()) / n,
            "stopped_late": float((errors > 0).sum()) / n, "never_stopped": never / n,
            "mean_abs_line_error": float(np.abs(errors).mean()) if len(errors) else 0.0}


__all__ = ["TrainConfig", "train_guard", "split_by_sample", "token_metrics", "line_stop_errors",
           "simulate_stop_line", "ideal_stop_line", "CONTINUE_INDEX"]
