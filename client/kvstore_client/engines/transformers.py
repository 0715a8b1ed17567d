"""Prefix reuse for Hugging Face transformers causal LMs (transformers >= 5, ``DynamicCache``).

Request flow of :meth:`KVCacheAdapter.generate` (batch size 1)::

    lookup(prompt[:reusable])          one round trip; reusable = whole chunks of len-1 tokens
    retrieve(prompt[:matched])         only on a hit
    DynamicCache <- stored KV          on the model's device and dtype
    model(prompt[matched:], cache)     prefill only the rest -> first token (TTFT ends here)
    StoreQueue <- new full chunks      background thread, never on the critical path
    greedy decode

At least one prompt token is always prefilled (its logits give the first token), so a full
hit reuses ``floor((len - 1) / chunk_tokens)`` chunks.

The adapter sees the store only through :class:`~kvstore_client.engines.PrefixStore`; the
transport (streamed gRPC today, shared memory on one host later) lives behind the client.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kvstore_wire.keys import Namespace
from kvstore_wire.types import DType, Durability, Tier
from ._base import PrefixStore, StoreQueue

#: Config keys that do not change the KV a checkpoint computes (bookkeeping, dtype: the
#: dtype is a namespace field of its own). ``quantization_config`` stays in: the same revision
#: loaded 4-bit and unquantized computes different KV.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"})


# ----------------------------------------------------------------------------- namespace

def model_identity(model: Any) -> str:
    """``<name>@<revision or weights digest>+cfg:<config digest>`` for a transformers model.

    The revision is the hub commit the checkpoint was loaded from (``config._commit_hash``);
    without one (local or GGUF checkpoints) a SHA-256 over every parameter and buffer is
    computed once per model object (~1 s per GB on CPU). Pass an explicit ``model_id`` to
    :func:`namespace_for` to skip that, e.g. a digest of the weight file you loaded.
    """
    cfg = model.config
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "model")
    rev = getattr(cfg, "_commit_hash", None)
    weights = f"rev:{rev}" if rev else f"weights-sha256:{weights_digest(model)[:32]}"
    return f"{name}@{weights}+cfg:{config_digest(cfg)[:16]}"


def config_digest(cfg: Any) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: Any) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in the state dict; memoised."""
    cached = getattr(model, "_kvstore_weights_digest", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    model._kvstore_weights_digest = digest
    return digest


def namespace_for(model: Any, *, chunk_tokens: int = 256, model_id: str | None = None,
                  tp_rank: int = 0, tp_size: int = 1) -> Namespace:
    """The namespace of ``model``'s KV: identity, dtype and KV geometry from the model itself.

    The tenant is left empty: the daemon fills it in from the caller's credential.
    """
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Namespace(model=model_id or model_identity(model), dtype=DType.parse(str(model.dtype)),
                     num_layers=cfg.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                     tp_rank=tp_rank, tp_size=tp_size, chunk_tokens=chunk_tokens)


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class PrefixLoad:
    """What :meth:`KVCacheAdapter.load_prefix` found and loaded."""

    cache: Any                      #: DynamicCache holding ``matched_tokens`` tokens
    matched_tokens: int
    tiers: tuple[Tier, ...]         #: tier of each reused chunk, as reported by lookup
    lookup_s: float                 #: cache set-up + the lookup round trip
    retrieve_s: float               #: retrieve + copy into the cache (0 on a miss)


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]               #: generated ids (prompt excluded; the EOS, if hit, included)
    prompt_tokens: int
    matched_tokens: int             #: prompt tokens whose KV came from the store
    tiers: tuple[Tier, ...]
    ttft_s: float                   #: call start -> first token id known (lookup+load+prefill)
    lookup_s: float                 #: cache set-up + lookup round trip: all a miss adds before prefill
    retrieve_s: float               #: retrieve + copy into the cache (0 on a miss)
    prefill_s: float
    decode_s: float
    stored_async: bool              #: a background store of new chunks was queued

    @property
    def hit_tier(self) -> Tier:
        """The slowest tier any reused chunk came from (NONE on a miss)."""
        return max(self.tiers, default=Tier.NONE)

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.matched_tokens


# ----------------------------------------------------------------------------- adapter

class KVCacheAdapter:
    """Loads stored prefix KV into a ``DynamicCache`` and stores new chunks in the background.

    ``store`` is any :class:`PrefixStore` bound to this model's namespace (normally a
    ``KVStoreClient`` built with :func:`namespace_for`); :meth:`connect` builds one.
    Batch size 1; full-attention decoder layers only (sliding-window or linear-attention
    layers keep partial state a prefix store cannot restore, so such models are refused).

    Thread model: ``generate``/``load_prefix`` run on the caller's thread; stores run on the
    adapter's :class:`StoreQueue` thread. Call :meth:`flush` to wait for stores (e.g. before
    another process should see them) and :meth:`close` when done.
    """

    def __init__(self, model: Any, store: PrefixStore, *, chunk_tokens: int | None = None,
                 store_back: bool = True, store_durability: Durability | None = None,
                 max_pending_stores: int = 4) -> None:
        ns = getattr(store, "namespace", None)
        if chunk_tokens is None:
            if ns is None:
                raise ValueError("pass chunk_tokens, or a store with a .namespace")
            chunk_tokens = ns.chunk_tokens
        if ns is not None:
            _check_namespace_matches(model, ns, chunk_tokens)
        self.model = model
        self.store = store
        self.chunk_tokens = chunk_tokens
        self.store_back = store_back
        #: Passed to ``store.store(..., durability=)`` when set (PERSISTED: acknowledged once on disk).
        self.store_durability = store_durability
        self._queue = StoreQueue(max_pending_stores)
        # KVStoreClient.retrieve can hand back a torch view (no numpy round trip for bf16/fp8).
        self._retrieve_as_torch = "as_torch" in inspect.signature(store.retrieve).parameters
        _check_full_attention(model)

    @classmethod
    def connect(cls, model: Any, addr: str, *, chunk_tokens: int = 256, model_id: str | None = None,
                token: str | None = None, **kwargs: Any) -> "KVCacheAdapter":
        from ..client import KVStoreClient

        ns = namespace_for(model, chunk_tokens=chunk_tokens, model_id=model_id)
        return cls(model, KVStoreClient(addr, ns, token=token), chunk_tokens=chunk_tokens, **kwargs)

    # -- prefix load ------------------------------------------------------------------

    def reusable_tokens(self, num_prompt_tokens: int) -> int:
        """Most prompt tokens that may come from the store: whole chunks, one token left over."""
        c = self.chunk_tokens
        return max(0, (num_prompt_tokens - 1) // c * c)

    def load_prefix(self, input_ids: Any) -> PrefixLoad:
        """One lookup round trip; on a hit, retrieves the prefix into a fresh ``DynamicCache``.

        Use the cache with ``model.generate(input_ids, past_key_values=load.cache)`` (which
        prefills only the uncached tail) or through :meth:`generate`.
        """
        ids = _as_id_list(input_ids)
        from transformers import DynamicCache

        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        reusable = self.reusable_tokens(len(ids))
        matched, tiers = 0, ()
        if reusable:
            found = self.store.lookup(ids[:reusable])
            matched = min(int(found.matched_tokens), reusable)
            tiers = tuple(Tier(int(t)) for t in getattr(found, "tiers", ()))
        t1 = time.perf_counter()
        if matched:
            got, kv = (self.store.retrieve(ids[:matched], as_torch=True) if self._retrieve_as_torch
                       else self.store.retrieve(ids[:matched]))
            # Chunks can be evicted between lookup and retrieve: use what actually came back.
            matched = min(int(got), matched) // self.chunk_tokens * self.chunk_tokens
            tiers = tiers[: matched // self.chunk_tokens]
            if matched:
                self._fill_cache(cache, kv, matched)
        t2 = time.perf_counter()
        return PrefixLoad(cache=cache, matched_tokens=matched, tiers=tiers, lookup_s=t1 - t0, retrieve_s=t2 - t1)

    def _fill_cache(self, cache: Any, kv: Any, num_tokens: int) -> None:
        t = _as_tensor(kv, self.model.dtype)
        layers = len(cache.layers) if cache.layers else self.model.config.get_text_config(decoder=True).num_hidden_layers
        if t.dim() != 5 or t.shape[0] != layers or t.shape[1] != 2 or t.shape[2] < num_tokens:
            raise ValueError(f"retrieved KV has shape {tuple(t.shape)}; expected [{layers}, 2, >={num_tokens}, kv_heads, head_dim]")
        # [L, 2, T, H, D] -> per layer [1, H, T, D]; one host->device copy of the whole prefix.
        t = t[:, :, :num_tokens].to(device=self.model.device, dtype=self.model.dtype, non_blocking=True)
        t = t.permute(0, 1, 3, 2, 4)
        for i in range(layers):
            cache.update(t[i, 0].unsqueeze(0), t[i, 1].unsqueeze(0), i)

    # -- store back -------------------------------------------------------------------

    def store_async(self, input_ids: Any, cache: Any, *, skip_tokens: int = 0) -> bool:
        """Queues a background store of the full chunks of ``input_ids`` held in ``cache``.

        The layer tensors are captured now (``DynamicCache`` replaces, never overwrites, them
        when it grows), and stacked and sent on the store thread. Chunks below
        ``skip_tokens`` are known to be stored already. Returns False when nothing is new.
        """
        ids = _as_id_list(input_ids)
        full = min(len(ids), cache.get_seq_length()) // self.chunk_tokens * self.chunk_tokens
        if full <= skip_tokens:
            return False
        snapshot = [(layer.keys, layer.values) for layer in cache.layers]
        tokens = ids[:full]
        return self._queue.submit(lambda: self._store_now(tokens, snapshot, full)) is not None

    def _store_now(self, tokens: list[int], snapshot: list[tuple[Any, Any]], full: int) -> int:
        with torch.inference_mode():
            # [L, 2, 1, H, T, D] -> [L, 2, T, H, D] on the host, contiguous.
            kv = torch.stack([torch.stack((k[0, :, :full], v[0, :, :full])) for k, v in snapshot])
            kv = kv.permute(0, 1, 3, 2, 4).to("cpu").contiguous()
        if self.store_durability is None:
            return int(self.store.store(tokens, kv) or 0)
        return int(self.store.store(tokens, kv, durability=self.store_durability) or 0)

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits for queued stores; raises the first store error since the last flush."""
        self._queue.flush(timeout_s)

    @property
    def store_stats(self) -> dict[str, int]:
        q = self._queue
        return {"pending": q.pending, "dropped": q.dropped, "stored_chunks": q.stored_chunks}

    def close(self) -> None:
        self._queue.close()

    def __enter__(self) -> "KVCacheAdapter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- generation -------------------------------------------------------------------

    def generate(self, input_ids: Any, *, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
        """Greedy generation with prefix reuse; see the module docstring for the steps."""
        ids = _as_id_list(input_ids)
        if not ids:
            raise ValueError("input_ids is empty")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        eos = _eos_set(self.model, eos_token_id)
        device = self.model.device
        with torch.inference_mode():
            t0 = time.perf_counter()
            load = self.load_prefix(ids)
            cache, m = load.cache, load.matched_tokens
            t1 = time.perf_counter()
            if m:
                out = self.model(input_ids=torch.tensor([ids[m:]], device=device), past_key_values=cache,
                                 cache_position=torch.arange(m, len(ids), device=device),
                                 use_cache=True, logits_to_keep=1)
            else:
                # A miss runs exactly the plain model's call, so the miss path adds only the lookup.
                out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
            ttft = t2 - t0
            queued = self.store_back and self.store_async(ids, cache, skip_tokens=m)
            generated = [tok]
            pos = len(ids)
            while len(generated) < max_new_tokens and tok not in eos:
                out = self.model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache,
                                 cache_position=torch.tensor([pos], device=device), use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                generated.append(tok)
                pos += 1
            t3 = time.perf_counter()
        return GenerationResult(tokens=generated, prompt_tokens=len(ids), matched_tokens=m, tiers=load.tiers,
                                ttft_s=ttft, lookup_s=load.lookup_s, retrieve_s=load.retrieve_s,
                                prefill_s=t2 - t1, decode_s=t3 - t2, stored_async=bool(queued))


def plain_generate(model: Any, input_ids: Any, *, max_new_tokens: int = 32,
                   eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
    """The same greedy loop with no store at all: the baseline the adapter is measured against."""
    ids = _as_id_list(input_ids)
    eos = _eos_set(model, eos_token_id)
    device = model.device
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        cache, generated, pos = out.past_key_values, [tok], len(ids)
        while len(generated) < max_new_tokens and tok not in eos:
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache,
                        cache_position=torch.tensor([pos], device=device), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            generated.append(tok)
            pos += 1
        t2 = time.perf_counter()
    return GenerationResult(tokens=generated, prompt_tokens=len(ids), matched_tokens=0, tiers=(), ttft_s=t1 - t0,
                            lookup_s=0.0, retrieve_s=0.0, prefill_s=t1 - t0, decode_s=t2 - t1, stored_async=False)


# ----------------------------------------------------------------------------- helpers

def _as_id_list(input_ids: Any) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"batch size must be 1, got input_ids of shape {tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        return [int(x) for x in input_ids.tolist()]
    if isinstance(input_ids, np.ndarray):
        return _as_id_list(torch.from_numpy(input_ids))
    ids = list(input_ids)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError("batch size must be 1")
        ids = list(ids[0])
    return [int(x) for x in ids]


def _as_tensor(kv: Any, dtype: torch.dtype) -> torch.Tensor:
    """A retrieved array as a torch tensor, reinterpreting bit patterns numpy cannot name."""
    if isinstance(kv, torch.Tensor):
        return kv
    arr = np.asarray(kv)
    if arr.dtype.name == "bfloat16" or (dtype == torch.bfloat16 and arr.dtype == np.uint16):
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    if arr.dtype.name.startswith("float8") or (dtype == torch.float8_e4m3fn and arr.dtype == np.uint8):
        return torch.from_numpy(arr.view(np.uint8)).view(torch.float8_e4m3fn)
    if not arr.flags.writeable:
        # torch warns on read-only buffers; the tensor is only read, and copied to the device.
        arr = arr.copy()
    return torch.from_numpy(arr)


def _eos_set(model: Any, eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(x) for x in eos_token_id)


def _check_namespace_matches(model: Any, ns: Namespace, chunk_tokens: int) -> None:
    want = namespace_for(model, chunk_tokens=chunk_tokens, model_id=ns.model)
    fields = ("dtype", "num_layers", "num_kv_heads", "head_dim", "chunk_tokens")
    bad = [f"{f}: store has {getattr(ns, f)!r}, model needs {getattr(want, f)!r}"
           for f in fields if getattr(ns, f) != getattr(want, f)]
    if bad:
        raise ValueError("the store's namespace does not fit this model (" + "; ".join(bad)
                         + "); build the client with kvstore_client.engines.transformers.namespace_for(model)")


def _check_full_attention(model: Any) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise NotImplementedError(f"model has {sorted(odd)} cache layers; prefix reuse supports only "
                                  "full-attention layers (DynamicLayer)")
