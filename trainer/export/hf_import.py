"""A local Hugging Face folder of a class `hf.py` exports to (Llama, Qwen3, Mixtral, Qwen3-MoE, Qwen2-MoE,
GLM-4.5-MoE) → a DCP checkpoint a job can start from (`checkpoint.init_from`).

The reverse of `hf.py`: names mapped back, muP's multipliers of the *target* model config divided out
again (with muP off nothing changes, so HF → DCP → HF is bit-identical). The result is a `step-0` directory
with its `COMPLETE` marker, holding the model only: `init_from` takes weights, never an optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from safetensors import safe_open

from trainer.core.config import ModelConfig
from trainer.core.files import staged_dir
from trainer.core.jobdir import mark_complete, step_dir
from trainer.export.hf import GLM_BIAS, ExportError, folded, our_names
from trainer.train.model import checkpointed_buffers, param_plan

KINDS = ("llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe")


def model_config(hf_dir: Path, **overrides) -> ModelConfig:
    """Our model config for an HF `config.json` of one of `KINDS` (muP and other extras from `overrides`). A GLM-4.5-MoE
    keeps balancing its experts with biases as DeepSeek-V3 did (`moe.bias_update_rate` 0.001 unless overridden)."""
    path = hf_dir / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read a Hugging Face config ({exc})") from None
    kind = hf.get("model_type")
    if kind not in KINDS:
        raise ExportError(f"{path}: model_type is {kind!r}; Llama, Qwen3, Mixtral, Qwen3-MoE, Qwen2-MoE and "
                          "GLM-4.5-MoE models can be imported")
    if (kind in ("qwen3_moe", "qwen2_moe") and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1)
            or kind == "glm4_moe" and hf.get("first_k_dense_replace", 1)):
        raise ExportError(f"{path}: this {kind} model has dense layers between its mixtures; this trainer puts a "
                          "mixture in every layer")
    if kind == "glm4_moe" and (hf.get("n_group", 1) != 1 or hf.get("routed_scaling_factor", 1.0) != 1.0
                               or hf.get("partial_rotary_factor", 0.5) != 1.0):
        raise ExportError(f"{path}: group-limited routing (n_group), a routed_scaling_factor or partial RoPE "
                          "(partial_rotary_factor) are not supported by this trainer")
    if hf.get("attention_bias") or hf.get("mlp_bias") or (kind == "qwen2_moe" and hf.get("qkv_bias", True)):
        raise ExportError(f"{path}: attention or MLP biases have no place in this trainer's model")
    if hf.get("use_sliding_window") or (kind == "mixtral" and hf.get("sliding_window")):
        raise ExportError(f"{path}: sliding-window attention is not supported by this trainer")
    try:
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        if (hf.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
            raise ExportError(f"{path}: RoPE scaling ({hf.get('rope_scaling') or rope}) is not supported by this "
                              "trainer")
        fields = {
            "dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
            "n_kv_heads": hf.get("num_key_value_heads"), "vocab_size": hf["vocab_size"],
            "ffn_dim": hf["intermediate_size"], "norm_eps": hf.get("rms_norm_eps", 1e-5),
            "rope_theta": hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "qk_norm": kind in ("qwen3", "qwen3_moe") or kind == "glm4_moe" and bool(hf.get("use_qk_norm")),
            "head_size": None if head_dim * hf["num_attention_heads"] == hf["hidden_size"] else head_dim,
        }
        if kind == "mixtral":
            fields["moe"] = {"experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                             "expert_dim": hf["intermediate_size"]}
        elif kind == "qwen3_moe":
            fields["moe"] = {"experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
                             "expert_dim": hf["moe_intermediate_size"],
                             "normalize_top_k": bool(hf.get("norm_topk_prob", False))}  # transformers' default
        elif kind == "qwen2_moe":
            fields["moe"] = {"experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
                             "expert_dim": hf["moe_intermediate_size"],
                             "normalize_top_k": bool(hf.get("norm_topk_prob", False)),
                             "shared_experts": _whole(hf, path), "shared_expert_gate": True}
        elif kind == "glm4_moe":
            fields["moe"] = {"experts": hf["n_routed_experts"], "top_k": hf["num_experts_per_tok"],
                             "expert_dim": hf["moe_intermediate_size"], "score": "sigmoid",
                             "normalize_top_k": bool(hf.get("norm_topk_prob", True)), "bias_update_rate": 0.001,
                             "shared_experts": hf.get("n_shared_experts", 1)}
        return ModelConfig(**{**fields, **overrides})
    except KeyError as exc:
        raise ExportError(f"{path}: no {exc.args[0]!r}, which a {kind} config holds") from None
    except ValidationError as exc:
        problems = '; '.join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ExportError(f"{path}: not a model this trainer can build ({problems})") from None


def _whole(hf: dict, path: Path) -> int:
    """Qwen2-MoE's shared expert as a number of routed experts' widths (how this trainer sizes it)."""
    shared, expert = hf["shared_expert_intermediate_size"], hf["moe_intermediate_size"]
    if shared % expert:
        raise ExportError(f"{path}: shared_expert_intermediate_size {shared} is not a whole number of experts "
                          f"(moe_intermediate_size {expert}); this trainer sizes its shared expert so")
    return shared // expert


def _tensors(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: hf_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), "pt") as f:
        names = f.keys()  # a safetensors handle is not iterable itself
    return dict.fromkeys(names, single)


def unfolded(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `export.folded`: weights as the trainer's multipliers expect them."""
    if not cfg.mup.enabled:
        return tensor
    scale = folded(cfg, name, torch.ones(()))
    return tensor / scale


def import_hf(hf_dir: Path, cfg: ModelConfig, out_root: Path) -> Path:
    """Write `out_root/step-0` (model only); returns it. `out_root` must not exist."""
    if out_root.exists():
        raise ExportError(f"{out_root} already exists: give a new folder (nothing was written)")
    files = _tensors(hf_dir)
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type", "llama")
    expected = set(param_plan(cfg)) | set(checkpointed_buffers(cfg))
    state: dict[str, torch.Tensor] = {}
    for hf_key, path in files.items():
        if "rotary_emb" in hf_key:
            continue
        if hf_key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        names = our_names(hf_key, model_type)
        with safe_open(str(path), "pt") as f:
            tensor = f.get_tensor(hf_key).float()
        if names[0].endswith(GLM_BIAS) and names[0] not in expected:
            if tensor.any():  # routing would change without them
                raise ExportError(f"{path}: {hf_key} holds routing biases, which a model with "
                                  "model.moe.bias_update_rate=0 would drop; set a rate to keep them")
            continue
        if any(name not in expected for name in names):
            raise ExportError(f"{path}: tensor {hf_key} has no place in this model")
        parts = tensor.chunk(2, dim=1) if len(names) == 2 else (tensor,)  # stacked gate and up: gate first
        for name, part in zip(names, parts, strict=True):
            state[name] = unfolded(cfg, name, part.contiguous())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(f"{hf_dir}: missing tensors for this model: {', '.join(missing[:4])}")
    with staged_dir(out_root) as tmp:
        step = step_dir(tmp, 0)
        dcp.save({"model": state}, checkpoint_id=str(step), no_dist=True)
        mark_complete(step, {"step": 0, "from": str(hf_dir)})
    return step_dir(out_root, 0)
