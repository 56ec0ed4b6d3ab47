"""Build a tiny Llama-style model (GQA) or DeepSeek-V2-style model (MLA),
random weights, fixed seed, and a tokenizer trained on the spot, so tests and the demo need no download."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

_WORDS = (
    "the a prefill decode block cache tensor ascend npu vllm server proxy request "
    "token layer head model engine stream batch queue transfer memory port group "
    "rank worker scheduler connector lease pull push fast slow correct exact "
    "alpha beta gamma delta one two three four five six seven eight nine ten"
).split()


def _corpus(n_lines: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(4, 16))) for _ in range(n_lines)]


def _write_tokenizer(out: Path, vocab_size: int, seed: int):
    """Train a small byte-level BPE tokenizer on a fixed corpus and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(2000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # A minimal chat template so /v1/chat/completions works.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out)
    return fast


def _build(out_dir: str | os.PathLike, seed: int, vocab_size: int, make_model) -> Path:
    """Tokenizer, then ``make_model(tokenizer)`` with a seeded RNG, saved to
    ``out_dir`` once (a marker makes later calls a no-op)."""
    out = Path(out_dir)
    marker = out / ".complete"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch

    fast = _write_tokenizer(out, vocab_size, seed)
    torch.manual_seed(seed)
    make_model(fast).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    marker.write_text("ok")
    return out


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 1234,
    num_layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 512,
    max_positions: int = 4096,
) -> Path:
    """Write a HF-format Llama model + tokenizer to ``out_dir`` (idempotent)."""

    def make(fast):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=len(fast),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=max_positions,
            # Wide logits make greedy argmax robust to float reordering between
            # a one-pass prefill and prefill-then-transfer.
            initializer_range=0.5,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
        return LlamaForCausalLM(cfg)

    return _build(out_dir, seed, vocab_size, make)


# vLLM's CPU MLA backend (cpu_mla.py) only runs a latent cache of 576 =
# kv_lora_rank 512 + qk_rope_head_dim 64, with block size 16.
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64
MLA_BLOCK_SIZE = 16


def build_tiny_mla_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 1234,
    num_layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    vocab_size: int = 512,
    max_positions: int = 4096,
) -> Path:
    """Write a HF-format DeepSeek-V2-style (MLA, dense MLP) model + tokenizer."""

    def make(fast):
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        cfg = DeepseekV2Config(
            vocab_size=len(fast),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            kv_lora_rank=MLA_KV_LORA_RANK,
            q_lora_rank=None,
            qk_rope_head_dim=MLA_ROPE_DIM,
            qk_nope_head_dim=32,
            v_head_dim=32,
            head_dim=MLA_ROPE_DIM,
            # Every layer is a dense MLP (the expert fields are then unused).
            n_routed_experts=2,
            n_shared_experts=1,
            num_experts_per_tok=1,
            moe_intermediate_size=hidden,
            first_k_dense_replace=num_layers,
            max_position_embeddings=max_positions,
            # YaRN scaling as DeepSeek-V2 ships it. It also keeps vLLM-CPU off its
            # C++ rotary kernel, which mis-rotates MLA's strided k_pe/q_pe views
            # (docs/known-issues.md).
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": max_positions // 4,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
            },
            initializer_range=0.5,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
        return DeepseekV2ForCausalLM(cfg)

    return _build(out_dir, seed, vocab_size, make)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--mla", action="store_true", help="DeepSeek-V2-style MLA model")
    args = ap.parse_args()
    (build_tiny_mla_model if args.mla else build_tiny_model)(args.out_dir, seed=args.seed)


if __name__ == "__main__":
    main()
