"""A GGUF file of the tiny Qwen2 model (float32 tensors), written with the ``gguf`` package, so the
GGUF import runs for real in seconds. Tensor and metadata names follow llama.cpp's ``qwen2`` layout."""

from __future__ import annotations

import json
from pathlib import Path

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = name.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{index}.{_LAYER[rest]}"


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the model of ``model_dir`` (built by :func:`qwenrun.weights.tiny.build_tiny_model`) as GGUF."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    template = (model_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    chat_template = json.loads(template).get("chat_template") or (model_dir / "chat_template.jinja").read_text(
        encoding="utf-8"
    )
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special = {token["content"]: token for token in tokenizer["added_tokens"]}
    for token in tokenizer["added_tokens"]:
        vocab[token["content"]] = token["id"]
    tokens = [""] * config["vocab_size"]
    for text, index in vocab.items():
        tokens[index] = text
    types = [
        (gguf.TokenType.CONTROL if special[text]["special"] else gguf.TokenType.USER_DEFINED)
        if text in special
        else gguf.TokenType.NORMAL
        for text in tokens
    ]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)

    for name, array in load_file(str(model_dir / "model.safetensors")).items():
        writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
