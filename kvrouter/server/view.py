"""The scheduling view of a request when no policy needs its prompt (contract §6.1).

With load-only policies (``request_num``, ``round_robin``, …) and no local tokenizer, a decision
needs only the token estimate, 2 × the code points of the rendered prompt. For the common shapes
(string contents, string roles, a string completion prompt) that length is computed without
building the rendered string; the prompt itself is rendered only if something reads
``view.prompt``. Other shapes fall back to :meth:`Router.request_view`.
"""

from __future__ import annotations

from kvrouter.policies.base import RequestView
from kvrouter.prefix.render import canonical_json, extract_session_id, render_prompt
from kvrouter.router import Router


class LazyPromptView(RequestView):
    """A :class:`RequestView` whose ``prompt`` is rendered on first access."""

    __slots__ = ("_body", "_endpoint", "_rendered")

    def __init__(self, body: dict, endpoint: str, estimate: int, session_id: str | None) -> None:
        RequestView.__init__(self, "", None, estimate, [], session_id)
        self._body = body
        self._endpoint = endpoint
        self._rendered: str | list[int] | None = None

    @property
    def prompt(self) -> str | list[int]:  # type: ignore[override]
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


def load_only(router: Router, roles: tuple) -> bool:
    """True when the views of ``roles`` need no prompt: no policy uses the prefix and no local
    tokenizer would count tokens (mirrors :meth:`Router.request_view`)."""
    tok = router.tokenizer
    return (not any(router.policies[r].needs_prefix for r in roles)
            and not (tok.kind == "local" and tok.real))


def fast_view(body: dict, endpoint: str) -> RequestView | None:
    """The view without rendering, or ``None`` when the body's shape needs the full path."""
    n = rendered_length(body, endpoint)
    if n is None:
        return None
    return LazyPromptView(body, endpoint, 2 * n, extract_session_id(body))
