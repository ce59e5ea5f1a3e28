"""The Llama-family decoder in plain PyTorch: RMSNorm, RoPE, GQA, SwiGLU, optional tied embeddings, muP; switches
for QK-norm (Qwen3) and the head size.

No parallelism here (that is applied to the model from outside). Built on the meta device, then
materialised and initialised with `init_weights()`. muP lives in two places only: float multipliers
inside the modules (embedding output, readout input, attention scale) and `param_plan()`, which gives
every parameter its role, init std and learning-rate / weight-decay multipliers from the config alone
(never from tensor shapes, so it survives sharding). RoPE uses the `rotate_half` convention of Hugging
Face's Llama, so weights export without permutation.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.core.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 compute: keep q, k, v in one dtype
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Which document of its row each token belongs to: a new one starts wherever the position restarts at 0."""
    return (positions == 0).cumsum(dim=-1)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """The explicit mask `[batch, 1, length, length]`: causal, and never across documents (True: may attend)."""
    length = documents.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents.unsqueeze(-1) == documents.unsqueeze(-2))).unsqueeze(1)


@functools.cache
def compiled_flex_attention() -> Callable:
    """FlexAttention compiled (it is only fast compiled), once per process: the first document-masked forward on a
    GPU pays for it."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(documents: torch.Tensor):
    """The FlexAttention block mask of `document_mask`: causal, never across documents. Blocks wholly outside the mask
    are listed as skipped, so attention costs what the documents hold, not the row's square."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    length = documents.shape[-1]
    return create_block_mask(same_document, B=documents.shape[0], H=None, Q_LEN=length, KV_LEN=length,
                             device=documents.device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float
                            ) -> torch.Tensor:
    """Attention under a block mask (`document_block_mask`), compiled: Triton on a GPU; on a CPU Inductor's C++
    kernel runs the forward only (torch 2.13 has no FlexAttention backward on a CPU)."""
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        # QK-norm: each head's queries and keys RMS-normalised (one gain vector per head size) before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = cfg.attn_scale  # muP's attn_alpha · sqrt(base head dim) / head dim; SP's 1 / sqrt(head dim)
        self.rope = apply_rope  # a fused kernel may take its place (liger.py)

    def queries_and_keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[batch, heads, length, head_dim]` queries and keys, normalised (QK-norm) and rotated: what the attention
        logits are made of (a coordinate check recomputes them from here, outside the forward)."""
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, -1, self.head_dim)
        k = self.wk(x).view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        """`documents` (per-token document ids of each row, from `document_ids`, or their FlexAttention block mask
        from `document_block_mask`): attention stays inside each document of a packed row; None: plain causal
        attention over the row."""
        batch, length, _ = x.shape
        q, k = self.queries_and_keys(x, cos, sin)
        v = self.wv(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        if documents is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        elif not isinstance(documents, torch.Tensor):  # a block mask
            out = flex_document_attention(q, k, v, documents, self.scale)
        else:  # CPU: the same mask, explicit (quadratic in the row length: fine for what runs on a CPU)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents), scale=self.scale,
                                                 enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """A SwiGLU: the dense model's feed-forward, or a mixture's shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """`experts` SwiGLUs stored as three stacked tensors (the layout of a grouped matmul, sharded by FSDP over the
    experts): `w1`, `w3` `[experts, hidden, dim]`, `w2` `[experts, dim, hidden]`."""

    def __init__(self, experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.grouped_mm = True
        """False where the device has no bf16 grouped matmul (see `grouped_mm_runs`): the loop runs instead."""
        self.even_split = False
        """The planner's (fake tensors hold no counts): the loop gives every expert an equal share of the rows,
        which holds the same tensors as any split of them."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`x`: token rows sorted by expert, `counts[e]` of them for expert e; returns each row's expert output."""
        return self.compute(x, counts, self.w1, self.w2, self.w3)

    def compute(self, x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
                ) -> torch.Tensor:
        """The experts whose stacked weights are given (all of them, or one rank's under expert parallelism) on
        their rows. In bf16 (GPU, or CPU under autocast) one grouped matmul per weight runs every expert with no host
        sync, and compiles; in fp32 (exact CPU numerics) a plain loop over the experts does."""
        if torch.is_autocast_enabled(x.device.type):  # what autocast would do to a matmul
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w2, w3 = (w.to(x.dtype) for w in (w1, w2, w3))
        if x.dtype == torch.bfloat16 and self.grouped_mm:
            offsets = counts.cumsum(0).to(torch.int32)
            gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
            return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
        outputs = []
        rows, experts = x.shape[0], w1.shape[0]
        sizes = ([rows // experts + (e < rows % experts) for e in range(experts)] if self.even_split
                 else counts.tolist())
        for e, part in enumerate(x.split(sizes)):
            outputs.append(F.linear(F.silu(F.linear(part, w1[e])) * F.linear(part, w3[e]), w2[e]))
        return torch.cat(outputs)


def grouped_mm_runs(device: torch.device) -> bool:
    """Whether `torch._grouped_mm` runs in bf16 on `device`: not everywhere (ROCm on MI250X lacks it, for one)."""
    try:
        rows = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        weights = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device)
        torch._grouped_mm(rows, weights, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class _BalanceGradient(torch.autograd.Function):
    """The identity on a layer's output forward; backward, the output's gradient, and `grad` for the layer's
    balancing loss: that loss is trained where its layer runs, with no term in the objective (a pipeline stage's
    loss is not the schedule's; the last stage's is)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, balance: torch.Tensor, grad: float) -> torch.Tensor:
        ctx.grad, ctx.like = grad, (balance.dtype, balance.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        dtype, device = ctx.like
        return grad_out, torch.full((), ctx.grad, dtype=dtype, device=device), None


class MoE(nn.Module):
    """Token-choice top-k mixture of SwiGLU experts: a router scores the experts (softmax, or sigmoid each), the k
    best scores (plus each expert's balancing bias, where `moe.bias_update_rate` keeps one) pick a token's experts,
    whose outputs are mixed with their scores (renormalised to sum to one unless `moe.normalize_top_k` is off); a
    shared expert, where there is one, adds its output for every token (through a sigmoid gate if asked). Each
    forward leaves two statistics for the trainer (overwritten, never accumulated, so an activation-checkpointing
    recompute changes nothing): `balance`, the sum over this batch's sequences of the sequence-wise balancing loss,
    and `load`, how many token-expert assignments each expert got. The balancing loss trains itself: its gradient
    enters at the layer's output in backward (`balance_grad`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.experts, self.top_k, self.normalize, self.score = moe.experts, moe.top_k, moe.normalize_top_k, moe.score
        self.router = nn.Linear(cfg.dim, self.experts, bias=False)
        self.router_mult = cfg.router_mult
        self.grouped = GroupedExperts(self.experts, cfg.dim, cfg.expert_hidden)
        self.shared = FeedForward(cfg.dim, cfg.shared_hidden) if moe.shared_experts else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if moe.shared_expert_gate else None
        self.bias_update_rate = moe.bias_update_rate
        self.expert_bias: torch.Tensor | None
        """Added to the scores when the experts are chosen (auxiliary-loss-free balancing), fp32; a buffer, so it is
        checkpointed with the model and identical on every rank (`update_bias` moves it by the global load)."""
        self.register_buffer("expert_bias", torch.zeros(self.experts) if self.bias_update_rate else None)
        self.balance: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.balance_grad = 0.0
        """d objective / d `balance`, sent back through the output (`_BalanceGradient`); set by the trainer
        (`step.train_balance`): `moe.balance_coef` × the loss's scale / (MoE layers × global batch)."""

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step: `load`, the step's token-expert assignments per expert over every data-parallel
        rank and micro-batch. An expert above the mean moves down by the rate, one below it up (DeepSeek-V3)."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        tokens = x.reshape(-1, dim)
        logits = self.router(tokens).float() * self.router_mult
        scores = logits.sigmoid() if self.score == "sigmoid" else F.softmax(logits, dim=-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        chosen = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # token-expert pairs grouped by expert
        per_sequence = torch.zeros(batch, self.experts, device=x.device).scatter_add_(
            1, chosen.view(batch, -1), torch.ones(batch, length * self.top_k, device=x.device))
        counts = per_sequence.sum(dim=0).long()  # static shapes (no bincount): it compiles in one graph
        token_of = order // self.top_k
        rows = self.grouped(tokens[token_of], counts)
        rows = rows * weights.flatten()[order].unsqueeze(-1).to(rows.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token_of, rows.to(tokens.dtype))
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                gate = torch.sigmoid(self.shared_gate(tokens).float() * self.router_mult)
                shared = gate.to(shared.dtype) * shared
            out = out + shared.to(out.dtype)
        share = per_sequence / (length * self.top_k)
        self.balance = self.experts * (share * probs.view(batch, length, -1).mean(dim=1)).sum()
        self.load = counts.detach()
        out = out.view(batch, length, dim)
        if self.balance_grad and torch.is_grad_enabled():
            out = _BalanceGradient.apply(out, self.balance, self.balance_grad)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.moe.experts else FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, documents)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__()
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Observation points (identities: no parameters, nothing changes) where hooks see what the first block gets
        # and the logits, tied head or not: coordinate checks and the muP monitors use them.
        self.embedded = nn.Identity()
        self.logits = nn.Identity()
        self.input_mult, self.output_mult = cfg.input_mult, cfg.output_mult
        cos, sin = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.fused_loss: nn.Module | None = None
        self.flex_attention = False
        """Document masks as one FlexAttention block mask per forward (`GpuPaths.flex_attention`, set by
        `build_model` on a GPU); else an explicit mask."""
        self.sequence_shards = 1
        """Parts the sequence is split into between blocks (TP's sequence parallelism, set by `apply_tp`): a pipeline
        stage without the embedding receives one part of each row."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[batch, length, vocab]` for token ids `[batch, length]`. With `positions` (per token, restarting
        at 0 where a document starts: `data.document_positions`), each document of a packed row is on its own.

        With `fused_loss` set (Liger on GPU) and `labels` given: the summed loss instead, computed from the
        hidden states and the head's weight without materialising the logits.

        A pipeline stage (`keep_stage`) without the embedding takes the previous stage's hidden states
        `[batch, length, dim]` for `tokens`; one without the head returns its hidden states.
        """
        documents = None
        if positions is None:
            length = tokens.shape[1] * (1 if self.tok_embeddings is not None else self.sequence_shards)
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        else:  # per-document positions: RoPE restarts, and attention stays inside each document
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            documents = document_ids(positions)
            if self.flex_attention:
                documents = document_block_mask(documents)
        h = tokens if self.tok_embeddings is None else self.embedded(self.tok_embeddings(tokens) * self.input_mult)
        for layer in self.layers.values():
            h = layer(h, cos, sin, documents)
        if self.norm is None:
            return h
        h = self.norm(h) * self.output_mult
        if labels is not None and self.fused_loss is not None:
            weight = self.tok_embeddings.weight if self.output is None else self.output.weight
            return self.fused_loss(weight, h.flatten(0, 1), labels.flatten())
        if self.output is None:
            return self.logits(F.linear(h, self.tok_embeddings.weight))
        return self.logits(self.output(h))  # through the module, so that a tensor-parallel plan on it applies

    def keep_stage(self, layers: range, first: bool, last: bool) -> None:
        """Make this model one pipeline stage (on the meta device, before anything is applied): only `layers`
        (keeping their names, so checkpoints and the plan see one model whatever the stages), the embedding if
        `first`, the final norm and head if `last`."""
        for name in list(self.layers):
            if int(name) not in layers:
                del self.layers[name]
        if not first:
            self.tok_embeddings = None
        if not last:
            self.norm = self.output = None

    def mixtures(self) -> list[MoE]:
        """The MoE layers, in order (none in a dense model); found through any wrapper applied from outside."""
        return list(mixture_layers(self).values())

    @torch.no_grad()
    def init_weights(self, seed: int = 0,
                     place: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
        """After materialisation (`to_empty`): the planned init for every parameter, and the RoPE tables.

        Each parameter's full value comes from its own generator, seeded by the run seed and its name, so the
        initial model is the same whatever the parallel layout; `place` copies a full value into a (possibly
        sharded) parameter.
        """
        plan = param_plan(self.cfg)
        for name, param in self.named_parameters():
            name = plain_name(name)
            full = initial_value(name, tuple(param.shape), plan[name], seed, param.device)
            if place is None:
                param.copy_(full)
            else:
                place(param, full)
        cos, sin = rope_tables(self.cfg.head_dim, self.max_seq_len, self.cfg.rope_theta,
                               device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.mixtures():
            if moe.expert_bias is not None:
                moe.expert_bias.zero_()


def mixture_layers(model: nn.Module) -> dict[int, MoE]:
    """The MoE layers of `model` by their index in the whole model (a pipeline rank's `Stages` keep the whole
    model's indices), found through any wrapper applied from outside."""
    return {int(plain_name(name).split(".")[1]): module for name, module in model.named_modules()
            if isinstance(module, MoE)}


def plain_name(name: str) -> str:
    """A parameter's name as this module defines it, without the prefixes of wrappers applied from outside
    (activation checkpointing, compile)."""
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def initial_value(name: str, shape: tuple[int, ...], entry: ParamPlan, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The full initial tensor of parameter `name` (fp32, on `device`)."""
    if entry.init_std is None:
        return torch.ones(shape, device=device)
    if entry.init_std == 0.0:
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, device=device).normal_(0.0, entry.init_std, generator=generator)


def checkpointed_buffers(cfg: ModelConfig) -> list[str]:
    """The model's state beside its parameters, by name: each mixture's balancing biases where they are kept."""
    return [f"layers.{i}.feed_forward.expert_bias" for i in range(cfg.n_layers)] if cfg.moe.bias_update_rate else []


@dataclass(frozen=True)
class ParamPlan:
    role: str  # input | hidden | output | vector
    init_std: float | None  # None: ones (norm gains)
    lr_mult: float
    wd_mult: float


def param_plan(cfg: ModelConfig) -> dict[str, ParamPlan]:
    """Role, init and optimizer multipliers of every parameter, by name, from the config alone.

    muP (AdamW, multiplier form): hidden matrices get init σ/√m, LR η/m and weight decay λ·m (so the
    per-step decay lr·wd stays width-independent); embeddings and the readout keep σ and η (their
    forward multipliers do the scaling); norm gains start at one, no decay. With muP off, m = 1:
    standard parametrization, and both agree at the base width.
    """
    m = cfg.width_mult
    std = cfg.init_std
    plan = {"tok_embeddings.weight": ParamPlan("input", std, 1.0, 1.0),
            "norm.weight": ParamPlan("vector", None, 1.0, 0.0)}
    if not cfg.tie_embeddings:
        readout_std = 0.0 if cfg.mup.enabled and cfg.mup.zero_readout else std
        plan["output.weight"] = ParamPlan("output", readout_std, 1.0, 1.0)
    hidden = ParamPlan("hidden", std / math.sqrt(m), 1.0 / m, m)
    query = ParamPlan("hidden", 0.0, 1.0 / m, m) if cfg.mup.enabled and cfg.mup.zero_query else hidden
    ffn = (["feed_forward.grouped.w1", "feed_forward.grouped.w2", "feed_forward.grouped.w3"] if cfg.moe.experts else
           ["feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"])
    for i in range(cfg.n_layers):
        plan[f"layers.{i}.attention.wq.weight"] = query
        for name in ("attention.wk.weight", "attention.wv.weight", "attention.wo.weight", *ffn):
            plan[f"layers.{i}.{name}"] = hidden
        if cfg.moe.experts:  # output-like: its logits carry a 1/m multiplier, like the readout's
            plan[f"layers.{i}.feed_forward.router.weight"] = ParamPlan("output", std, 1.0, 1.0)
        if cfg.moe.shared_experts:
            for name in ("w1", "w2", "w3"):
                plan[f"layers.{i}.feed_forward.shared.{name}.weight"] = hidden
        if cfg.moe.shared_expert_gate:  # one logit per token: output-like, like the router
            plan[f"layers.{i}.feed_forward.shared_gate.weight"] = ParamPlan("output", std, 1.0, 1.0)
        norms = ("attention_norm", "ffn_norm") + (("attention.q_norm", "attention.k_norm") if cfg.qk_norm else ())
        for name in norms:
            plan[f"layers.{i}.{name}.weight"] = ParamPlan("vector", None, 1.0, 0.0)
    return plan
