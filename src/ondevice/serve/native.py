"""llama-server's own routes beside the OpenAI ones: ``/completion`` (also ``/completions``), ``/infill``,
``/embedding`` and ``/embeddings``, ``/props``, ``/apply-template`` and ``/lora-adapters``, in llama-server's request
and reply shapes, so that clients written for llama-server (its web UI's /props, SillyTavern's and Continue's
llama.cpp modes, llama.vscode's /infill, scripts on /completion) work unchanged. Generation goes through the
runner's jobs, as the OpenAI routes' does.

/completion takes a prompt as text, token ids, ids and text mixed (text after the first piece gets no BOS), or a
list of those (one reply each, an array); llama-server's sampling fields by its names (most are ours too),
``n_predict`` (-1: until the context is full), ``n_probs`` -> ``completion_probabilities`` (from the raw logits, as
llama-server's without ``post_sampling_probs``), ``json_schema`` or ``grammar``, ``logit_bias`` in all three of its
forms, ``samplers`` (a subset of llama.cpp's order, then optionally ``infill``: the samplers left out are off;
another order is refused), ``lora`` (per-request adapter scales), ``return_tokens``, ``response_fields``,
``timings_per_token``, ``n_cmpl``, ``post_sampling_probs`` (``n_probs`` after the sampler chain, as probabilities),
and code infill's ``n_indent`` and ``t_max_predict_ms`` (engine/stops.LineLimits);
``samplers`` and the line limits are the OpenAI routes' too (runner.py), as on llama-server.
Streams are llama-server's: one ``data:`` event per token, then the whole reply's fields with ``stop: true``, no
``[DONE]``. Accepted and without effect here: ``cache_prompt`` (a prompt's cached prefix is always reused),
``id_slot`` (any slot reuses any other's prefix), ``n_keep``/``n_discard``/``n_cache_reuse`` (a prompt that does
not fit is refused, never shifted), ``return_progress``. Refused with the fix:
``min_keep``, multimodal prompts. /infill builds llama-server's fill-in-the-middle prompt
(:func:`infill_prompt`) and answers as /completion.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

from fastapi import Body, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..engine.grammar import schema_grammar
from ..engine.records import Generation
from ..errors import InvalidArgument
from . import replies as R
from . import schemas as S
from . import slots
from .chunks import PING, SSE_PING, sse, timings_of
from .fim import NoInfill, infill_prompt
from .http import error_payload, error_response, note
from .responses import chat_request, validated
from .sampling import SAMPLERS, choice_samplings, request_sampling, sampler_names

PATHS = ("/completion", "/completions", "/infill", "/embedding", "/embeddings", "/props", "/apply-template",
         "/lora-adapters")
# the request fields that are ours under the same name (CompletionRequest's)
_SAME = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
         "frequency_penalty", "top_n_sigma", "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau",
         "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "dry_multiplier", "dry_base", "dry_allowed_length",
         "dry_penalty_last_n", "dry_sequence_breakers", "seed", "stop", "ignore_eos", "grammar", "lora", "model",
         "n_indent", "t_max_predict_ms", "samplers")
_NAMES = {"max_tokens": "n_predict", "logprobs": "n_probs", "n": "n_cmpl"}  # ours -> llama-server's, in errors
_REFUSED = {"min_keep": "the samplers keep their own minimum (1)"}


def _int(body: dict, key: str, default: int, low: int) -> int:
    v = body.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise InvalidArgument(f"{key}={v!r} must be an integer >= {low}")
    return v


def _prompts(state, prompt) -> list[list[int]]:
    """llama-server's prompt shapes as token lists: text, ids, ids and text mixed, {"prompt_string": ...}, or a
    list of those (text is tokenized with BOS only at the start, special tokens parsed, as llama-server's)."""
    def one(p, where: str) -> list[int]:
        if isinstance(p, dict):
            if p.get("multimodal_data"):
                raise InvalidArgument(f"{where}.multimodal_data: the model reads text only; send the prompt as text")
            if "prompt_string" not in p:
                raise InvalidArgument(f"{where} must have a prompt_string")
            return one(p["prompt_string"], f"{where}.prompt_string")
        if isinstance(p, str):
            return state.tokenize(p, add_special=True, parse_special=True)
        if isinstance(p, list) and p and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in p):
            toks: list[int] = []
            for k, x in enumerate(p):
                toks += state.tokenize(x, add_special=k == 0, parse_special=True) if isinstance(x, str) else [x]
            return toks
        raise InvalidArgument(f"{where} must be a string, a list of token ids, a list of ids and strings, or an "
                              f"object with a prompt_string")

    if prompt is None or prompt == "" or prompt == []:
        raise InvalidArgument("prompt is required: a string, token ids, or a list of those")
    # a list with a number in it is one prompt (ids, or ids and text); any other list holds several
    if isinstance(prompt, list) and not any(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return [one(x, f"prompt[{i}]") for i, x in enumerate(prompt)]
    return [one(prompt, "prompt")]


def _logit_bias(state, bias) -> dict[int, float]:
    """llama-server's logit_bias: [[token or text, bias or false], ...] or {"token or text": bias}; false bans
    (-100 here, as OpenAI's), text stands for each of its tokens; entries it would skip are skipped too."""
    if bias is None:
        return {}
    if isinstance(bias, dict):
        pairs = list(bias.items())
    elif isinstance(bias, list):
        pairs = [tuple(e) for e in bias if isinstance(e, list) and len(e) == 2]
    else:
        raise InvalidArgument("logit_bias must be [[token, bias], ...] or {\"token\": bias}")
    out: dict[int, float] = {}
    n_vocab = state.engine.n_vocab
    for key, b in pairs:
        if b is False:
            b = -100.0
        elif isinstance(b, bool) or not isinstance(b, (int, float)):
            continue
        elif isinstance(b, int) and abs(b) >= 1e308:  # float() would raise OverflowError
            raise InvalidArgument(f"logit_bias: the bias for {str(key)[:40]!r} is out of range; give a number from "
                                  f"-100 to 100 (or false to ban the token)")
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        toks = [key] if isinstance(key, int) else state.tokenize(key, add_special=False, parse_special=False)
        out.update({t: float(b) for t in toks if 0 <= t < n_vocab})
    return out


def completion_request(state, body: dict) -> tuple[S.CompletionRequest, list[list[int]]]:
    """The completions request a /completion body asks for, and its prompts' tokens."""
    for key, why in _REFUSED.items():
        if body.get(key) not in (None, False, 0):
            raise InvalidArgument(f"{key}: {why}; leave {key} unset")
    from ..cascade.serve import completion_cascade

    completion_cascade(body.get("cascade"))
    n_predict = body.get("n_predict", body.get("max_tokens", body.get("max_completion_tokens", -1)))
    if not isinstance(n_predict, int) or isinstance(n_predict, bool) or n_predict < -1:
        raise InvalidArgument(f"n_predict={n_predict!r} must be an integer: the most tokens to generate, or -1 for no "
                              f"limit but the context")
    n_probs = _int(body, "n_probs", body.get("logprobs") or 0, 0)
    if n_probs > 20:
        raise InvalidArgument(f"n_probs={n_probs}: this server gives at most 20 alternatives per token")
    req = {k: body[k] for k in _SAME if body.get(k) is not None}
    schema = body.get("json_schema")
    if schema is not None and body.get("grammar") is None:  # llama-server: grammar wins
        if not isinstance(schema, dict):
            raise InvalidArgument(f"json_schema must be a JSON schema object ({{}} for any JSON), not {schema!r:.40}")
        req["grammar"] = schema_grammar(schema, "json_schema")
    creq = validated(S.CompletionRequest, {
        **req, "prompt": [0], "max_tokens": state.settings.ctx if n_predict < 0 else n_predict,
        "logprobs": n_probs or None, "n": _int(body, "n_cmpl", body.get("n", 1), 1),
        "stream": bool(body.get("stream")), "logit_bias": _logit_bias(state, body.get("logit_bias"))}, _NAMES)
    return creq, _prompts(state, body.get("prompt"))


def _text(piece: bytes) -> str:
    """A token's text as llama-server shows it: the bytes up to an incomplete UTF-8 character cut off."""
    for cut in range(len(piece), max(len(piece) - 4, 0) - 1, -1):
        try:
            return piece[:cut].decode()
        except UnicodeDecodeError:
            continue
    return ""


def _piece(state, token: int) -> str:
    return _text(state.special_bytes[token]) if 0 <= token < len(state.special_bytes) else ""


def _probs(state, recs: list[Generation], post: bool = False) -> list[dict]:
    """``completion_probabilities``: logprobs of the raw logits, or (``post``: post_sampling_probs) the
    probabilities after the sampler chain, as llama-server names them (``prob``, ``top_probs``)."""
    raw = state.special_bytes

    def entry(t: int, lp: float) -> dict:
        if post:
            return {"id": t, "token": _text(raw[t]), "bytes": list(raw[t]), "prob": math.exp(lp)}
        lp = lp if math.isfinite(lp) else -3.4028234663852886e38  # llama-server's stand-in for log(0)
        return {"id": t, "token": _text(raw[t]), "bytes": list(raw[t]), "logprob": lp}

    top = "top_probs" if post else "top_logprobs"
    return [{**entry(g.token, g.logprob), top: [entry(t, v) for t, v in g.top_logprobs or ()]}
            for g in recs if g.token >= 0 and g.logprob is not None]


def _timings(g: Generation) -> dict:
    t = timings_of(g).model_dump(exclude_none=True)
    t.pop("ttft_ms", None)
    t["prompt_per_token_ms"] = t["prompt_ms"] / t["prompt_n"] if t["prompt_n"] else 0.0
    t["predicted_per_token_ms"] = 1e3 / t["predicted_per_second"] if t["predicted_per_second"] else 0.0  # per gap
    return t


def settings_of(state, sampling, stream: bool, n_probs: int, lora: list | None, samplers=None,
                post: bool = False) -> dict:
    """llama-server's ``generation_settings`` of a reply (its names, the values the job ran with; ``samplers``:
    the request's, else llama.cpp's whole chain)."""
    s = sampling
    return {
        "seed": s.seed, "temperature": s.temp, "dynatemp_range": s.dynatemp_range,
        "dynatemp_exponent": s.dynatemp_exponent, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
        "top_n_sigma": s.top_n_sigma, "xtc_probability": s.xtc_probability, "xtc_threshold": s.xtc_threshold,
        "typical_p": s.typical_p, "repeat_last_n": s.repeat_last_n, "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        "dry_multiplier": s.dry_multiplier, "dry_base": s.dry_base, "dry_allowed_length": s.dry_allowed_length,
        "dry_penalty_last_n": s.dry_penalty_last_n, "dry_sequence_breakers": list(s.dry_sequence_breakers),
        "mirostat": s.mirostat, "mirostat_tau": s.mirostat_tau, "mirostat_eta": s.mirostat_eta,
        "stop": list(s.stop), "max_tokens": s.max_tokens, "n_predict": s.max_tokens, "n_keep": 0, "n_discard": 0,
        "ignore_eos": s.ignore_eos, "stream": stream,
        "logit_bias": [{"bias": b if math.isfinite(b) else None, "token": t} for t, b in s.logit_bias],
        "n_probs": n_probs, "min_keep": 0,
        "grammar": s.grammar or "", "samplers": list(SAMPLERS) if samplers is None else sampler_names(samplers),
        "timings_per_token": False,
        "post_sampling_probs": post, "lora": [{"id": e.id, "scale": e.scale} for e in lora or []]}


def _fields(res: dict, wanted) -> dict:
    """llama-server's response_fields: only those fields; 'a/b' takes b out of a, named 'a/b'."""
    out = {}
    for f in wanted:
        v: Any = res
        for part in f.split("/"):
            v = v.get(part, KeyError) if isinstance(v, dict) else KeyError
        if v is not KeyError:
            out[f] = v
    return out


class _Reply:
    """The objects of one /completion reply (``i``: its index among prompts x n_cmpl)."""

    def __init__(self, state, job, i: int, req: S.CompletionRequest, body: dict):
        self.state, self.job, self.i, self.req, self.body = state, job, i, req, body

    def tokens(self, recs: list[Generation]) -> list[int]:
        return [g.token for g in recs if g.token >= 0]

    def partial(self, recs: list[Generation], text: str, timings: dict | None = None) -> dict:
        last = recs[-1]
        out = {"index": self.i, "content": text, "tokens": self.tokens(recs), "stop": False, "id_slot": self.job.slot,
               "tokens_predicted": last.generation_tokens, "tokens_evaluated": last.prompt_tokens}
        if timings is not None:
            out["timings"] = timings
        if self.req.logprobs:
            out["completion_probabilities"] = _probs(self.state, recs, self.job.post_probs)
        return out

    def final(self, gen: list[Generation], stream: bool) -> dict:
        last = gen[-1]
        text = "" if stream else "".join(g.text for g in gen)
        kind = "limit" if last.finish_reason == "length" else "word" if last.stop else "eos"
        res = {"index": self.i, "content": text,
               "tokens": self.tokens(gen) if self.body.get("return_tokens") and not stream else [],
               "id_slot": self.job.slot, "stop": True, "model": self.state.answered_by(self.req.model),
               "tokens_predicted": last.generation_tokens, "tokens_evaluated": last.prompt_tokens,
               "generation_settings": settings_of(self.state, self.job.sampling, stream, self.req.logprobs or 0,
                                                  self.req.lora, self.req.samplers, self.job.post_probs),
               "prompt": b"".join(self.state.special_bytes[t] for t in self.job.tokens).decode("utf-8", "replace"),
               "has_new_line": "\n" in "".join(g.text for g in gen), "truncated": False, "stop_type": kind,
               "stopping_word": last.stop or "", "tokens_cached": last.prompt_tokens + last.generation_tokens - 1,
               "timings": _timings(last)}
        if self.req.logprobs and not stream:
            res["completion_probabilities"] = _probs(self.state, gen, self.job.post_probs)
        return _fields(res, self.body["response_fields"]) if self.body.get("response_fields") else res


async def completion(runner, body: dict, request: Request):
    """Answer a /completion request: one reply per prompt x n_cmpl, an object for one, an array for several."""
    st = runner.state
    req, prompts = await run_in_threadpool(completion_request, st, body)
    runner._check_room(len(prompts) * req.n)
    loop = asyncio.get_running_loop()

    def prepare():
        sampling = request_sampling(req, req.max_tokens, None, st.default_draft)
        # eos_entry: a sampled end-of-text token is a generated token (in tokens, the counts and a stream event),
        # as llama-server counts it
        return [runner._job(loop, toks, s, logprobs=req.logprobs, eos_entry=True,
                            adapters=st.adapters_for(req.model, req.lora),
                            post_probs=bool(body.get("post_sampling_probs")))
                for toks in prompts for s in choice_samplings(req, sampling)]

    jobs = await run_in_threadpool(prepare)
    runner._submit(jobs)
    replies = [_Reply(st, job, i, req, body) for i, job in enumerate(jobs)]
    if req.stream:
        return StreamingResponse(_stream(runner, jobs, replies, request, bool(body.get("timings_per_token")),
                                         runner.ping_interval(req)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await runner._gather(jobs, request)
    if results is None:
        return JSONResponse({}, status_code=499)
    out = [r.final(gen, stream=False) for r, (_, gen) in zip(replies, results)]
    lasts = [gen[-1] for _, gen in results if gen]  # counted here: response_fields may leave them out of the reply
    note(request, tokens=(sum(g.prompt_tokens for g in lasts), sum(g.generation_tokens for g in lasts)))
    return out[0] if len(out) == 1 else out


async def _stream(runner, jobs, replies: list[_Reply], request: Request, per_token: bool, ping: float | None):
    """llama-server's native stream: an event per token (its text, "" while it may start a stop string), then each
    reply's final fields; no [DONE]. ``ping``: seconds of silence before an SSE ping (runner.ping_interval)."""
    gens: list[list[Generation]] = [[] for _ in jobs]
    try:
        async for i, g in runner.indexed(jobs, request, ping):
            if g is PING:
                yield SSE_PING
            if not isinstance(g, Generation):
                continue
            gens[i].append(g)
            if g.token >= 0 or g.text:  # every token, its text "" while held back (llama-server's)
                yield sse(replies[i].partial([g], g.text, _timings(g) if per_token else None))
            if g.finish_reason:
                yield sse(replies[i].final(gens[i], stream=True))
    except Exception as e:  # noqa: BLE001 — headers are sent: the error travels as an event
        payload = error_payload(e)[1]
        note(request, error=payload["error"]["message"])
        yield sse(payload)


def _embedding_request(body: dict) -> S.EmbeddingRequest:
    """/embedding(s)'s body as /v1/embeddings': ``content`` (llama-server's) or ``input``, text or ids."""
    content = body.get("content", body.get("input"))
    if content is None:
        raise InvalidArgument("content is required: the text (or texts, or token ids) to embed")
    norm = body.get("embd_normalize", 2)
    if norm != 2:
        raise InvalidArgument(f"embd_normalize={norm!r}: this server returns unit-length (Euclidean) vectors only; "
                              f"leave it unset or 2")
    try:
        return S.EmbeddingRequest(input=content)
    except ValidationError:
        raise InvalidArgument("content must be a string, a list of strings, token ids or lists of token ids") from None


def add_routes(app, runner, embeddings) -> None:
    """llama-server's routes on ``app``: generation over ``runner``, embeddings over ``embeddings`` (the
    /v1/embeddings handler)."""
    state = runner.state

    for path in ("/completion", "/completions"):
        @app.post(path)
        async def native_completion(request: Request, body: Annotated[dict[str, Any], Body()]):
            return await completion(runner, body, request)

    @app.exception_handler(NoInfill)
    async def _no_infill(request: Request, exc: NoInfill):
        return error_response(501, str(exc), "not_supported_error", None, "not_supported")

    @app.post("/infill")
    async def native_infill(request: Request, body: Annotated[dict[str, Any], Body()]):
        tokens = await run_in_threadpool(infill_prompt, state, body)
        return await completion(runner, {**body, "prompt": tokens}, request)

    for path in ("/embedding", "/embeddings"):
        @app.post(path)
        async def native_embedding(request: Request, body: Annotated[dict[str, Any], Body()]):
            out = await embeddings(_embedding_request(body), request)
            if not isinstance(out, R.EmbeddingResponse):
                return out
            return [{"index": d.index, "embedding": [d.embedding]} for d in out.data]

    @app.post("/apply-template")
    async def apply_template(body: Annotated[dict[str, Any], Body()]):
        req = chat_request({**body, "stream": False}, {})
        plan, messages, tools = runner.chat_prompt(req)
        toks = await run_in_threadpool(state.chat_tokens, messages, tools, plan.system_note)
        return {"prompt": b"".join(state.special_bytes[t] for t in toks).decode("utf-8", "replace")}

    @app.get("/props")
    async def props():
        from ..engine.records import Sampling

        eng = state.engine
        params = {k: v for k, v in settings_of(state, Sampling(), False, 0, None).items()  # llama-server's short form
                  if k not in ("stop", "logit_bias", "grammar", "dry_sequence_breakers")}
        params.update(max_tokens=-1, n_predict=-1)
        return {"default_generation_settings": {"params": params, "n_ctx": state.settings.ctx},
                "total_slots": state.settings.parallel, "model_alias": state.model_id, "model_path": str(state.path),
                "modalities": {"vision": False, "video": False, "audio": False},
                "endpoint_slots": state.settings.slots, "endpoint_props": False, "endpoint_metrics": True,
                "chat_template": state.template or "", "chat_template_caps": {},
                "bos_token": _piece(state, eng.bos_token),
                "eos_token": _piece(state, eng.ll.llama_vocab_eos(eng.vocab)),
                "build_info": f"ondevice {_version()}", "is_sleeping": False}

    @app.get("/lora-adapters")
    async def lora_adapters():
        ads = state.engine.adapters
        return [{"id": i, "path": str(ads.paths[n]), "scale": state.lora_scale[n], "name": n}
                for i, n in enumerate(state.adapter_names)]

    @app.post("/lora-adapters")
    async def set_lora_adapters(body: Annotated[list[dict[str, Any]], Body()]):
        try:
            entries = [S.LoraScale.model_validate(e) for e in body]
        except ValidationError:
            raise InvalidArgument("each entry must be {\"id\": ADAPTER_ID, \"scale\": NUMBER from -10 to 10}") from None
        state.adapters_for(None, entries)  # ids checked before anything changes
        # a --lora adapter not listed is off, as llama-server sets it; an --adapter one (llama-server has none: a
        # client of its API lists only what it set) keeps its scale for the requests that name it
        new = dict.fromkeys(state.default_adapters, 0.0)
        new.update({state.adapter_names[e.id]: e.scale for e in entries})
        state.lora_scale.update(new)
        return {"success": True}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ondevice")
    except PackageNotFoundError:
        return "dev"


# http.ErrorShape's settings for llama-server's routes: its {"error": {"code": 400, "message": ..., "type": ...}}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          501: "not_supported_error", 503: "unavailable_error"}  # llama-server's error types by status
ERRORS = {"applies": lambda path: path in PATHS or slots.applies(path),
          "body": lambda status, message: {"error": {"code": status, "message": message,
                                                     "type": _TYPES.get(status, "server_error")}}}
