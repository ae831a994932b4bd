"""The engine's host-side bookkeeping: requests and their completions, slots, pages, the prefix cache,
and which tokens each step runs. Nothing here touches the device: operations on the cache (zero a
slot, copy a state or a page, point a block table at a page) are queued in `device_ops` for the engine
to run in order before the next forward.

Life of a request (one prompt, `n` completions):
  waiting  -> admitted when `n` slots are free and the pages it may ever need can be reserved (so a
              running request never runs out of pages); the prefix cache may supply its first blocks.
  prefill  -> its prompt runs in chunks, at most `max_num_batched_tokens` prompt tokens per step over
              all requests, beside the decode rows of the running completions.
  running  -> after the last chunk, its `n` completions draw their first tokens from the prompt's
              logits; completion 0 keeps the prompt's slot and pages, the others get a copy of the
              lightning state, share the prompt's full pages and copy its last partial page (copy on
              write, done at once: the next token writes there). Each step feeds every running
              completion its last token (one decode row each).
  finished -> a completion frees its slot, its pages and its unused reservation at once.

The engine launches step k + 1 before it reads step k's tokens (model/engine.py), so the bookkeeping of
what a step will do (chunks done, forks, lengths, drawn counts) happens when it is launched, and what
only the tokens tell (a stop token, a repetition) when they are read. A completion that stops at step k
has already been given a row in step k + 1; that row's draw is ignored. Its slot and pages are freed
when step k is read, while step k + 1 may still use them: safe, because the device runs steps and cache
operations in the order they were issued, so a later owner's writes come after step k + 1's. A
completion never gets a row past its max_new-th draw (known at launch), so the extra row stays within
its reserved pages.

Prefix cache: a prompt is cut into blocks of `block_size` tokens, each named by a chained hash (the
hash of the previous block's name and this block's tokens). An entry holds a block's KV pages and, at
some boundaries, a snapshot of every lightning state after the block. A new prompt reuses the longest
chain of cached blocks that ends in a snapshot (and leaves at least one token to run): it shares the
pages and starts from the snapshot. Snapshots are large (layers x H x D x D x 4 bytes), so they are
taken only where a prefill chunk ends (chunks are cut at block boundaries, and at the last boundary
before the prompt's end) and their number is bounded. Pages held only by the cache are evicted (least
recently used, deeper blocks first) when a request needs pages; snapshots are evicted LRU on their own.
"""

import dataclasses
import hashlib
import math

import numpy as np

WAITING, PREFILL, RUNNING, FINISHED = "waiting", "prefill", "running", "finished"


@dataclasses.dataclass(eq=False)     # identity: running lists remove this object, not an equal one
class Completion:
    """One of the n completions of a request, once its prompt is prefilled."""
    request: "Request"
    index: int
    slot: int
    pages: list
    length: int                  # tokens in the cache once the launched steps have run
    key: int                     # stream key of its draws (sampling.stream_key)
    reserved: int                # pages it may still allocate
    drawn: int = 1               # tokens drawn by the launched steps (the first comes with the prompt's logits)
    tokens: list = dataclasses.field(default_factory=list)   # the drawn tokens read back so far
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    index: int                   # position in the generate call
    prompt: list
    params: object               # SamplingParams
    keys: list                   # stream key of each completion
    max_new: int                 # tokens each completion may generate (max_tokens, capped by max_model_len)
    state: str = WAITING
    slots: list = dataclasses.field(default_factory=list)
    pages: list = dataclasses.field(default_factory=list)
    computed: int = 0            # prompt tokens in the cache
    reserved: int = 0            # pages the prompt may still allocate
    sample_pages: list = dataclasses.field(default_factory=list)   # reservation of each completion
    cached_blocks: int = 0       # prompt blocks registered in the prefix cache
    hashes: list | None = None
    completions: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Entry:
    name: bytes
    depth: int
    pages: tuple
    snapshot: int | None = None
    last_use: int = 0


@dataclasses.dataclass
class StepPlan:
    """What one step runs. prefill: (request, start, end) prompt chunks, packed in this order;
    decode: the completions that feed their last token."""
    prefill: list
    decode: list


class BlockManager:
    """Pages (refcounted, reserved ahead) and the prefix cache over them."""

    def __init__(self, num_pages: int, page_size: int, block_size: int, num_snapshots: int, prefix_caching: bool):
        self.page_size, self.block_size = page_size, block_size
        self.pages_per_block = block_size // page_size
        self.prefix_caching = prefix_caching and num_snapshots > 0
        self.free = list(range(num_pages - 1, -1, -1))
        self.ref = [0] * num_pages
        self.cached = [False] * num_pages
        self.evictable = 0           # cached pages nobody else holds
        self.reserved = 0
        self.entries: dict[bytes, _Entry] = {}
        self.free_snapshots = list(range(num_snapshots - 1, -1, -1))
        self.clock = 0
        self.num_pages = num_pages

    # pages ---------------------------------------------------------------------------------------
    def available(self) -> int:
        return len(self.free) + self.evictable - self.reserved

    def allocate(self) -> int:
        """A page from a reservation (the caller reserved it)."""
        if not self.free:
            self._evict_pages(max(1, min(64, self.evictable)))
        page = self.free.pop()
        self.ref[page] = 1
        self.reserved -= 1
        return page

    def incref(self, pages):
        for p in pages:
            if self.cached[p] and self.ref[p] == 1:
                self.evictable -= 1
            self.ref[p] += 1

    def decref(self, pages):
        for p in pages:
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free.append(p)
            elif self.ref[p] == 1 and self.cached[p]:
                self.evictable += 1

    # prefix cache --------------------------------------------------------------------------------
    def block_hashes(self, prompt) -> list:
        names, name = [], b""
        tokens = np.asarray(prompt, dtype=np.int64)
        for i in range(len(prompt) // self.block_size):
            block = tokens[i * self.block_size:(i + 1) * self.block_size]
            name = hashlib.blake2b(name + block.tobytes(), digest_size=16).digest()
            names.append(name)
        return names

    def match(self, request: Request) -> list:
        """The cached chain to reuse for a prompt: blocks 0..j where block j has a snapshot and at least
        one prompt token follows it."""
        if not self.prefix_caching:
            return []
        chain = []
        for i, name in enumerate(request.hashes):
            if (i + 1) * self.block_size >= len(request.prompt):
                break
            entry = self.entries.get(name)
            if entry is None:
                break
            chain.append(entry)
        while chain and chain[-1].snapshot is None:
            chain.pop()
        return chain

    def hit_cost(self, chain) -> int:
        """Evictable pages a hit on `chain` would pin (they stop counting as available). An entry's pages
        are always shared together, so its first page's count speaks for all of them."""
        return sum(len(e.pages) for e in chain if self.ref[e.pages[0]] == 1)

    def touch(self, chain):
        self.clock += 1
        for e in chain:
            e.last_use = self.clock

    def insert(self, request: Request, upto_block: int, pages, snapshot: bool):
        """Register the prompt's blocks request.cached_blocks .. upto_block - 1 (at least one; their pages
        are full and final); with `snapshot`, also claim a snapshot for block upto_block - 1. Returns the
        snapshot index to fill (None when there is nothing to save)."""
        chain = []
        ppb = self.pages_per_block
        for i in range(request.cached_blocks, upto_block):
            name = request.hashes[i]
            entry = self.entries.get(name)
            if entry is None:               # an identical block may come from another request: keep that one
                entry = _Entry(name, i, tuple(pages[i * ppb:(i + 1) * ppb]))
                self.incref(entry.pages)            # the cache's reference (the request holds one too)
                for p in entry.pages:
                    self.cached[p] = True
                self.entries[name] = entry
            chain.append(entry)
        request.cached_blocks = upto_block
        self.touch(chain)
        target = chain[-1]
        if not snapshot or target.snapshot is not None:
            return None
        if not self.free_snapshots:
            victims = [e for e in self.entries.values() if e.snapshot is not None]
            oldest = min(victims, key=lambda e: (e.last_use, -e.depth))
            self.free_snapshots.append(oldest.snapshot)
            oldest.snapshot = None
        target.snapshot = self.free_snapshots.pop()
        return target.snapshot

    def _evict_pages(self, count: int):
        victims = sorted((e for e in self.entries.values() if self.ref[e.pages[0]] == 1),
                         key=lambda e: (e.last_use, -e.depth))
        freed = 0
        for e in victims:
            if freed >= count:
                break
            self._drop(e)
            freed += len(e.pages)

    def _drop(self, entry):
        del self.entries[entry.name]
        if entry.snapshot is not None:
            self.free_snapshots.append(entry.snapshot)
        for p in entry.pages:
            self.cached[p] = False
            if self.ref[p] == 1:
                self.evictable -= 1
        self.decref(entry.pages)

    def clear(self):
        """Forget every cached block (new weights make them stale)."""
        for entry in list(self.entries.values()):
            self._drop(entry)


class Scheduler:
    """Admission, chunked prefill and decode rows of one engine (see the module docstring)."""

    def __init__(self, num_slots, blocks: BlockManager, max_num_batched_tokens: int):
        self.blocks = blocks
        self.page_size = blocks.page_size
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []
        self.running: list[Completion] = []
        self.cached_tokens = 0           # prompt tokens taken from the prefix cache
        self.device_ops: list = []       # ("zero", slot) ("load", snap, slot) ("save", slot, snap)
        #                                  ("copy_slot", src, dst) ("copy_page", src, dst) ("table", slot, i, page)

    # sizes ---------------------------------------------------------------------------------------
    def pages_needed(self, request: Request, hit_pages: int) -> tuple[int, list]:
        """Pages the prompt still needs and the most each completion may add (its last token is never
        written: max_new - 1 new cache entries)."""
        P, L = self.page_size, len(request.prompt)
        prompt = math.ceil(L / P) - hit_pages
        tail = L % P
        per_sample = [math.ceil((tail + request.max_new - 1) / P) - (1 if tail and j == 0 else 0)
                      for j in range(request.params.n)]
        return prompt, per_sample

    def worst_case_pages(self, request: Request) -> int:
        prompt, samples = self.pages_needed(request, 0)
        return prompt + sum(samples)

    # scheduling ----------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            n = request.params.n
            if len(self.free_slots) < n:
                return
            if request.hashes is None:
                request.hashes = self.blocks.block_hashes(request.prompt) if self.blocks.prefix_caching else []
            chain = self.blocks.match(request)
            hit_pages = sum(len(e.pages) for e in chain)
            prompt, per_sample = self.pages_needed(request, hit_pages)
            if prompt + sum(per_sample) > self.blocks.available() - self.blocks.hit_cost(chain):
                return
            self.waiting.pop(0)
            request.slots = [self.free_slots.pop() for _ in range(n)]
            slot = request.slots[0]
            request.pages = [p for e in chain for p in e.pages]
            self.blocks.incref(request.pages)
            self.blocks.touch(chain)
            self.blocks.reserved += prompt + sum(per_sample)
            request.reserved, request.sample_pages = prompt, per_sample
            request.computed = len(chain) * self.blocks.block_size
            self.cached_tokens += request.computed
            request.cached_blocks = len(chain)
            if chain:
                self.device_ops.append(("load", chain[-1].snapshot, slot))
            else:
                self.device_ops.append(("zero", slot))
            for i, page in enumerate(request.pages):
                self.device_ops.append(("table", slot, i, page))
            request.state = PREFILL
            self.prefilling.append(request)

    def _chunk_end(self, request: Request, start: int, budget: int) -> int:
        L = len(request.prompt)
        end = min(L, start + budget)
        if self.blocks.prefix_caching:
            B = self.blocks.block_size
            # End chunks on block boundaries (where snapshots can be taken), the last one before the
            # prompt's end included, unless that leaves nothing to run.
            last = (L // B) * B
            cut = last if start < last < end else (end // B) * B if end < L else end
            if cut > start:
                end = cut
        return end

    def _grow(self, owner, pages: list, slot: int, upto: int):
        """Allocate pages so that `pages` covers positions < upto, recording the block-table entries."""
        while len(pages) * self.page_size < upto:
            page = self.blocks.allocate()
            owner.reserved -= 1
            self.device_ops.append(("table", slot, len(pages), page))
            pages.append(page)

    def schedule(self) -> StepPlan:
        self._admit()
        budget, prefill = self.max_num_batched_tokens, []
        for request in self.prefilling:
            if budget == 0:
                break
            start = request.computed
            end = self._chunk_end(request, start, budget)
            self._grow(request, request.pages, request.slots[0], end)
            prefill.append((request, start, end))
            budget -= end - start
        decode = [c for c in self.running if c.drawn < c.request.max_new]
        for c in decode:
            self._grow(c, c.pages, c.slot, c.length + 1)
        return StepPlan(prefill, decode)

    # results -------------------------------------------------------------------------------------
    def finish_prefill_chunk(self, request: Request, end: int) -> bool:
        """Book a prefill chunk that ran; returns whether the prompt is complete."""
        request.computed = end
        B = self.blocks.block_size
        if self.blocks.prefix_caching and end % B == 0 and end // B > request.cached_blocks:
            snap = self.blocks.insert(request, end // B, request.pages, snapshot=True)
            if snap is not None:
                self.device_ops.append(("save", request.slots[0], snap))
        return end == len(request.prompt)

    def start_completions(self, request: Request) -> list:
        """Fork the prefilled prompt into its n completions (see the module docstring)."""
        P, L = self.page_size, len(request.prompt)
        full = L // P
        shared = request.pages[:full]
        self.prefilling.remove(request)
        request.state = RUNNING
        for j, slot in enumerate(request.slots):
            if j == 0:
                pages = request.pages
            else:
                self.device_ops.append(("copy_slot", request.slots[0], slot))
                self.blocks.incref(shared)
                pages = list(shared)
                for i, page in enumerate(shared):
                    self.device_ops.append(("table", slot, i, page))
            c = Completion(request, j, slot, pages, L, request.keys[j], request.sample_pages[j])
            if j > 0 and L % P:
                self._grow(c, pages, slot, L)
                self.device_ops.append(("copy_page", request.pages[full], pages[full]))
            request.completions.append(c)
            self.running.append(c)
        return request.completions

    def record(self, c: Completion, token: int, logprob: float, code: int) -> bool:
        """Book one drawn token read back: code 1 = stop token, 2 = repetition (device checks), else the
        length decides. A draw after the completion's end (the step launched before the end was read)
        is dropped: returns False."""
        if c.finish_reason is not None:
            return False
        c.tokens.append(token)
        c.logprobs.append(logprob)
        if code == 1:
            c.finish_reason = "stop"
        elif code == 2:
            c.finish_reason = "repetition"
        elif len(c.tokens) >= c.request.max_new:
            c.finish_reason = "length"
        if c.finish_reason is None:
            return True
        self.running.remove(c)
        self.blocks.decref(c.pages)
        self.blocks.reserved -= c.reserved
        self.free_slots.append(c.slot)
        if all(x.finish_reason is not None for x in c.request.completions):
            c.request.state = FINISHED
        return True

    def launched_decode(self, c: Completion):
        """A decode row of c was launched: its fed token is in the cache, and it drew one more."""
        c.length += 1
        c.drawn += 1
