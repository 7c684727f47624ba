"""Building the :class:`~kvrouter.policies.base.RequestView` of a request body."""

from __future__ import annotations

from kvrouter.policies.base import RequestView
from kvrouter.prefix.hashing import block_hashes, text_block_hashes
from kvrouter.prefix.render import extract_session_id, render_prompt
from kvrouter.prefix.tokenizer import Tokenizer

__all__ = ["build_request_view", "build_request_view_now"]


def build_request_view_now(
    body: dict,
    endpoint: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    need_prefix: bool,
    tokenize_for_estimate: bool = True,
) -> RequestView | None:
    """:func:`build_request_view` when it needs no tokenizer call, else ``None``."""
    return _view_now(render_prompt(body, endpoint), extract_session_id(body), tokenizer,
                     block_size, need_prefix, tokenize_for_estimate)


async def build_request_view(
    body: dict,
    endpoint: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    need_prefix: bool,
    tokenize_for_estimate: bool = True,
) -> RequestView:
    """Render, tokenize and hash a parsed request body.

    * ``need_prefix``: some policy in use is cache-aware → compute the block hashes (from model
      tokens if a tokenizer works, else from code points);
    * ``tokenize_for_estimate``: with a real tokenizer configured, tokenize even when no policy
      needs the prefix, so the token estimate is a real count (§6.1). Set it ``False`` to skip
      the tokenizer (e.g. a remote one) when only load counts matter.

    Token-id prompts are used as tokens without calling the tokenizer.
    """
    prompt = render_prompt(body, endpoint)
    session_id = extract_session_id(body)
    view = _view_now(prompt, session_id, tokenizer, block_size, need_prefix,
                     tokenize_for_estimate)
    if view is not None:
        return view
    seq, real = await tokenizer.tokens_for(prompt)
    if not real:      # the tokenizer failed and fell back to code points
        hashes = text_block_hashes(prompt, block_size) if need_prefix else []
        return RequestView(prompt, None, 2 * len(prompt), hashes, session_id)
    hashes = block_hashes(seq, block_size) if need_prefix else []
    return RequestView(prompt, seq, len(seq), hashes, session_id)


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
