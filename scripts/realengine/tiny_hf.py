#!/usr/bin/env python3
"""Write a tiny random-weight ``LlamaForCausalLM`` in Hugging Face format (safetensors) with a
real tokenizer, for vLLM (which does not serve GGUF llama models on CPU the way the tests need).

The tokenizer is converted from a vocab-only GGUF (llama.cpp's
``models/ggml-vocab-llama-spm.gguf``, the Llama-2 SentencePiece vocabulary, the same one
``tiny_gguf.py`` uses), so the llama.cpp and vLLM test models tokenize alike. A ChatML chat
template is set so that chat requests render. The weights are random: generated text is noise,
while prompt processing, the prefix cache and usage accounting are real. Runs in the vLLM venv
(needs ``torch``, ``transformers`` and ``gguf``); independent of kvrouter.

usage: tiny_hf.py --vocab VOCAB.gguf --out DIR [--dim 256 --layers 4 --heads 4 --ff 768]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--vocab", required=True, help="a vocab-only GGUF")
    ap.add_argument("--out", required=True, help="the model directory to write")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--ctx", type=int, default=4096, help="max_position_embeddings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.monotonic()

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.vocab)),
                                        gguf_file=os.path.basename(args.vocab))
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.dim, intermediate_size=args.ff,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.ctx,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(args.seed)
    LlamaForCausalLM(cfg).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(f"{args.out}: vocab {len(tok)}, dim {args.dim}, {args.layers} layers, ff {args.ff}, "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
