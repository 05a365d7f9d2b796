"""A trained run served on Ray Serve: `EnsembleServer`, one deployment per run.

Each replica loads `<run>/final/` once (ensemble + tokenizer, local storage) and
answers `POST <route prefix>/generate` with a JSON body (prompt, max_new_tokens,
temperature, top_k, seed, k, every) by streaming newline-delimited JSON: one
`{"token": id, "text": delta}` per generated token, then one `{"done": true, ...}`
line (`leviathan.run.serving` names the route).

Batching. Concurrent requests on a replica meet in one `@serve.batch` async
generator (`_decode_batch`), which steps every sequence of the batch once per
iteration and yields one line per request. Sequences are never padded: the decode
caches have no attention mask, so rows of one cache must share a length. A batch
is grouped by prompt length (after cropping to the block size); each group of
all-member requests decodes as one batched cache (`ensemble._step`, the same step
`generate` uses), so equal-length prompts share every member forward. Rows that
finish early stay in their group's cache until the group ends (their outputs are
dropped): simpler than shrinking a cache, and a group's rows differ only in
max_new_tokens. Requests with routing (k < M members) decode one sequence per
`RoutedDecoder`, which chooses members per sequence and cannot batch rows; they
still share the batch's iterations with the rest. Serve runs one batch at a time
per replica: a request that arrives while a batch decodes waits for that batch to
end, which is what its time to first token pays under steady load. A routed sequence must fit the
block size (prompt + max_new_tokens), because routing keeps every member's cache.

Sampling is per row with its own seeded `torch.Generator`, so a request's text
depends on its seed, not on which other requests shared its batch.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from leviathan.data.tokenizer import load_tokenizer
from leviathan.model.component import check_sampling, sample_next
from leviathan.model.ensemble import EnsembleCache, LeviathanEnsemble
from leviathan.model.routing import RoutedDecoder, check_routing

BATCH_WAIT_S = 0.005  # how long a first request waits for others to share its batch


@dataclass(frozen=True)
class SampleRequest:
    """One generate request, checked (`parse_request`)."""

    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    k: int | None = None  # members per sequence; None or M: all (no routing)
    every: int = 16  # R: tokens between routing choices


class RequestError(ValueError):
    """A request field the model cannot use: (field, message), answered as 422."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


_FIELDS = {"prompt": str, "max_new_tokens": int, "temperature": (int, float), "top_k": (int, type(None)),
           "seed": int, "k": (int, type(None)), "every": int}


def parse_request(body: Any, default_k: int | None, default_every: int) -> SampleRequest:
    """A `SampleRequest` from a JSON body; k and every default to the deployment's."""
    if not isinstance(body, dict):
        raise RequestError("body", "the body must be a JSON object")
    for name, value in body.items():
        if name not in _FIELDS:
            raise RequestError(name, f"{name}: unknown field")
        if isinstance(value, bool) or not isinstance(value, _FIELDS[name]):
            raise RequestError(name, f"{name}: wrong type {type(value).__name__}")
    values = {"k": default_k, "every": default_every, **body}
    request = SampleRequest(**{**values, "temperature": float(values.get("temperature", 1.0))})
    if request.max_new_tokens < 1:
        raise RequestError("max_new_tokens", f"max_new_tokens: must be >= 1, got {request.max_new_tokens}")
    try:
        check_sampling(request.max_new_tokens, request.temperature, request.top_k)
    except ValueError as e:
        raise RequestError(str(e).split(":")[0], str(e)) from None
    return request


@dataclass
class _Sequence:
    """One request's decoding state: its tokens, generator, and what it has streamed."""

    request: SampleRequest
    ids: list[int]  # prompt (cropped) + generated
    generator: torch.Generator
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    prompt_tokens: int = 0
    generated: int = 0
    routed: RoutedDecoder | None = None

    @property
    def finished(self) -> bool:
        return self.generated >= self.request.max_new_tokens


class BatchDecode:
    """One `@serve.batch` batch: every request's sequence, stepped together.

    `step()` samples one token for every unfinished sequence and returns, per
    request, its line (a dict) or None once it has finished.
    """

    def __init__(self, ensemble: LeviathanEnsemble, tokenizer: Any, requests: list[SampleRequest]) -> None:
        self.ensemble, self.tokenizer = ensemble, tokenizer
        self.block_size = ensemble.config.block_size
        self.device = next(ensemble.parameters()).device
        self.sequences: list[_Sequence] = []
        for r in requests:
            ids = (tokenizer.encode(r.prompt) or [tokenizer.eos_id])[-self.block_size :]
            generator = torch.Generator(device=self.device).manual_seed(r.seed)
            self.sequences.append(_Sequence(r, ids, generator, prompt_tokens=len(ids)))
        self.logits: dict[int, torch.Tensor] = {}  # sequence index -> next-token log-probs or logits (1, V)
        self.groups: dict[int, list[int]] = {}  # prompt length -> indices of its all-member sequences
        self.caches: dict[int, EnsembleCache | None] = {}
        M = ensemble.config.num_members
        for i, s in enumerate(self.sequences):
            if s.request.k is not None and s.request.k < M:
                s.routed = RoutedDecoder(ensemble, s.request.k, s.request.every)
                self.logits[i] = s.routed.prefill(self._tensor([s.ids]))
            else:
                self.groups.setdefault(len(s.ids), []).append(i)
        for length, rows in self.groups.items():
            self._run_group(length, rows, fresh=True)

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _run_group(self, length: int, rows: list[int], fresh: bool) -> None:
        """Run a group's rows: the whole (cropped) context when fresh, else each row's newest token."""
        if fresh:
            tokens = self._tensor([self.sequences[i].ids[-self.block_size :] for i in rows])  # (B, T)
            cache = None
        else:
            tokens = self._tensor([[self.sequences[i].ids[-1]] for i in rows])  # (B, 1)
            cache = self.caches[length]
        logits, self.caches[length] = self.ensemble._step(tokens, cache)  # (B, V)
        for row, i in enumerate(rows):
            self.logits[i] = logits[row : row + 1]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @torch.no_grad()
    def step(self) -> list[dict[str, Any] | None]:
        """Sample one token per unfinished sequence, then run the models on it for the next."""
        lines: list[dict[str, Any] | None] = []
        for i, s in enumerate(self.sequences):
            if s.finished:
                lines.append(None)
                continue
            r = s.request
            token = int(sample_next(self.logits[i], r.temperature, r.top_k, s.generator)[0, 0])
            s.ids.append(token)
            s.generated += 1
            line: dict[str, Any] = {"token": token, "text": s.decoder.decode(self.tokenizer.decode_bytes([token]))}
            if s.finished:
                line["text"] += s.decoder.decode(b"", final=True)
            lines.append(line)
            if s.routed is not None and not s.finished:
                self.logits[i] = s.routed.step(self._tensor([[token]]))
        for length, rows in self.groups.items():
            if all(self.sequences[i].finished for i in rows):
                continue
            cache = self.caches[length]
            self._run_group(length, rows, fresh=cache is None or cache.length >= self.block_size)
        return lines

    def done_line(self, index: int) -> dict[str, Any]:
        s = self.sequences[index]
        return {"done": True, "prompt_tokens": s.prompt_tokens, "tokens": s.generated, "finish_reason": "length",
                "routed_members": s.request.k if s.routed is not None else None}


def check_routed(ensemble: LeviathanEnsemble, request: SampleRequest, prompt_tokens: int) -> None:
    """RequestError naming the routing field the ensemble cannot use for this request."""
    M = ensemble.config.num_members
    if request.k is None or request.k >= M:
        if request.k is not None and request.k > M:
            raise RequestError("k", f"k: must be in [1, {M}] (the number of members), got {request.k}")
        return
    try:
        check_routing(ensemble.merger, request.k, request.every, prompt_tokens)
    except ValueError as e:
        name = str(e).split(":")[0]
        raise RequestError(name if name in ("k", "every") else "k", str(e)) from None
    block = ensemble.config.block_size
    if prompt_tokens + request.max_new_tokens > block:
        raise RequestError("max_new_tokens", f"max_new_tokens: a routed sequence must fit the block size {block} "
                                             f"(prompt {prompt_tokens} tokens + max_new_tokens)")


@serve.deployment
class EnsembleServer:
    """A run's final/ ensemble, decoding with its caches; requests batched per replica."""

    def __init__(self, final_dir: str, k: int | None, every: int, max_batch_size: int) -> None:
        final = Path(final_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a replica sees a GPU only with num_gpus > 0
        self.ensemble = LeviathanEnsemble.load(final, map_location=device).eval()
        self.tokenizer = load_tokenizer(final)
        self.k, self.every = k, every
        self._decode_batch.set_max_batch_size(max_batch_size)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _decode_batch(self, requests: list[SampleRequest]) -> AsyncGenerator[list[Any], None]:
        """Every request of the batch, one line each per iteration; StopIteration ends a request's stream."""
        decode = await asyncio.to_thread(BatchDecode, self.ensemble, self.tokenizer, requests)
        ended = [False] * len(requests)
        while not all(ended):
            lines = await asyncio.to_thread(decode.step)
            out: list[Any] = []
            for i, line in enumerate(lines):
                if line is not None:
                    out.append(line)
                elif not ended[i]:
                    ended[i] = True
                    out.append(decode.done_line(i))
                else:
                    out.append(StopIteration)
            yield out

    async def _lines(self, request: SampleRequest) -> AsyncGenerator[bytes, None]:
        async for line in self._decode_batch(request):
            yield (json.dumps(line) + "\n").encode()
            if line.get("done"):
                return

    async def __call__(self, http: Request) -> Response:
        if http.method != "POST" or not http.url.path.rstrip("/").endswith("/generate"):
            return JSONResponse({"detail": "POST <route prefix>/generate"}, status_code=404)
        try:
            body = json.loads(await http.body())
        except ValueError:
            return JSONResponse({"detail": [{"loc": ["body"], "msg": "the body must be JSON"}]}, status_code=422)
        try:
            request = parse_request(body, self.k, self.every)
            prompt_tokens = len((self.tokenizer.encode(request.prompt) or [0])[-self.ensemble.config.block_size :])
            check_routed(self.ensemble, request, prompt_tokens)
        except RequestError as e:
            return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": str(e)}]}, status_code=422)
        return StreamingResponse(self._lines(request), media_type="application/x-ndjson")

