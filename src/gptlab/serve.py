"""`gptlab serve`: an OpenAI-compatible completions server and a playground page.

Endpoints: POST /v1/completions, POST /v1/chat/completions (serve_chat.py), GET /v1/models, GET /health, and GET / (the playground).
Requests are checked here (OpenAI's error shape on any problem) and handed to serve_engine's
worker thread, which batches every live sequence; the event loop only parses, waits and writes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.chat import model_chat
from gptlab.config import ServeConfig
from gptlab.errors import UserError
from gptlab import serve_chat
from gptlab.serve_engine import Engine, SamplingParams, Sequence
from gptlab.tokenizer import EOT

log = logging.getLogger("gptlab.serve")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # each prompt as text (for echo)
    params: SamplingParams
    n: int = 1
    stream: bool = False
    echo: bool = False
    include_usage: bool = False


# fields that would change the result if ignored; not supported (yet)
_UNSUPPORTED = {"logprobs": None, "suffix": None, "logit_bias": None, "presence_penalty": 0,
                "frequency_penalty": 0}


def _get(body: dict, name: str, kinds: tuple, default, what: str):
    """body[name] if it has one of the JSON types `kinds` (None/absent -> default), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # true/false is not a number here
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(body.get(name))[:40]}", name, "invalid_type")
    return value


def _prompts(body: dict, tok, cfg: ServeConfig, vocab: int) -> tuple[list[list[int]], list[str]]:
    """The prompts as token ids and texts: a string, a list of strings, a list of token ids, or a
    list of such lists. An empty string is <|endoftext|>, as in `gptlab sample`."""
    p = body.get("prompt", None)
    bad = ApiError(400, "'prompt' must be a string, a list of strings, or token ids (a list of integers "
                        "or a list of such lists)", "prompt", "invalid_type")
    if p is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    ints = lambda x: isinstance(x, list) and x and all(type(i) is int for i in x)  # noqa: E731
    if isinstance(p, str) or ints(p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad
    if len(p) > cfg.max_prompts:
        raise ApiError(400, f"at most {cfg.max_prompts} prompts per request, got {len(p)}", "prompt",
                       "too_many_prompts")
    ids, texts = [], []
    for item in p:
        if isinstance(item, str):
            ids.append(tok.encode(item) or [getattr(tok, "eot", EOT)])
            texts.append(item)
        elif ints(item):
            if not all(0 <= i < vocab for i in item):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value")
            ids.append(list(item))
            texts.append(tok.decode([i for i in item if i < tok.vocab_size]))  # a chat token has no text
        else:
            raise bad
    return ids, texts


def _sampling(body: dict, cfg: ServeConfig) -> tuple[SamplingParams, int]:
    max_tokens = _get(body, "max_tokens", (int,), 16, "an integer")
    if max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens", "invalid_value")
    if max_tokens > cfg.max_tokens_cap:
        raise ApiError(400, f"'max_tokens' is {max_tokens}, above this server's cap of {cfg.max_tokens_cap}",
                       "max_tokens", "max_tokens_above_cap")
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number"))
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ApiError(400, f"'temperature' must be >= 0 (0 is greedy), got {temperature}", "temperature",
                       "invalid_value")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _get(body, "top_k", (int,), 0, "an integer")
    if top_k < -1:
        raise ApiError(400, f"'top_k' must be >= 0 (0 or -1: no cut), got {top_k}", "top_k", "invalid_value")
    seed = _get(body, "seed", (int,), None, "an integer")
    if seed is not None and not 0 <= seed < 2**63 - 1024:
        raise ApiError(400, "'seed' must be a non-negative 63-bit integer", "seed", "invalid_value")
    stop = _get(body, "stop", (str, list), (), "a string or a list of strings")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop", "invalid_value")
    n = _get(body, "n", (int,), 1, "an integer")
    max_n = min(cfg.max_n, cfg.max_batch)
    if not 1 <= n <= max_n:
        raise ApiError(400, f"'n' must be between 1 and this server's cap of {max_n}, got {n}", "n", "invalid_value")
    best_of = _get(body, "best_of", (int,), n, "an integer")
    if best_of != n:
        raise ApiError(400, "'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name, neutral) not in (None, neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                            stop=stop, seed=seed)
    return params, n


def _json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg if hasattr(e, 'msg') else 'not UTF-8'})",
                       None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    _get(body, "model", (str,), None, "a string")
    return body


def parse_chat(raw: bytes, tok, cfg: ServeConfig, seq_len: int, fmt) -> CompletionRequest:
    """The body of POST /v1/chat/completions, checked: one prompt (the rendered messages), ending
    at the template's end-of-turn token."""
    body = _json_body(raw)
    params, n = _sampling(body, cfg)
    stream = _get(body, "stream", (bool,), False, "true or false")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        params, _ = _sampling({**body, "max_tokens": body["max_completion_tokens"]}, cfg)
    try:
        ids = serve_chat.chat_prompt(body, tok, fmt)
    except serve_chat.ChatError as e:
        raise ApiError(e.status, e.message, e.param, e.code) from None
    _check_context([ids], params, seq_len)
    params = SamplingParams(**{**params.__dict__, "stop_token": fmt.end})
    return CompletionRequest([ids], [""], params, n, stream, False, bool(opts.get("include_usage", False)))


def _check_context(ids: list[list[int]], params: SamplingParams, seq_len: int) -> None:
    for i, p in enumerate(ids):
        need = len(p) + params.max_tokens
        if need > seq_len:
            which = f"prompt {i} has" if len(ids) > 1 else "the prompt has"
            raise ApiError(400, f"this model's context is {seq_len} tokens, but {need} were requested "
                                f"({which} {len(p)} tokens, max_tokens is {params.max_tokens}); "
                                f"reduce them by {need - seq_len}", "prompt", "context_length_exceeded")


def parse_completion(raw: bytes, tok, cfg: ServeConfig, seq_len: int, vocab: int) -> CompletionRequest:
    """The body of POST /v1/completions, checked: any problem is an ApiError (400)."""
    body = _json_body(raw)
    params, n = _sampling(body, cfg)
    stream = _get(body, "stream", (bool,), False, "true or false")
    echo = _get(body, "echo", (bool,), False, "true or false")
    opts = _get(body, "stream_options", (dict,), {}, "an object")
    ids, texts = _prompts(body, tok, cfg, vocab)
    if len(ids) * n > cfg.max_prompts:
        raise ApiError(400, f"prompts x n is {len(ids) * n}, above this server's cap of {cfg.max_prompts}",
                       "n", "too_many_choices")
    _check_context(ids, params, seq_len)
    return CompletionRequest(ids, texts, params, n, stream, echo, bool(opts.get("include_usage", False)))


class Mailbox:
    """Events from the worker thread to the event loop, handed over in bursts: one wake-up of the
    loop per burst (about one per decode step) rather than one per token of every sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:  # any thread
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the event loop
        with self.lock:
            items, self.items = self.items, deque()
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class Choices:
    """The sequences of one request (prompt-major: choice i*n + j) and the queue their events
    reach on the event loop."""

    def __init__(self, req: CompletionRequest, mailbox: Mailbox):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.groups: list[list[Sequence]] = []
        for pi, prompt in enumerate(req.prompts):
            group = []
            for j in range(req.n):
                index = pi * req.n + j
                # each choice draws from its own generator, so a seeded request gives the same
                # text however it is batched
                params = req.params
                if params.seed is not None:
                    params = SamplingParams(**{**params.__dict__, "seed": params.seed + index})
                sink = (lambda i: lambda ev: mailbox.post(self.queue, (i, ev)))(index)
                group.append(Sequence(prompt, params, sink))
            self.groups.append(group)
            self.seqs.extend(group)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancelled = True

    def usage(self, prompts: list[list[int]], n: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts) * n
        completion = sum(len(s.tokens) for s in self.seqs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


def _error_body(message: str, type: str = "server_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (413) without reading it all."""
    too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       None, "request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _complete(req: CompletionRequest, choices: Choices, meta: dict) -> dict:
    """Wait for every choice to end; the whole completion object."""
    total = len(choices.seqs)
    texts = [req.prompt_texts[i // req.n] if req.echo else "" for i in range(total)]
    reasons: list[str | None] = [None] * total
    left = total
    while left:
        i, (kind, value) = await choices.queue.get()
        if reasons[i] is not None:
            continue
        if kind == "text":
            texts[i] += value
        elif kind == "end":
            reasons[i] = value
            left -= 1
        else:
            raise ApiError(500, value, None, None, "server_error")
    out = [{"text": texts[i], "index": i, "logprobs": None, "finish_reason": reasons[i]} for i in range(total)]
    return {**meta, "choices": out, "usage": choices.usage(req.prompts, req.n)}


async def _stream(req: CompletionRequest, choices: Choices, meta: dict, shape=lambda obj: obj):
    """Server-sent events: one chunk per generated token (its text may be empty while a UTF-8
    character or a possible stop string is incomplete), a last chunk per choice with its
    finish_reason, then `data: [DONE]`. `shape` turns a chunk into another API's (chat)."""
    def event(payload: dict) -> str:
        if payload.get("choices"):
            payload = shape(payload)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(i: int, text: str, reason: str | None) -> str:
        return event({**meta, "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}]})

    try:
        total = len(choices.seqs)
        if req.echo:
            for i in range(total):
                yield chunk(i, req.prompt_texts[i // req.n], None)
        ended = [False] * total
        left = total
        while left:
            i, (kind, value) = await choices.queue.get()
            if ended[i]:
                continue
            if kind == "text":
                yield chunk(i, value, None)
            elif kind == "end":
                ended[i] = True
                left -= 1
                yield chunk(i, "", value)
            else:
                yield event(_error_body(value))
                break
        if req.include_usage and not left:
            yield event({**meta, "choices": [], "usage": choices.usage(req.prompts, req.n)})
        yield "data: [DONE]\n\n"
    finally:
        choices.cancel()  # a client that went away frees its rows at the next step


async def _until_disconnect(request: Request, work, poll: float = 0.25):
    """Await `work`, giving up (499, never sent) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection", None, "client_closed_request")
    finally:
        task.cancel()


def playground_html() -> str:
    return resources.files("gptlab").joinpath("static/playground.html").read_text(encoding="utf-8")


def build_app(engine: Engine, cfg: ServeConfig, model_id: str) -> FastAPI:
    """The FastAPI application around a running engine."""
    app = FastAPI(title="gptlab serve", docs_url=None, redoc_url=None, openapi_url=None)
    seq_len, vocab = engine.model.config.seq_len, engine.model.config.vocab_size
    chat_fmt = model_chat(engine.model)  # None: a base model, /v1/chat/completions refused
    started = int(time.time())
    page = playground_html()
    mailbox: Mailbox | None = None  # made on the first request, on the server's event loop

    def check_key(request: Request) -> None:
        if cfg.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                               "invalid_api_key", "authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.error("request failed", exc_info=e)  # the details go to the log, never to the client
        return JSONResponse(_error_body("internal server error"), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "running": len(engine.active), "waiting": len(engine.pending)}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {"id": model_id, "object": "model", "created": started, "owned_by": "gptlab",
                "max_model_len": seq_len, "chat": chat_fmt is not None}
        return {"object": "list", "data": [card]}

    async def run(request: Request, req: CompletionRequest, prefix: str, chat: bool):
        nonlocal mailbox
        if mailbox is None:
            mailbox = Mailbox(asyncio.get_running_loop())
        choices = Choices(req, mailbox)
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        for group in choices.groups:
            engine.submit(group)
        if req.stream:
            shape = serve_chat.chunk_shaper() if chat else (lambda obj: obj)
            return StreamingResponse(_stream(req, choices, meta, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            out = await _until_disconnect(request, _complete(req, choices, meta))
            return serve_chat.chat_completion(out) if chat else out
        finally:
            choices.cancel()  # finished, failed, or the client left: free the rows

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        raw = await _read_body(request, cfg.max_body_bytes)
        # parsing and tokenizing a large body takes a while: off the event loop too
        req = await asyncio.to_thread(parse_completion, raw, engine.tok, cfg, seq_len, vocab)
        return await run(request, req, "cmpl", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = await asyncio.to_thread(parse_chat, await _read_body(request, cfg.max_body_bytes), engine.tok, cfg,
                                      seq_len, chat_fmt)
        return await run(request, req, "chatcmpl", chat=True)

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a taken port is one clear error before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def load_engine(cfg: ServeConfig, status=print) -> tuple[Engine, str]:
    """Load MODEL on the chosen device and dtype, and start the batching worker."""
    import torch

    from gptlab.checkpoint import load_model
    from gptlab.runtime import get_runtime
    from gptlab.tokenizer import model_tokenizer

    rt = get_runtime(device=cfg.device, dtype=cfg.dtype, compile=False)
    model, where = load_model(cfg.model, rt.device)
    if rt.dtype != torch.float32:
        model.to(rt.dtype)  # inference only: weights and KV cache in the compute dtype
    n_params = sum(p.numel() for p in model.parameters())
    status(f"{where}: {n_params / 1e6:.1f}M parameters, context {model.config.seq_len}; {rt.describe()}")
    name = cfg.model_name or Path(str(cfg.model).rstrip("/")).name or "gptlab"
    return Engine(model, model_tokenizer(model), max_batch=cfg.max_batch), name


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(cfg: ServeConfig, status=print) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    cfg.validate()
    sock = _listen(cfg.host, cfg.port)
    if not cfg.api_key and not _is_loopback(sock.getsockname()[0]):
        status(f"warning: listening on {cfg.host}, reachable from other machines, without --api-key: anyone "
               f"who can reach this port can use the model")
    engine, name = load_engine(cfg, status)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    status(f"serving {name} on http://{shown}:{port} (playground at /, API at /v1); "
           f"up to {cfg.max_batch} sequences per batch" + ("; API key required" if cfg.api_key else ""))
    config = uvicorn.Config(build_app(engine, cfg, name), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


class BackgroundServer:
    """The app on 127.0.0.1 (any free port) in a thread of this process, for tests and embedding:
    `with BackgroundServer(engine, cfg, name) as url: ...`. Closes the engine on exit."""

    def __init__(self, engine: Engine, cfg: ServeConfig, name: str = "gptlab"):
        import uvicorn

        self.engine = engine
        self.sock = _listen(cfg.host, 0)
        config = uvicorn.Config(build_app(engine, cfg, name), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()
        self.sock.close()
