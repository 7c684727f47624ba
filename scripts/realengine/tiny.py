"""What the two tiny test models share, so that they stay one model: ``tiny_gguf.py`` (for
llama.cpp) and ``tiny_hf.py`` (for vLLM) use the same ChatML chat template and the same shape
options and defaults (the caches name the model after them: ``tiny-llama-spm-256x4``).
Standard library only: each writer runs in its own interpreter (``tiny_hf.py`` in the vLLM
venv) and finds this file next to itself."""

from __future__ import annotations

import argparse

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parser(doc: str | None, out_help: str) -> argparse.ArgumentParser:
    """A writer's command line: ``--vocab``, ``--out`` (``out_help``), the shape and the seed."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--vocab", required=True, help="a vocab-only GGUF")
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--ctx", type=int, default=4096,
                    help="the model's trained context length (max_position_embeddings)")
    ap.add_argument("--seed", type=int, default=0)
    return ap
