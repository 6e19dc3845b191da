"""ASGI middleware for `vllm serve`: refuse JSON booleans as plugin arguments, and beam search
with a plugin.

vLLM's OpenAI-compatible schema types ``vllm_xargs`` as ``dict[str, str | int | float | list]``
(``vllm/entrypoints/openai/completion/protocol.py``, likewise chat completions, responses and
Anthropic messages). Pydantic's union validation turns JSON ``true`` / ``false`` into ``1`` /
``0`` while parsing the request body, so the processor's ``validate_params``, which sees only
the resulting ``SamplingParams``, cannot tell ``"plugin_weight": true`` from ``1``: ``true``
would be served as weight 1 and ``false`` would silently switch the plugin off. Only the raw
body still holds the boolean; this middleware reads it before vLLM parses it and answers HTTP
400 in vLLM's error format. `vllm-plugin serve` (``serving.serve_command``) installs it; with
plain `vllm serve`, add ``--middleware vllm_plugin.middleware.PluginArgsMiddleware``.

It also refuses a request that asks for ``use_beam_search`` and names plugin arguments: vLLM's
server beam search (``vllm/entrypoints/generate/beam_search/online.py``) builds its per-step
requests without ``vllm_xargs``, so the plugin would be dropped and the base alone would choose
the beams. Beam search with a plugin runs through ``vllm_plugin.beam.plugin_beam_search``.
"""
from __future__ import annotations

import json

from .processor import ARG_PLUGIN

# Bodies larger than this are passed through unread (no plugin request is anywhere near it).
MAX_BODY_BYTES = 64 << 20


def boolean_plugin_args(body: object) -> list[str]:
    """Names of plugin arguments (``vllm_xargs`` keys starting with ``plugin``) whose JSON value
    is a boolean, or a list holding one, in a parsed request body; empty if none."""
    if not isinstance(body, dict):
        return []
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return []
    return [k for k, v in xargs.items() if isinstance(k, str) and k.startswith(ARG_PLUGIN)
            and (isinstance(v, bool) or isinstance(v, list) and any(isinstance(x, bool) for x in v))]


# Pydantic's lax bool parsing (vLLM's request models): what a JSON value of use_beam_search means true.
_TRUE_STRINGS = {"1", "true", "t", "yes", "y", "on"}
BEAM_SEARCH_HELPER = "vllm_plugin.beam.plugin_beam_search"


def beam_search_plugin_args(body: object) -> list[str]:
    """Names of plugin arguments in ``vllm_xargs`` of a parsed request body that also asks for
    ``use_beam_search`` (true, 1 or a true-like string, as vLLM's schema reads it); empty if none."""
    if not isinstance(body, dict) or not isinstance(body.get("vllm_xargs"), dict):
        return []
    flag = body.get("use_beam_search")
    if not (flag is True or (type(flag) in (int, float) and flag == 1)
            or (isinstance(flag, str) and flag.strip().lower() in _TRUE_STRINGS)):
        return []
    return [k for k in body["vllm_xargs"] if isinstance(k, str) and k.startswith(ARG_PLUGIN)]


def bad_request(message: str, param: str) -> dict:
    """An HTTP 400 body in vLLM's ``ErrorResponse`` shape."""
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def beam_search_refusal(names: list[str]) -> dict:
    """The HTTP 400 body for plugin arguments in a beam-search request."""
    listed = ", ".join(f"'{n}'" for n in names)
    return bad_request(f"vllm_xargs {listed} with use_beam_search: vLLM's server beam search builds its requests "
                       f"without vllm_xargs, so the beams would be chosen by the base alone. Beam search with a "
                       f"plugin is available through the Python helper {BEAM_SEARCH_HELPER} (on an engine with "
                       f"logprobs_mode='processed_logprobs'); over HTTP, drop use_beam_search or the plugin",
                       "use_beam_search")


def refusal(names: list[str]) -> dict:
    """The HTTP 400 body for boolean plugin arguments."""
    listed = ", ".join(f"'{n}'" for n in names)
    return bad_request(f"vllm_xargs {listed}: a JSON boolean (true/false) is not a plugin argument value; "
                       f"vLLM's request schema would turn it into 1/0. Give '{ARG_PLUGIN}' a plugin name, "
                       f"'plugin_weight' a number (e.g. 1.0), 'plugin_base_top_k' an integer and "
                       f"'plugin_mode' a mode name", f"vllm_xargs.{names[0]}")


class PluginArgsMiddleware:
    """Pure ASGI middleware (``vllm serve --middleware vllm_plugin.middleware.PluginArgsMiddleware``).

    For a POST whose body mentions ``vllm_xargs``, the body is read whole (as FastAPI would),
    checked, and replayed unchanged to the app; everything else passes straight through.
    Responses, streaming included, are never touched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        message = None
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnect before the body was complete
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if message is not None and message["type"] == "http.request" and size <= MAX_BODY_BYTES \
                and b"vllm_xargs" in body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                parsed = None  # vLLM answers malformed JSON itself
            names = boolean_plugin_args(parsed)
            beam_names = beam_search_plugin_args(parsed)
            if names or beam_names:
                payload = json.dumps(refusal(names) if names else beam_search_refusal(beam_names)).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        if message is not None and message["type"] != "http.request":
            pending = [message]

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)
