#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF with seeded random weights and a real tokenizer.

The tokenizer comes from a vocab-only GGUF (llama.cpp ships them for its tokenizer tests, e.g.
``models/ggml-vocab-llama-spm.gguf``, the Llama-2 SentencePiece vocabulary): all its
``tokenizer.*`` keys are copied, and a ChatML chat template is set so that chat requests render.
The weights are random, so the text a server generates is noise; prompt processing, the prefix
cache, tokenization and usage accounting are real. Independent of kvrouter; needs ``gguf`` and
``numpy``.

usage: tiny_gguf.py --vocab VOCAB.gguf --out MODEL.gguf [--dim 256 --layers 4 --heads 4 --ff 768]
"""

from __future__ import annotations

import sys
import time

import gguf
import numpy as np
from tiny import CHAT_TEMPLATE, parser


def tokenizer_fields(path: str) -> list[tuple[str, object, gguf.GGUFValueType, object]]:
    """``(key, value, type, element type)`` of every ``tokenizer.*`` key of a GGUF file."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype = gguf.GGUFValueType(fld.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(fld.types[1])
            if sub == gguf.GGUFValueType.STRING:
                value: object = [bytes(fld.parts[i]) for i in fld.data]
            else:
                value = [fld.parts[i].item() for i in fld.data]
            out.append((key, value, vtype, sub))
        elif vtype == gguf.GGUFValueType.STRING:
            out.append((key, bytes(fld.parts[fld.data[0]]).decode(), vtype, None))
        else:
            out.append((key, fld.parts[fld.data[0]].item(), vtype, None))
    return out


def main() -> int:
    args = parser(__doc__, "the GGUF file to write").parse_args()
    started = time.monotonic()

    fields = tokenizer_fields(args.vocab)
    tokens = next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)  # type: ignore[arg-type]
    dim, ff = args.dim, args.ff
    rng = np.random.default_rng(args.seed)

    def weights(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is GGUF shape [cols, rows]: rows = output features
        return rng.normal(0.0, 0.02, size=(rows, cols)).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name("kvrouter-test-tiny-llama")
    w.add_context_length(args.ctx)
    w.add_embedding_length(dim)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.heads)
    w.add_rope_dimension_count(dim // args.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", weights(n_vocab, dim))
    for i in range(args.layers):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", ones(dim))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{blk}.{name}.weight", weights(dim, dim))
        w.add_tensor(f"{blk}.ffn_norm.weight", ones(dim))
        w.add_tensor(f"{blk}.ffn_gate.weight", weights(ff, dim))
        w.add_tensor(f"{blk}.ffn_up.weight", weights(ff, dim))
        w.add_tensor(f"{blk}.ffn_down.weight", weights(dim, ff))
    w.add_tensor("output_norm.weight", ones(dim))
    w.add_tensor("output.weight", weights(n_vocab, dim))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.out}: vocab {n_vocab}, dim {dim}, {args.layers} layers, ff {ff}, "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
