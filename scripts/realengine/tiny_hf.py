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

import os
import sys
import time

import torch
from tiny import CHAT_TEMPLATE, parser
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main() -> int:
    args = parser(__doc__, "the model directory to write").parse_args()
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
