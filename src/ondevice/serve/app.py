"""The FastAPI app: OpenAI (and Anthropic Messages) routes over the runner (runner.py), plus /health, /metrics,
/tokenize and /detokenize; llama-server's aliases of them (``/chat/completions``, ...) lead to the same routes, and
its own routes (/completion, /props, ...) are native.py's, Ollama's ollama.py's."""

from __future__ import annotations

import base64
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..cascade.serve import NO_CLOUD, only_restricts, server_cascade
from ..errors import InvalidArgument
from . import messages, native, ollama, slots
from . import replies as R
from . import schemas as S
from .http import (
    Aliases,
    ErrorShape,
    Guard,
    access_logger,
    error_response,
    install_cors,
    install_error_handlers,
    note,
)
from .responses import chat_request, count_input_tokens, respond
from .runner import Runner
from .state import ServerState, token_piece

# inputs per /v1/embeddings request: OpenAI's limit. Clients batch up to it (LangChain's OpenAIEmbeddings sends
# 1,000 texts a request); inputs are packed many to a decode, and a client that leaves stops the later decodes
MAX_EMBEDDING_INPUTS = 2048
COUNTING = ("/v1/responses/input_tokens", "/v1/chat/completions/input_tokens")  # a request's prompt tokens
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", *messages.PATHS, *COUNTING, "/v1/models",
          "/v1/embeddings", "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", *ollama.PATHS,
          *native.PATHS, "/slots", "/"}


def create_app(state: ServerState) -> FastAPI:
    """An app serving ``state``'s model; the batcher runs while the app's lifespan is active."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            if state.cascade is not None:
                await state.cascade.aclose()
            await run_in_threadpool(state.close)

    app = FastAPI(title="ondevice", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(Guard, api_keys=state.settings.api_keys, max_body=state.settings.max_body_bytes,
                       metrics=state.metrics, routes=ROUTES,
                       log=access_logger() if state.settings.access_log else None)
    app.add_middleware(ErrorShape, **messages.ERRORS)  # around the guard: its 401 and 413 too, in Anthropic's shape
    app.add_middleware(ErrorShape, **ollama.ERRORS)  # the same, for Ollama's /api/* routes
    app.add_middleware(ErrorShape, **native.ERRORS)  # and for llama-server's own (/completion, /props, ...)
    install_cors(app, state.settings.cors)  # a preflight carries no API key
    app.add_middleware(Aliases)  # outermost: llama-server's /chat/completions is /v1/chat/completions for all
    app.state.ondevice = state
    state.cascade = server_cascade(state)  # None unless --cascade URL
    runner = Runner(state)
    app.state.end_requests = runner.end_requests  # what the server calls as it stops (server.py)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' checks (HAProxy's httpchk)
    async def health():
        return {"status": "ok", "slots_idle": state.settings.parallel - state.batcher.busy,
                "slots_processing": state.batcher.busy, "queue_depth": state.batcher.queue_depth}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # the same routes serve the Anthropic SDK (every call of it sends anthropic-version): its fields are added
    @app.get("/v1/models")
    async def models(request: Request):
        listing = R.ModelList(data=state.model_cards())
        if "anthropic-version" in request.headers:
            return messages.model_page(listing.model_dump(mode="json"))
        return listing

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):  # the openai (and anthropic) client's models.retrieve
        card = next((c for c in state.model_cards() if c.id == model_id), None)
        if card is None:
            return error_response(404, f"The model '{model_id}' does not exist; GET /v1/models lists them",
                                  param="model", code="model_not_found")
        return messages.model_info(card.model_dump(mode="json")) if "anthropic-version" in request.headers else card

    @app.post("/tokenize")
    async def tokenize(req: S.TokenizeRequest):
        toks = state.tokenize(req.text, add_special=req.add, parse_special=req.parse_special)
        if req.with_pieces:  # as llama-server: the piece's text, or its bytes where it is part of a character
            return {"tokens": [{"id": t, "piece": token_piece(state.special_bytes[t])} for t in toks]}
        return {"tokens": toks, "count": len(toks), "max_model_len": state.settings.ctx}

    @app.post("/detokenize")
    async def detokenize(req: S.DetokenizeRequest):
        text = state.detokenize(req.tokens)
        return {"content": text, "prompt": text}  # llama-server's key, and vLLM's (lm-eval reads it)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's route, which lm-eval's local-completions asks first: with it no Hugging Face tokenizer
        is downloaded (it then tokenizes through /tokenize and /detokenize)."""
        return state.tokenizer_info()

    @app.post("/v1/embeddings")
    async def embeddings(req: S.EmbeddingRequest, request: Request):
        inp = req.input
        if isinstance(inp, str) or (inp and isinstance(inp[0], int)):
            inp = [inp]
        if not inp:
            raise InvalidArgument("input is empty; give a string or a list of strings")
        if len(inp) > MAX_EMBEDDING_INPUTS:
            raise InvalidArgument(f"input has {len(inp)} items but this server embeds at most "
                                  f"{MAX_EMBEDDING_INPUTS} per request; split it into several requests")
        token_lists = [state.tokenize(x) if isinstance(x, str) else list(x) for x in inp]
        runs = state.embedding_packs(token_lists)  # every input checked first; then few inputs-per-decode runs
        n_embd = state.embedder.ll.llama_model_n_embd(state.embedder.model)
        if req.dimensions is not None and req.dimensions > n_embd:  # before any computing
            raise InvalidArgument(f"dimensions {req.dimensions} exceeds the model's {n_embd}")
        vecs = []
        for run in runs:  # the client gave up (queued or between packs): compute nothing more for it
            got = None if await request.is_disconnected() else await state.embed([token_lists[i] for i in run],
                                                                                  request)
            if got is None:
                return JSONResponse({}, status_code=499)
            vecs.extend(got)
        data, n_tok = [], sum(map(len, token_lists))
        for i, vec in enumerate(vecs):
            if req.dimensions is not None:
                vec = vec[:req.dimensions]
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)  # unit length, as OpenAI returns
            emb = (base64.b64encode(vec.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                   else vec.astype(float).tolist())
            data.append(R.Embedding(index=i, embedding=emb))
        note(request, tokens=(n_tok, 0))
        return R.EmbeddingResponse(data=data, model=state.model_id,
                                   usage=R.EmbeddingUsage(prompt_tokens=n_tok, total_tokens=n_tok))

    ollama.add_routes(app, runner, embeddings)  # Ollama's /api/chat, /api/generate, /api/tags, ... (ollama.py)
    native.add_routes(app, runner, embeddings)  # llama-server's /completion, /props, /lora-adapters, ... (native.py)
    slots.add_routes(app, state)  # llama-server's /slots and /slots/ID?action=save|restore|erase (slots.py)

    def no_cloud(cascade: Any) -> JSONResponse | None:
        """A 400 for a chat request's ``cascade`` object when there is no cloud tier: served on the device, a
        policy that asked to defer would be ignored in silence (``cascade: null`` asks for nothing)."""
        if cascade is None or state.cascade is not None or only_restricts(cascade):  # never_defer: the device's
            return None
        return error_response(400, f"invalid request: cascade: {NO_CLOUD}", param="cascade", code="invalid_value")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        return no_cloud(req.cascade) or await runner.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: S.CompletionRequest, request: Request):
        return await runner.completions(req, request)

    @app.post("/v1/responses")
    async def responses(request: Request, body: Annotated[dict[str, Any], Body()]):
        return no_cloud(body.get("cascade")) or await respond(runner, body, request)

    @app.get("/v1/responses/{response_id}")  # the openai client's responses.retrieve: a 404 that says why
    async def response_by_id(response_id: str):
        return error_response(404, f"no response {response_id!r}: ondevice keeps no responses (every reply says "
                                   f"store: false); keep the reply you got, or send the conversation again as input",
                              param="response_id", code="not_found")

    @app.post("/v1/responses/input_tokens")
    async def responses_input_tokens(body: Annotated[dict[str, Any], Body()]):
        return await count_input_tokens(runner, body)

    @app.post("/v1/chat/completions/input_tokens")  # llama-server's: the chat prompt's tokens
    async def chat_input_tokens(body: Annotated[dict[str, Any], Body()]):
        return {"input_tokens": await runner.prompt_tokens(chat_request({**body, "stream": False}, {}))}

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request, body: Annotated[dict[str, Any], Body()]):
        return no_cloud(body.get("cascade")) or await messages.respond(runner, body, request)

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(body: Annotated[dict[str, Any], Body()]):
        return await messages.count_tokens(runner, body)

    return app
