"""Prefix machinery for cache-aware routing: rendering, tokens, block hashes, the index.

``build_request_view`` lives in :mod:`kvrouter.prefix.view` (it depends on the policies).
"""

from kvrouter.prefix.hashing import HashList, block_hashes, text_block_hashes
from kvrouter.prefix.index import PrefixIndex
from kvrouter.prefix.render import extract_session_id, render_prompt
from kvrouter.prefix.tokenizer import (
    CodePointTokenizer,
    LocalTokenizer,
    RemoteTokenizer,
    Tokenizer,
    TokenizerError,
    make_tokenizer,
)

__all__ = [
    "CodePointTokenizer",
    "HashList",
    "LocalTokenizer",
    "PrefixIndex",
    "RemoteTokenizer",
    "Tokenizer",
    "TokenizerError",
    "block_hashes",
    "extract_session_id",
    "make_tokenizer",
    "render_prompt",
    "text_block_hashes",
]
