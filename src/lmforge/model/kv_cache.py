"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for positions [0, pos), in buffers allocated once for max_len positions."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        zeroed: bool = False,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        # Not zeroed unless asked: attention through update() reads only slots [0, pos), which it has
        # written. (Zeroing the cache of a batch of 8 on the bench model took 6 ms, 0.3% of a 128-token
        # generation, for nothing.) Attention over the whole cache (store_at) needs zeros in the rest.
        new = torch.zeros if zeroed else torch.empty
        self.k = new(shape, device=device, dtype=dtype)
        self.v = new(shape, device=device, dtype=dtype)
        # One view per layer, made once: indexing the 5-d buffers anew in every layer of every decoding
        # step costs more dispatches than the copy itself.
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
        self.max_len = max_len
        self.pos = 0  # number of positions already stored; the model advances it after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at [pos, pos+T) and return all keys/values up to pos+T."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        k_all, v_all = self._k_layers[layer], self._v_layers[layer]  # (B, n_kv_head, max_len, head_dim)
        k_all.narrow(2, self.pos, k.size(2)).copy_(k)
        v_all.narrow(2, self.pos, v.size(2)).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def store_at(
        self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, 1, head_dim) at slot (a (1,) tensor, read on the device only) and
        return the layer's whole buffers (B, n_kv_head, max_len, head_dim); pos is left to the caller."""
        k_all, v_all = self._k_layers[layer], self._v_layers[layer]
        k_all.index_copy_(2, slot, k)
        v_all.index_copy_(2, slot, v)
        return k_all, v_all

    def advance(self, n: int) -> None:
        """Mark n more positions as stored (called once per forward, after all layers)."""
        self.pos += n

    def reset(self) -> None:
        """Forget everything stored (the buffers are reused)."""
        self.pos = 0
