"""A DCP checkpoint step → a Hugging Face folder that vanilla `transformers` loads: `LlamaForCausalLM`
(`Qwen3ForCausalLM` with QK-norm); a mixture of experts as `MixtralForCausalLM` or `Qwen3MoeForCausalLM`, with a gated
shared expert as `Qwen2MoeForCausalLM`, with sigmoid routing (and its balancing biases) as `Glm4MoeForCausalLM`
(`hf_family` refuses by name what no class holds).

Runs in one process whatever the training world size was, reading one tensor at a time from the DCP files
(DCP reassembles each from the shards of every rank), so memory stays near the largest tensor plus one
output shard. muP's forward multipliers are folded into the weights, so no custom code is needed:
- the input multiplier into the embedding table;
- the readout multiplier (α_out / m) into the final RMSNorm's gain, divided by the input multiplier when the
  head is tied to the (now scaled) embedding table — tying survives;
- the attention scale α_attn·√d_head0/d_head = α_attn/√d_head (heads keep their size) into `q_proj`:
  RoPE is linear in q, so scaling q's weights scales q·k exactly as the trainer does; with QK-norm into the query
  norm's gain instead (the norm would undo a scaled projection);
- the router's and the shared expert gate's logit multiplier (1/m) into their weights.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from trainer.core.config import AnvilConfig, ModelConfig
from trainer.core.errors import AnvilError
from trainer.core.files import staged_dir
from trainer.core.jobdir import is_complete
from trainer.train.model import checkpointed_buffers, param_plan

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm", "attention.q_norm": "self_attn.q_norm",
          "attention.k_norm": "self_attn.k_norm", "feed_forward.router": "mlp.gate"}
_EXPERTS = {"feed_forward.grouped.w1": "mlp.experts.gate_up_proj",
            "feed_forward.grouped.w3": "mlp.experts.gate_up_proj",
            "feed_forward.grouped.w2": "mlp.experts.down_proj"}
"""Grouped experts (transformers 5 stores them stacked too): gate and up projections concatenated, `[experts,
2 · hidden, dim]`, gate first; down `[experts, dim, hidden]`."""
_SHARED = {"qwen2_moe": {"feed_forward.shared.w1": "mlp.shared_expert.gate_proj",
                         "feed_forward.shared.w3": "mlp.shared_expert.up_proj",
                         "feed_forward.shared.w2": "mlp.shared_expert.down_proj",
                         "feed_forward.shared_gate": "mlp.shared_expert_gate"},
           "glm4_moe": {"feed_forward.shared.w1": "mlp.shared_experts.gate_proj",
                        "feed_forward.shared.w3": "mlp.shared_experts.up_proj",
                        "feed_forward.shared.w2": "mlp.shared_experts.down_proj",
                        "feed_forward.expert_bias": "mlp.gate.e_score_correction_bias"}}
"""The shared expert (and its gate, or the routing biases) in the families that have one."""
GLM_BIAS = "feed_forward.expert_bias"


class ExportError(AnvilError):
    """A checkpoint or output that cannot be exported; the message says which and why."""


def hf_name(name: str, model_type: str = "llama") -> str:
    """Our parameter (or buffer) name → the name in the transformers class of `model_type`."""
    if name in _TOP:
        return _TOP[name]
    _, layer, rest = name.split(".", 2)
    if rest in _EXPERTS:
        return f"model.layers.{layer}.{_EXPERTS[rest]}"
    shared = _SHARED.get(model_type, {})
    if rest in shared:  # the routing biases: a buffer, no leaf
        return f"model.layers.{layer}.{shared[rest]}"
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{shared.get(module) or _BLOCK[module]}.{leaf}"


_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def our_names(name: str, model_type: str = "llama") -> list[str]:
    """transformers' name → ours (the reverse of `hf_name`): two for the concatenated gate and up projections."""
    if name in _TOP_BACK:
        return [_TOP_BACK[name]]
    _, _, layer, rest = name.split(".", 3)
    grouped = [ours for ours, theirs in _EXPERTS.items() if theirs == rest]
    if grouped:
        return [f"layers.{layer}.{ours}" for ours in sorted(grouped)]
    shared = {theirs: ours for ours, theirs in _SHARED.get(model_type, {}).items()}
    if rest in shared:  # the routing biases: a buffer, no leaf
        return [f"layers.{layer}.{shared[rest]}"]
    module, leaf = rest.rsplit(".", 1)
    return [f"layers.{layer}.{shared.get(module) or _BLOCK_BACK[module]}.{leaf}"]


def hf_family(cfg: ModelConfig) -> dict:
    """The transformers class this model exports to, and the config fields only that class has; an ExportError
    where vanilla transformers has none."""
    family = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers,
             "layer_types": ["full_attention"] * cfg.n_layers}
    moe = cfg.moe
    if moe.experts and (moe.shared_experts or moe.score == "sigmoid" or moe.bias_update_rate):
        return _shared_or_biased_family(cfg)
    if cfg.qk_norm and moe.experts:  # Qwen3-MoE: QK-norm attention, every feed-forward a mixture
        family = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **qwen3,
                  "num_experts": moe.experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.normalize_top_k,
                  "moe_intermediate_size": cfg.expert_hidden, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "router_aux_loss_coef": moe.balance_coef, "output_router_logits": False}
    elif moe.experts:  # Mixtral: Llama attention, every feed-forward a mixture (renormalised top-k)
        if not moe.normalize_top_k:
            raise ExportError("model.moe.normalize_top_k is false without model.qk_norm: transformers' Mixtral always "
                              "renormalises the top-k weights, and its Qwen3-MoE (which need not) has QK-norm; "
                              "this model has no vanilla transformers class (nothing was written)")
        family = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None,
                  "num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k, "router_jitter_noise": 0.0,
                  "router_aux_loss_coef": moe.balance_coef, "output_router_logits": False}
    elif cfg.qk_norm:  # Qwen3: Llama's blocks with a per-head RMSNorm on queries and keys before RoPE
        family = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **qwen3}
    return family


def _shared_or_biased_family(cfg: ModelConfig) -> dict:
    """Mixtures with a shared expert, sigmoid scores or balancing biases: Qwen2-MoE (a gated shared expert, softmax
    routing, Llama attention) and GLM-4.5-MoE (DeepSeek-V3's routing: sigmoid scores, biases, ungated shared experts;
    Llama or QK-norm attention). DeepSeek-V3's own class has latent attention (MLA),
    which this model's is not."""
    moe = cfg.moe
    none = ("nothing was written; transformers' DeepseekV3ForCausalLM routes this way but its attention is latent "
            "(MLA), not this model's" if moe.score == "sigmoid" else "nothing was written")
    common = {"num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.normalize_top_k,
              "moe_intermediate_size": cfg.expert_hidden, "router_aux_loss_coef": moe.balance_coef,
              "output_router_logits": False}
    if moe.score == "softmax":
        if moe.bias_update_rate:
            raise ExportError("model.moe.bias_update_rate with model.moe.score=softmax: the transformers classes "
                              "with routing biases (Glm4Moe, DeepseekV3, Dots1) score with a sigmoid; set "
                              f"model.moe.score=sigmoid to export ({none})")
        if not moe.shared_expert_gate or cfg.qk_norm:
            raise ExportError(
                "model.moe.shared_experts with softmax routing exports as Qwen2MoeForCausalLM, whose shared expert "
                "is gated (model.moe.shared_expert_gate=true) and whose attention has no QK-norm (model.qk_norm="
                f"false); this model has {'QK-norm' if cfg.qk_norm else 'an ungated shared expert'} ({none})")
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
                "num_experts": moe.experts, "shared_expert_intermediate_size": cfg.shared_hidden,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": False, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": cfg.n_layers,
                "layer_types": ["full_attention"] * cfg.n_layers}
    if moe.shared_expert_gate or not moe.shared_experts:
        raise ExportError(
            "model.moe.score=sigmoid exports as Glm4MoeForCausalLM, which has at least one shared expert "
            "(model.moe.shared_experts), ungated (model.moe.shared_expert_gate=false); this model has "
            f"{'a gated shared expert' if moe.shared_expert_gate else 'none'} ({none})")
    if moe.experts < 2:
        raise ExportError(f"model.moe.experts: Glm4MoeForCausalLM routes over at least 2 experts ({none})")
    return {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", **common,
            "n_routed_experts": moe.experts, "n_shared_experts": moe.shared_experts,
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 0,
            "use_qk_norm": cfg.qk_norm, "partial_rotary_factor": 1.0, "num_mtp_layers": 0}


def hf_config(cfg: ModelConfig, max_positions: int, dtype: torch.dtype, bos_id: int | None, eos_id: int | None
              ) -> dict:
    moe = cfg.moe
    return {
        **hf_family(cfg),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.expert_hidden if moe.experts and not cfg.qk_norm else cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "max_position_embeddings": max_positions, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
        "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
    }


def checkpoint_keys(step_dir: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Model tensors in a DCP checkpoint: our name → (global shape, dtype), from the metadata alone."""
    try:
        metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    except (OSError, ValueError, EOFError) as exc:
        raise ExportError(f"{step_dir}: cannot read the checkpoint's metadata ({exc})") from None
    found = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(meta, "size"):
            found[key.removeprefix("model.")] = (meta.size, meta.properties.dtype)
    return found


def read_tensor(step_dir: Path, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """One full tensor, reassembled by DCP from however many ranks wrote it."""
    target = {"model": {name: torch.empty(shape, dtype=dtype)}}
    with warnings.catch_warnings():  # "torch.distributed is disabled …": one process reads it all, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(target, checkpoint_id=str(step_dir), no_dist=True)
    return target["model"][name]


def folded(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with muP's forward multipliers folded in (identity with muP off)."""
    if not cfg.mup.enabled:
        return tensor
    if name == "tok_embeddings.weight":
        return tensor * cfg.input_mult
    if name == "norm.weight":
        return tensor * (cfg.output_mult / cfg.input_mult if cfg.tie_embeddings else cfg.output_mult)
    if name.endswith("attention.q_norm.weight" if cfg.qk_norm else "attention.wq.weight"):
        return tensor * cfg.attn_mult  # the trainer's softmax scale over HF's 1/√d_head
    if name.endswith(("feed_forward.router.weight", "feed_forward.shared_gate.weight")):
        return tensor * cfg.router_mult
    return tensor


def hf_tensors(step_dir: Path, cfg: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    keys = checkpoint_keys(step_dir)
    expected = set(param_plan(cfg)) | set(checkpointed_buffers(cfg))
    model_type = hf_family(cfg)["model_type"]
    if set(keys) != expected:
        missing, extra = sorted(expected - set(keys))[:3], sorted(set(keys) - expected)[:3]
        raise ExportError(f"{step_dir} does not hold this job's model (missing {missing}, unexpected {extra})")
    def read(name: str) -> torch.Tensor:
        return folded(cfg, name, read_tensor(step_dir, name, *keys[name]).float())

    for name in sorted(keys, key=_position):
        if name.endswith("grouped.w3"):
            continue  # goes out with w1, as the up half of the stacked gate and up projections
        tensor = read(name)
        if name.endswith("grouped.w1"):
            tensor = torch.cat([tensor, read(name.removesuffix("w1") + "w3")], dim=1)
        if name.endswith("router.weight") and model_type == "glm4_moe" and not cfg.moe.bias_update_rate:
            bias = name.removesuffix("router.weight") + "expert_bias"  # the class has biases: none is zero
            yield hf_name(bias, model_type), torch.zeros(cfg.moe.experts)
        out_dtype = torch.float32 if name.endswith("expert_bias") else dtype  # fp32 in the class too
        yield hf_name(name, model_type), tensor.to(out_dtype).contiguous()


def _position(name: str) -> tuple[int, str]:
    """Embeddings first, then the blocks in order, then the final norm and head (as transformers lists them)."""
    if name.startswith("layers."):
        return int(name.split(".")[1]), name
    return (-1 if name.startswith("tok_embeddings") else 1 << 30), name


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> None:
    """Shards of at most `shard_bytes` (a tensor larger than that gets a shard of its own) and the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        if shards[-1]:
            name = f"part-{len(written) + 1:05d}.safetensors"
            save_file(shards[-1], str(out / name), metadata={"format": "pt"})
            written.append((name, list(shards[-1])))
            shards[-1], sizes[-1] = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + size > shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += size
        total += size
    flush()
    count = len(written)
    weight_map = {}
    for i, (old, names) in enumerate(written, 1):
        new = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out / old).rename(out / new)
        weight_map.update({n: new for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(tokenizer_json: Path, out: Path, bos: str | None, eos: str) -> None:
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
              "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in {"eos_token": eos, "bos_token": bos}.items() if v}, indent=2) + "\n")


def export(job_cfg: AnvilConfig, step_dir: Path, out: Path, dtype: torch.dtype = torch.float32,
           shard_bytes: int = 2 * 2**30, card: str | None = None) -> Path:
    """Write the folder (staged beside `out`, then renamed into place: a folder at `out` is always complete)."""
    if out.exists():
        raise ExportError(f"{out} already exists: give a new output folder (nothing was written)")
    if not is_complete(step_dir):
        raise ExportError(f"{step_dir} is not a complete checkpoint (no completion marker): it was interrupted")
    hf_family(job_cfg.model)  # refuses a model vanilla transformers has no class for, before any work
    with staged_dir(out) as tmp:
        cfg = job_cfg.model
        write_safetensors(hf_tensors(step_dir, cfg, dtype), tmp, shard_bytes)
        bos_id = eos_id = None
        data = job_cfg.data
        if data.tokenizer is not None and Path(data.tokenizer).is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(data.tokenizer)
            eos_id = tok.token_to_id(data.eos_token)
            bos_id = tok.token_to_id(data.bos_token) if data.bos_token else None
            write_tokenizer(Path(data.tokenizer), tmp, data.bos_token, data.eos_token)
        max_positions = max(data.seq_len, 2 ** math.ceil(math.log2(data.seq_len)))
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, max_positions, dtype, bos_id, eos_id),
                                                    indent=2) + "\n")
        generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.8,
                      "top_p": 0.95, "max_new_tokens": 128}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
    return out

