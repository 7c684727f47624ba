"""Building the :class:`~kvrouter.policies.base.RequestView` of a request body.

With load-only policies (``request_num``, ``round_robin``, …) and no local tokenizer, a decision
needs only the token estimate, 2 × the code points of the rendered prompt. For the common shapes
(string contents, string roles, a string completion prompt) :func:`fast_view` computes that
length without building the rendered string; the prompt itself is rendered only if something
reads ``view.prompt``.

``view.model`` is the body's ``model``. Block hashes depend on it: the same prompt for two
models fills two different KV caches (an instance may serve several, e.g. LoRA adapters), so
with a model every block hash is XOR-ed with ``H64(model)`` (the alias resolved first): the
chains of two models never meet in the prefix index.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kvrouter.policies.base import RequestView
from kvrouter.prefix.hashing import HashList, block_hashes, h64, text_block_hashes
from kvrouter.prefix.render import canonical_json, extract_session_id, render_prompt
from kvrouter.prefix.tokenizer import Tokenizer

__all__ = ["LazyPromptView", "build_request_view", "build_request_view_now", "fast_view"]


def build_request_view_now(
    body: dict,
    endpoint: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    need_prefix: bool,
    tokenize_for_estimate: bool = True,
    aliases: Mapping[str, str] | None = None,
) -> RequestView | None:
    """:func:`build_request_view` when it needs no tokenizer call, else ``None``."""
    view = _view_now(render_prompt(body, endpoint), extract_session_id(body), tokenizer,
                     block_size, need_prefix, tokenize_for_estimate)
    return None if view is None else _for_model(view, body, aliases)


async def build_request_view(
    body: dict,
    endpoint: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    need_prefix: bool,
    tokenize_for_estimate: bool = True,
    aliases: Mapping[str, str] | None = None,
) -> RequestView:
    """Render, tokenize and hash a parsed request body.

    * ``need_prefix``: some policy in use is cache-aware → compute the block hashes (from model
      tokens if a tokenizer works, else from code points);
    * ``tokenize_for_estimate``: with a real tokenizer configured, tokenize even when no policy
      needs the prefix, so the token estimate is a real count
      (docs/fastdeploy.md#in-flight-accounting). Set it ``False`` to skip the tokenizer (e.g. a
      remote one) when only load counts matter.

    Token-id prompts are used as tokens without calling the tokenizer. ``aliases`` (alias →
    model) resolve the model the block hashes are keyed by.
    """
    prompt = render_prompt(body, endpoint)
    session_id = extract_session_id(body)
    view = _view_now(prompt, session_id, tokenizer, block_size, need_prefix,
                     tokenize_for_estimate)
    if view is None:
        seq, real = await tokenizer.tokens_for(prompt)
        if not real:      # the tokenizer failed and fell back to code points
            assert isinstance(prompt, str)    # token-id prompts never reach the tokenizer
            hashes = text_block_hashes(prompt, block_size) if need_prefix else []
            view = RequestView(prompt, None, 2 * len(prompt), hashes, session_id)
        else:
            hashes = block_hashes(seq, block_size) if need_prefix else []
            view = RequestView(prompt, seq, len(seq), hashes, session_id)
    return _for_model(view, body, aliases)


def request_model(body: dict) -> str | None:
    """The body's ``model`` if it is a non-empty string (else the instance judges it)."""
    model = body.get("model")
    return model if type(model) is str and model else None


def _for_model(view: RequestView, body: dict, aliases: Mapping[str, str] | None) -> RequestView:
    """Set ``view.model`` and key the block hashes by the (resolved) model."""
    model = view.model = request_model(body)
    hashes = view.hashes
    if model is not None and hashes:
        if aliases:
            model = aliases.get(model, model)
        chain = hashes.array if isinstance(hashes, HashList) else np.array(hashes, np.uint64)
        arr = chain ^ np.uint64(h64(model.encode("utf-8", "surrogatepass")))
        view.hashes = HashList(arr.tolist(), arr)
    return view


def _view_now(prompt: str | list[int], session_id: str | None, tokenizer: Tokenizer,
              block_size: int, need_prefix: bool,
              tokenize_for_estimate: bool) -> RequestView | None:
    if not isinstance(prompt, str):
        hashes = block_hashes(prompt, block_size) if need_prefix else []
        return RequestView(prompt, prompt, len(prompt), hashes, session_id)
    if need_prefix and not tokenizer.real:
        # code points as tokens: hashed straight from the string, no list of code points
        return RequestView(prompt, None, 2 * len(prompt),
                           text_block_hashes(prompt, block_size), session_id)
    if need_prefix or (tokenize_for_estimate and tokenizer.real):
        return None       # the tokenizer must be asked
    return RequestView(prompt, None, 2 * len(prompt), [], session_id)


class LazyPromptView(RequestView):
    """A :class:`RequestView` whose ``prompt`` is rendered on first access."""

    __slots__ = ("_body", "_endpoint", "_rendered")

    def __init__(self, body: dict, endpoint: str, estimate: int, session_id: str | None) -> None:
        RequestView.__init__(self, "", None, estimate, [], session_id)
        self._body = body
        self._endpoint = endpoint
        self._rendered: str | list[int] | None = None

    @property
    def prompt(self) -> str | list[int]:
        if self._rendered is None:
            self._rendered = render_prompt(self._body, self._endpoint)
        return self._rendered

    @prompt.setter
    def prompt(self, value: str | list[int]) -> None:
        self._rendered = value


def rendered_length(body: dict, endpoint: str) -> int | None:
    """``len(render_prompt(body, endpoint))`` for common shapes, else ``None``."""
    if body.get("prompt_token_ids") is not None:
        return None
    if "chat" not in endpoint:
        prompt = body.get("prompt")
        return len(prompt) if type(prompt) is str else None
    n = 0
    tools = body.get("tools")
    if tools is not None:
        n += 7 + len(canonical_json(tools))        # "tools:" + JSON + "\n"
    messages = body.get("messages")
    if type(messages) is list:
        for msg in messages:
            if type(msg) is not dict:
                return None
            role = msg.get("role")
            content = msg.get("content")
            if (type(role) is not str or (content is not None and type(content) is not str)
                    or msg.get("tool_calls") is not None):
                return None
            n += len(role) + 2 + (len(content) if content else 0)   # role ":" content "\n"
    return n


def fast_view(body: dict, endpoint: str) -> RequestView | None:
    """The view without rendering, or ``None`` when the body's shape needs the full path."""
    n = rendered_length(body, endpoint)
    if n is None:
        return None
    view = LazyPromptView(body, endpoint, 2 * n, extract_session_id(body))
    view.model = request_model(body)
    return view
