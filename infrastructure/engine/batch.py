"""The running batch's tensors: a left-padded KV cache shared by all rows, its attention mask,
each row's next position id and next input token. Rows join (merge) and leave (select) at step
boundaries; padding columns no row needs any more are trimmed away."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infrastructure.steering.hooks import BatchSteering, HookSet


def run_forward(model, steering: BatchSteering, ids, attention, positions, cache) -> torch.Tensor:
    """One forward with the batch's steering hooks registered for exactly its duration; float logits [B,V]."""
    with HookSet(model, steering):
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1, :].float()


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Pad `x` with `width` zeros at the start of dimension `dim`."""
    if width == 0:
        return x
    shape = list(x.shape)
    shape[dim] = width
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class BatchTensors:
    def __init__(self) -> None:
        self.cache = None  # transformers DynamicCache, keys/values [B, kv_heads, T, d]
        self.attention: torch.Tensor | None = None  # [B, T] long, 0 = padding
        self.next_position: torch.Tensor | None = None  # [B] long
        self.next_token: torch.Tensor | None = None  # [B] long
        self._flight: tuple[torch.Tensor, dict] | None = None

    @property
    def size(self) -> int:
        return 0 if self.attention is None else int(self.attention.shape[0])

    def clear(self) -> None:
        self.__init__()

    def merge(self, cache, attention: torch.Tensor, next_position: torch.Tensor, next_token: torch.Tensor) -> None:
        """Append freshly prefilled rows (their own cache and mask) below the running ones."""
        if self.size == 0:
            self.cache, self.attention = cache, attention
            self.next_position, self.next_token = next_position, next_token
            return
        t_old, t_new = self.attention.shape[1], attention.shape[1]
        width = max(t_old, t_new)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width - t_old, 2), _left_pad(new.keys, width - t_new, 2)])
            old.values = torch.cat([_left_pad(old.values, width - t_old, 2), _left_pad(new.values, width - t_new, 2)])
        self.attention = torch.cat(
            [_left_pad(self.attention, width - t_old, 1), _left_pad(attention, width - t_new, 1)]
        )
        self.next_position = torch.cat([self.next_position, next_position])
        self.next_token = torch.cat([self.next_token, next_token])

    def select(self, keep: list[int]) -> list[int]:
        """Keep only the rows at `keep` (in that order) and trim padding columns nobody uses."""
        if not keep:
            self.clear()
            return []
        index = torch.tensor(keep, device=self.attention.device)
        self.attention = self.attention[index]
        self.next_position = self.next_position[index]
        self.next_token = self.next_token[index]
        used = self.attention.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self.attention = self.attention[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        return keep

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    def launch(self, model, steering: BatchSteering) -> None:
        """One decode step for every row (inputs: the rows' next tokens), queued eagerly; see `collect`."""
        ids, attention, positions = self.advance(self.next_token)
        logits = run_forward(model, steering, ids, attention, positions, self.cache)
        self._flight = (logits, dict(steering.captured))

    def collect(self) -> tuple[torch.Tensor, dict]:
        """The launched step's float logits [B,V] and captures (rows do not change in between here)."""
        out, self._flight = self._flight, None
        return out

    def advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the next decode step: tokens [B,1], attention [B,T+1], positions [B,1]."""
        self.attention = F.pad(self.attention, (0, 1), value=1)
        positions = self.next_position.unsqueeze(-1)
        self.next_position = self.next_position + 1
        return tokens.unsqueeze(-1), self.attention, positions
