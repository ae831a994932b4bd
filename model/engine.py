"""The generation engine: continuous batching over a paged hybrid cache, shared prompts, a prefix cache,
decode steps in CUDA graphs, seeded on-device sampling (vLLM's names; docs/engine.md).

    from m1_kernels.model import M1ForCausalLM, Engine, SamplingParams
    engine = Engine(model, max_num_seqs=256, max_model_len=32768)
    outs = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_tokens=1024, seed=0))
    outs[i].outputs[j].token_ids, .logprobs, .finish_reason
    engine.update_weights(trainer_model)          # in place: graphs stay valid, the prefix cache is dropped

One step: the scheduler (model/scheduler.py) admits waiting requests, picks prefill chunks within a
token budget and the running completions; queued cache operations run; the prefill chunks run as one
packed forward and the decode rows as another (a CUDA graph per batch-size bucket); every row's token is
drawn on the device (model/sampling.py), stop and repetition checks run there too, and the step's
tokens, log-probabilities and finish codes go to the host in one copy. Decode rows read their input
token from the device (the last token drawn in their slot), so step k + 1 is launched before the host
waits for step k's copy: the host's bookkeeping overlaps the device's work, and waiting for that copy
is the only synchronisation of a step.
"""

import dataclasses
import math
import numbers
import sys
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .cache import HybridCache
from .lm_head import lm_head_logits
from .sampling import SamplingParams, filter_thresholds, finish_codes, row_keys, sample, stream_key
from .scheduler import BlockManager, Request, Scheduler

_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclasses.dataclass
class CompletionOutput:
    """One completion: its new tokens, their log-probabilities under the model (fp32, before temperature,
    top-k and top-p) and why it ended ("stop", "length" or "repetition")."""
    index: int
    token_ids: list
    logprobs: list
    finish_reason: str


@dataclasses.dataclass
class RequestOutput:
    """The completions of one prompt, in the order of the prompts given to generate."""
    request_id: int
    prompt_token_ids: list
    outputs: list


class Engine:
    """Generation engine over one M1ForCausalLM (see the module docstring).

    Args:
        model: the M1ForCausalLM to run (used in place: update_weights copies into it).
        max_num_seqs: completions in flight at once (lightning slots, decode rows per step).
        max_model_len: the most tokens of a prompt plus its completion; a longer prompt raises.
        page_size: tokens per KV page of the softmax layers.
        num_pages: KV pages; default: as many as the memory budget holds (at most what max_num_seqs
            sequences of max_model_len tokens can use).
        cache_memory_bytes: memory budget of slots, snapshots and pages. Default on CUDA:
            gpu_memory_utilization of the device's memory, minus what is allocated now and the workspace
            of the largest steps (measured by running them once); on the CPU, 1 GiB.
        gpu_memory_utilization: share of the device memory the process may use (CUDA default budget).
        max_num_batched_tokens: prompt tokens prefilled per step (over all requests).
        enable_prefix_caching: reuse cached prompt blocks across requests.
        prefix_block_size: tokens per prefix-cache block (a multiple of page_size).
        max_prefix_snapshots: lightning-state snapshots the prefix cache keeps (each
            num_linear_layers x H x D x D x 4 bytes); default: up to 64, within a tenth of the budget.
        cuda_graphs: capture the decode step per batch-size bucket (default: on CUDA devices).
        cuda_graph_sizes: the buckets (decode batches are padded up to the next one; max_num_seqs is always
            one); default 1, 2, 4, 8, 16, 32, 48, 64, 96, ..., 256.
        sampler_backend: "triton" or "torch" (default: "torch" for the torch model backend and on the CPU,
            else "triton").
    """

    def __init__(self, model, max_num_seqs: int = 256, max_model_len: int = 32768, *, page_size: int = 16,
                 num_pages: int | None = None, cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, prefix_block_size: int = 256,
                 max_prefix_snapshots: int | None = None, cuda_graphs: bool | None = None,
                 cuda_graph_sizes=None, sampler_backend: str | None = None):
        from .modeling import M1ForCausalLM
        if not isinstance(model, M1ForCausalLM):
            raise TypeError(f"model must be an M1ForCausalLM, got {type(model).__name__}")
        config = model.config
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("page_size", page_size), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("prefix_block_size", prefix_block_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len = {max_model_len} exceeds the config's max_position_embeddings = "
                             f"{config.max_position_embeddings}")
        if prefix_block_size % page_size:
            raise ValueError(f"prefix_block_size ({prefix_block_size}) must be a multiple of page_size ({page_size})")
        for name, value in (("num_pages", num_pages), ("cache_memory_bytes", cache_memory_bytes),
                            ("max_prefix_snapshots", max_prefix_snapshots)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0
                                      or (name == "num_pages" and value == 0)):
                raise ValueError(f"{name} must be None or a {'positive' if name == 'num_pages' else 'non-negative'} "
                                 f"integer, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
        weight = model.lm_head.weight
        self.model, self.config, self.device, self.dtype = model, config, weight.device, weight.dtype
        self.max_num_seqs, self.max_model_len, self.page_size = max_num_seqs, max_model_len, page_size
        if sampler_backend is None:
            sampler_backend = "torch" if self.device.type != "cuda" or _model_backend(model) == "torch" else "triton"
        if sampler_backend not in ("triton", "torch"):
            raise ValueError(f"sampler_backend must be 'triton' or 'torch', got {sampler_backend!r}")
        self.sampler_backend = sampler_backend
        self.head_backend = "torch" if _model_backend(model) == "torch" else None
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, got {self.device}")

        max_pages_per_seq = math.ceil(max_model_len / page_size)
        num_pages, num_snapshots = self._size_cache(num_pages, cache_memory_bytes, gpu_memory_utilization,
                                                    max_num_batched_tokens, max_pages_per_seq,
                                                    enable_prefix_caching, max_prefix_snapshots)
        self.cache = HybridCache(config, max_num_seqs, num_pages, page_size, max_pages_per_seq, dtype=self.dtype,
                                 device=self.device, num_snapshots=num_snapshots)
        self._bookkeeping = (num_pages, page_size, prefix_block_size, num_snapshots, enable_prefix_caching,
                             max_num_batched_tokens)
        self._reset_bookkeeping()
        self.runs = torch.zeros(max_num_seqs, dtype=torch.int32, device=self.device)   # repetition-stop counters
        # Decode inputs live in fixed buffers (the CUDA graphs read them); padding rows have slot -1. A row's
        # input token is the last one drawn in its slot.
        self._last_token = torch.zeros(max_num_seqs, dtype=torch.int64, device=self.device)
        self._dec_pos = torch.zeros(max_num_seqs, dtype=torch.int64, device=self.device)
        self._dec_slot = torch.full((max_num_seqs,), -1, dtype=torch.int64, device=self.device)
        sizes = _GRAPH_BUCKETS if cuda_graph_sizes is None else tuple(cuda_graph_sizes)
        if any(not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 1 for b in sizes):
            raise ValueError(f"cuda_graph_sizes must hold positive integers, got {cuda_graph_sizes!r}")
        self.buckets = sorted({int(b) for b in sizes if b < max_num_seqs} | {max_num_seqs})
        self._counts = dict(steps=0, prefill_tokens=0, generated_tokens=0)
        self._in_flight = None       # the launched step whose tokens are not read yet
        self._graphs = {}
        if self.cuda_graphs:
            self._capture()

    def _reset_bookkeeping(self):
        """Fresh scheduler and page bookkeeping: nothing running, every page free, the prefix cache empty."""
        num_pages, page_size, block_size, num_snapshots, prefix_caching, budget = self._bookkeeping
        self.blocks = BlockManager(num_pages, page_size, block_size, num_snapshots, prefix_caching)
        self.scheduler = Scheduler(self.max_num_seqs, self.blocks, budget)
        self._in_flight = None

    # ------------------------------------------------------------------------------------------------
    # Memory

    def _size_cache(self, num_pages, budget, utilization, max_tokens, max_pages_per_seq, prefix_caching, snapshots):
        config = self.config
        slot_bytes = HybridCache.bytes_per_slot(config)
        page_bytes = HybridCache.bytes_per_page(config, self.page_size, self.dtype)
        if budget is None and num_pages is None:
            if self.device.type == "cuda":
                workspace = self._measure_workspace(max_tokens)
                total = torch.cuda.get_device_properties(self.device).total_memory
                budget = int(utilization * total) - torch.cuda.memory_allocated(self.device) - workspace
            else:
                budget = 1 << 30
        slots = self.max_num_seqs * slot_bytes
        if budget is not None and slots > budget:
            raise ValueError(f"max_num_seqs = {self.max_num_seqs} needs {slots / 2**30:.2f} GiB of lightning states, "
                             f"more than the cache budget of {budget / 2**30:.2f} GiB: lower max_num_seqs")
        if snapshots is None:
            room = (budget - slots) // 10 if budget is not None else 64 * slot_bytes
            snapshots = min(64, room // slot_bytes) if slot_bytes else 64
        snapshots = snapshots if prefix_caching else 0
        if num_pages is None:
            left = budget - slots - snapshots * slot_bytes
            cap = self.max_num_seqs * max_pages_per_seq
            num_pages = min(cap, left // page_bytes) if page_bytes else cap
            if num_pages < 1:
                raise ValueError(f"the cache budget of {budget / 2**30:.2f} GiB leaves no room for KV pages")
        return int(num_pages), int(snapshots)

    @torch.no_grad()
    def _measure_workspace(self, max_tokens) -> int:
        """Peak memory of the largest steps (a full prefill chunk, a decode at max_num_seqs rows with
        top-p sampling) above what is allocated, on a throwaway cache."""
        T = min(max_tokens, self.max_model_len)
        pages = math.ceil(T / self.page_size)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch = HybridCache(self.config, 1, pages, self.page_size, pages, dtype=self.dtype, device=self.device)
        scratch_bytes = torch.cuda.memory_allocated(self.device) - base
        scratch.block_tables[0] = torch.arange(pages, dtype=torch.int32, device=self.device)
        dev = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        batch = scratch.batch(torch.arange(T, device=self.device), dev([0] * T), dev([0, T]), dev([0]), dev([T]),
                              decode=False)
        hidden = self.model.model(torch.zeros(T, dtype=torch.int64, device=self.device), scratch, batch)
        self._logits(hidden[-1:])
        del hidden
        B = self.max_num_seqs
        rows = torch.arange(B, device=self.device)
        batch = scratch.decode_batch(torch.zeros(B, dtype=torch.int64, device=self.device), rows * 0 - 1)
        logits = self._logits(self.model.model(torch.zeros(B, dtype=torch.int64, device=self.device), scratch, batch))
        ones = torch.ones(B, device=self.device)
        floor = filter_thresholds(logits, rows, ones, rows * 0 + 1, ones * 0.5, 1, True)
        sample(logits, rows, ones, floor, rows, self.sampler_backend)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - scratch_bytes
        del scratch, batch, logits, floor
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)        # margin: graph pools, allocator rounding

    # ------------------------------------------------------------------------------------------------
    # Forward pieces

    def _logits(self, hidden):
        return lm_head_logits(hidden, self.model.lm_head.weight, backend=self.head_backend)

    def _decode_forward(self, b: int):
        """Logits [b, V] fp32 of the first b rows of the decode buffers (the body of a graph)."""
        slots = self._dec_slot[:b]
        batch = self.cache.decode_batch(self._dec_pos[:b], slots)
        return self._logits(self.model.model(self._last_token[slots.clamp(min=0)], self.cache, batch))

    @torch.no_grad()
    def _capture(self):
        """One graph per bucket, largest first, sharing one memory pool; captured on padding rows (slot -1:
        no state or cache changes)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._decode_forward(b)                # compiles and tunes kernels outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    out = self._decode_forward(b)
            except Exception as exc:
                raise RuntimeError(f"capturing the decode step (batch {b}) in a CUDA graph failed: {exc}; "
                                   "Engine(..., cuda_graphs=False) runs it eagerly") from exc
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)

    def _upload(self, array, dtype=torch.int64):
        """Host data to the device without a synchronisation (pinned staging on CUDA)."""
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _run_device_ops(self):
        """The scheduler's queued cache operations, in order; runs of one kind are batched."""
        ops, self.scheduler.device_ops = self.scheduler.device_ops, []
        tables = {}
        i = 0
        while i < len(ops):
            kind = ops[i][0]
            j = i
            while j < len(ops) and ops[j][0] == kind:
                j += 1
            args = [op[1:] for op in ops[i:j]]
            i = j
            if kind == "table":                        # last write per entry wins; applied once below
                for slot, index, page in args:
                    tables[(slot, index)] = page
                continue
            if kind == "save":                         # a snapshot claimed twice in a row: the last claim wins
                args = list({snap: (slot, snap) for slot, snap in args}.values())
            columns = [self._upload(np.array(col, dtype=np.int64)) for col in zip(*args)]
            {"zero": self.cache.zero_slots, "load": self.cache.load_snapshots, "save": self.cache.save_snapshots,
             "copy_slot": self.cache.copy_slots, "copy_page": self.cache.copy_pages}[kind](*columns)
        if tables:
            entries = np.array([(s, k, p) for (s, k), p in tables.items()], dtype=np.int64)
            e = self._upload(entries)
            self.cache.block_tables[e[:, 0], e[:, 1]] = e[:, 2].to(torch.int32)

    def _prefill(self, chunks):
        """Run the step's prompt chunks as one packed forward; logits [R, V] of the prompts they complete."""
        ids, positions, token_slots, cu, slots, lens, last = [], [], [], [0], [], [], []
        for request, start, end in chunks:
            ids.append(np.asarray(request.prompt[start:end], dtype=np.int64))
            positions.append(np.arange(start, end))
            token_slots.append(np.full(end - start, request.slots[0]))
            cu.append(cu[-1] + end - start)
            slots.append(request.slots[0])
            lens.append(end)
            if end == len(request.prompt):
                last.append(cu[-1] - 1)
        T, N = cu[-1], len(chunks)
        data = self._upload(np.concatenate([*ids, *positions, *token_slots, cu, slots, lens, last]))
        parts = torch.split(data, [T, T, T, N + 1, N, N, len(last)])
        batch = self.cache.batch(parts[1], parts[2], parts[3], parts[4], parts[5], decode=False)
        hidden = self.model.model(parts[0], self.cache, batch)
        return self._logits(hidden[parts[6]]) if last else None

    def _decode(self, completions):
        b = len(completions)
        bucket = next(x for x in self.buckets if x >= b)
        rows = np.zeros((2, bucket), dtype=np.int64)
        rows[1] = -1
        rows[0, :b] = [c.length for c in completions]
        rows[1, :b] = [c.slot for c in completions]
        data = self._upload(rows)
        self._dec_pos[:bucket].copy_(data[0])
        self._dec_slot[:bucket].copy_(data[1])
        if bucket in self._graphs:
            graph, out = self._graphs[bucket]
            graph.replay()
            return out
        return self._decode_forward(bucket)

    # ------------------------------------------------------------------------------------------------
    # Drawing tokens

    def _draw(self, groups):
        """groups: (logits, [(completion-like, logits row, position, first)]) per forward. Draws every row's
        token, records it as its slot's last token, and starts the step's one device-to-host copy of
        (token, logprob, finish code) [R, 3]; returns (host tensor, event to wait on) or None."""
        rows = [r for _, g in groups for r in g]
        if not rows:
            return None
        R = len(rows)
        params = [c.request.params for c, *_ in rows]
        max_stops = max(1, max(len(p.stop_token_ids) for p in params))
        # The integer columns first: a slice of them is one kernel, where indexing with a list of columns
        # would copy that list from pageable memory and synchronise the step with the device.
        table = np.zeros((R, 9 + max_stops), dtype=np.float64)
        table[:, 0] = [r[1] for r in rows]
        table[:, 1] = [p.top_k for p in params]
        table[:, 2] = row_keys([c.key for c, *_ in rows], [r[2] for r in rows])
        table[:, 3] = [p.repetition_stop[0] if p.repetition_stop else 0 for p in params]
        table[:, 4] = [c.slot for c, *_ in rows]
        table[:, 5] = [r[3] for r in rows]
        table[:, 6] = [0.0 if p.temperature == 0 else np.float32(1.0 / p.temperature) for p in params]
        table[:, 7] = [p.top_p for p in params]
        table[:, 8] = [p.repetition_stop[1] if p.repetition_stop else 1.0 for p in params]
        table[:, 9:] = -1
        for i, p in enumerate(params):
            table[i, 9:9 + len(p.stop_token_ids)] = p.stop_token_ids
        d = self._upload(table, torch.float64)
        as_long = d[:, :5].long()                    # source row, top_k, key, repetition count, slot
        inv_temp, top_p, rep_prob = d[:, 6].float(), d[:, 7].float(), d[:, 8].float()
        tokens, logprobs, start = [], [], 0
        for logits, g in groups:
            if not g:
                continue
            sl = slice(start, start + len(g))
            start += len(g)
            src = as_long[sl, 0]
            floor = torch.full((len(g),), float("-inf"), device=self.device)
            ps = params[sl]
            if any(p.filtered for p in ps):
                kmax = max(p.top_k if p.temperature > 0 else 0 for p in ps)
                floor = filter_thresholds(logits, src, inv_temp[sl], as_long[sl, 1], top_p[sl], kmax,
                                          any(p.top_p < 1 and p.temperature > 0 for p in ps))
            t, lp = sample(logits, src, inv_temp[sl], floor, as_long[sl, 2], self.sampler_backend)
            tokens.append(t)
            logprobs.append(lp)
        tokens, logprobs = torch.cat(tokens), torch.cat(logprobs)
        codes = finish_codes(tokens, logprobs, d[:, 9:].long(), as_long[:, 3], rep_prob, self.runs, as_long[:, 4],
                             d[:, 5] > 0)
        self._last_token[as_long[:, 4]] = tokens
        out = torch.stack([tokens.double(), logprobs.double(), codes.double()], dim=1)
        if self.device.type != "cuda":
            return out, None
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @torch.no_grad()
    def _launch(self):
        """Schedule and launch one step without waiting for it; book what it will do. Returns the
        completions of its rows and its pending copy (None without rows), or None when there is nothing
        to run."""
        plan = self.scheduler.schedule()
        if not plan.prefill and not plan.decode:
            return None
        self._run_device_ops()
        groups, started = [], []
        if plan.prefill:
            logits = self._prefill(plan.prefill)
            rows = []
            for request, start, end in plan.prefill:
                if end == len(request.prompt):
                    k = len(started)
                    started.append(request)
                    for j in range(request.params.n):
                        rows.append((_Pending(request, request.slots[j], request.keys[j]), k, end, True))
            groups.append((logits, rows))
        if plan.decode:
            logits = self._decode(plan.decode)
            groups.append((logits, [(c, i, c.length + 1, False) for i, c in enumerate(plan.decode)]))
        copy = self._draw(groups)
        self._counts["steps"] += 1
        self._counts["prefill_tokens"] += sum(end - start for _, start, end in plan.prefill)
        # Book the chunks (snapshots), fork the completed prompts (their cache operations run before the
        # next forward) and advance the decoded completions.
        for request, start, end in plan.prefill:
            self.scheduler.finish_prefill_chunk(request, end)
        drawn = [c for request in started for c in self.scheduler.start_completions(request)]
        for c in plan.decode:
            self.scheduler.launched_decode(c)
        return drawn + plan.decode, copy

    def _collect(self, launched) -> int:
        """Wait for a launched step's tokens and book them; returns how many were booked."""
        completions, copy = launched
        if copy is None:                  # prompt chunks only: nothing was drawn
            return 0
        host, event = copy
        if event is not None:
            event.synchronize()
        booked = sum(self.scheduler.record(c, int(token), logprob, int(code))
                     for c, (token, logprob, code) in zip(completions, host.tolist()))
        self._counts["generated_tokens"] += booked
        return booked

    def _advance(self) -> int:
        """Launch the next step, then read the one before it (the host's work overlaps the device's).
        Returns the tokens booked."""
        launched = self._launch() if self.scheduler.has_work() else None
        if launched is None and self._in_flight is None:
            raise RuntimeError("the engine's scheduler has work it cannot schedule (a bug)")
        booked = self._collect(self._in_flight) if self._in_flight is not None else 0
        self._in_flight = launched
        return booked

    # ------------------------------------------------------------------------------------------------
    # Public API

    @property
    def stats(self) -> dict:
        """Counters since construction: steps, prompt tokens prefilled, prompt tokens taken from the prefix
        cache, tokens drawn."""
        return {**self._counts, "cached_tokens": self.scheduler.cached_tokens}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool | None = None) -> list:
        """Complete every prompt; returns one RequestOutput per prompt, in order.

        Args:
            prompts: a list of prompts, each a non-empty list of token ids in [0, vocab_size).
            sampling_params: one SamplingParams for all prompts, a list with one per prompt, or None
                (the defaults).
            use_tqdm: show a progress bar (default: when stderr is a terminal).
        """
        prompts = self._check_prompts(prompts)
        params = self._check_params(sampling_params, len(prompts))
        occurrences, requests = {}, []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
            occurrence = occurrences.get(tuple(prompt), 0)
            occurrences[tuple(prompt)] = occurrence + 1
            keys = [stream_key(seed, prompt, occurrence, j) for j in range(p.n)]
            request = Request(i, prompt, p, keys, min(p.max_tokens, self.max_model_len - len(prompt)))
            need = self.scheduler.worst_case_pages(request)
            if need > self.blocks.num_pages:
                raise ValueError(f"prompts[{i}] with n = {p.n} and max_tokens = {p.max_tokens} may need {need} KV "
                                 f"pages, more than the engine's num_pages = {self.blocks.num_pages}")
            requests.append(request)
        self.scheduler.waiting.extend(requests)
        bar = self._progress(len(requests), use_tqdm)
        done, tokens, t0 = 0, 0, time.perf_counter()
        try:
            while self.scheduler.has_work() or self._in_flight is not None:
                tokens += self._advance()
                if bar is not None:
                    finished = sum(r.state == "finished" for r in requests)
                    bar.update(finished - done)
                    done = finished
                    bar.set_postfix(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                                    tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
        except BaseException:       # an interrupted call leaves nothing behind for the next one
            self._reset_bookkeeping()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [RequestOutput(r.index, list(r.prompt),
                              [CompletionOutput(c.index, c.tokens, c.logprobs, c.finish_reason) for c in r.completions])
                for r in requests]

    @torch.no_grad()
    def update_weights(self, model_or_state_dict):
        """Copy new weights into the engine's model in place (CUDA graphs keep pointing at them) and drop
        the prefix cache (its states and keys came from the old weights). Takes an nn.Module with the
        same parameter names (for example the trainer's model; the engine's own model only drops the
        cache) or a state dict."""
        src = model_or_state_dict
        if isinstance(src, nn.Module):
            state = None if src is self.model else src.state_dict()
        elif isinstance(src, Mapping):
            state = src
        else:
            raise TypeError(f"update_weights takes an nn.Module or a state dict, got {type(src).__name__}")
        if state is not None:
            own = self.model.state_dict(keep_vars=True)
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            if missing or unexpected:
                raise ValueError(f"update_weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
            for name, value in state.items():
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                if tuple(value.shape) != tuple(own[name].shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the engine's model "
                                     f"{tuple(own[name].shape)}")
            for name, value in state.items():
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                own[name].copy_(value, non_blocking=True)
        self.blocks.clear()

    # ------------------------------------------------------------------------------------------------
    # Input checks

    def _check_prompts(self, prompts) -> list:
        if isinstance(prompts, (torch.Tensor, np.ndarray)):
            raise TypeError("prompts must be a list of token-id lists, got a tensor (pass tensor.tolist(), one list "
                            "per prompt)")
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        if all(isinstance(p, numbers.Integral) for p in prompts):
            raise TypeError("prompts must be a list of token-id lists, got a flat list of ints (one prompt is "
                            "[[id, id, ...]])")
        V, out = self.config.vocab_size, []
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)):
                raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
            # Checked in C (an RL batch holds ~10^5 prompt tokens per call): floats, nested lists and ints
            # beyond int64 do not make an integer array; bools do with ints, hence the type scan.
            try:
                ids = np.asarray(p)
            except ValueError:
                ids = None
            if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu" or bool in map(type, p):
                raise TypeError(f"prompts[{i}] must hold ints")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"prompts[{i}] holds token ids in [{lo}, {hi}], outside [0, vocab_size = {V})")
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; max_model_len = {self.max_model_len} leaves no "
                                 "room for a new token")
            out.append(ids.tolist())
        return out

    def _check_params(self, params, count) -> list:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * count
        elif not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them (one per prompt)")
        if len(params) != count:
            raise ValueError(f"sampling_params lists {len(params)} entries for {count} prompts")
        for p in params:
            if p.n > self.max_num_seqs:
                raise ValueError(f"SamplingParams.n = {p.n} exceeds the engine's max_num_seqs = {self.max_num_seqs}")
            bad = [t for t in p.stop_token_ids if t >= self.config.vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.stop_token_ids {bad} lie outside the vocabulary "
                                 f"(vocab_size = {self.config.vocab_size})")
        return list(params)

    @staticmethod
    def _progress(total, use_tqdm):
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        if not use_tqdm:
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc="generate", unit="prompt", dynamic_ncols=True)


@dataclasses.dataclass
class _Pending:
    """A completion that draws its first token in the step its prompt completes (not yet forked)."""
    request: Request
    slot: int
    key: int


def _model_backend(model):
    return getattr(model.model.layers[0].mlp, "backend", None)
