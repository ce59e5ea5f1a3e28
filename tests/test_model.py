"""The plain-PyTorch Llama: meta build + init, muP plan and multipliers, parameter counts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.core.config import ModelConfig, MoeConfig, MupConfig
from trainer.core.costs import flops_per_token, num_params
from trainer.core.layers import load_config
from trainer.export.hf import hf_name
from trainer.train.model import Transformer, checkpointed_buffers, param_plan


def build(cfg: ModelConfig, seq_len: int = 32, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, seq_len)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("cfg", [
    ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128),
    ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, tie_embeddings=True),
    ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, moe=MoeConfig(experts=4, top_k=2, expert_dim=32)),
    ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, moe=MoeConfig(
        experts=4, top_k=2, expert_dim=32, score="sigmoid", bias_update_rate=0.01, shared_experts=2,
        shared_expert_gate=True)),
])
def test_builds_on_meta_counts_parameters_and_learns(cfg: ModelConfig) -> None:
    model = build(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    assert set(model.state_dict()) == set(param_plan(cfg)) | set(checkpointed_buffers(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        assert logits.shape == (4, 32, cfg.vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.3)  # uniform at init
    assert losses[-1] < 0.5 * losses[0]  # it memorises the batch


def test_mup_at_base_width_is_standard_parametrization() -> None:
    sp = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128)
    mup = sp.model_copy(update={"mup": MupConfig(enabled=True, base_dim=64)})
    tokens = torch.randint(0, 128, (2, 16))
    assert torch.equal(build(sp)(tokens), build(mup)(tokens))


def test_mup_plan_scales_hidden_weights_with_width() -> None:
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, vocab_size=128, init_std=0.02,
                      mup=MupConfig(enabled=True, base_dim=64, zero_readout=True))
    plan = param_plan(cfg)
    hidden = plan["layers.0.attention.wq.weight"]
    assert hidden.role == "hidden" and hidden.lr_mult == 0.25 and hidden.wd_mult == 4.0
    assert hidden.init_std == pytest.approx(0.01)  # 0.02 / sqrt(4)
    assert plan["tok_embeddings.weight"].lr_mult == 1.0 and plan["output.weight"].init_std == 0.0
    assert plan["norm.weight"].wd_mult == 0.0
    model = build(cfg)
    assert set(plan) == {name for name, _ in model.named_parameters()}
    assert model.output_mult == 0.25 and torch.count_nonzero(model.output.weight) == 0
    std = model.layers["0"].feed_forward.w1.weight.std().item()
    assert std == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_gets_the_renormalised_mix_of_its_top_k_experts(top_k: int) -> None:
    """The grouped, sorted computation against a token-by-token one written from the definition."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, moe=MoeConfig(experts=5, top_k=top_k),
                      mup=MupConfig(enabled=True, base_dim=16))
    moe = build(cfg).layers["0"].feed_forward
    x = torch.randn(3, 7, cfg.dim, generator=torch.Generator().manual_seed(2))
    out = moe(x)
    g = moe.grouped
    for b, t in itertools.product(range(3), range(7)):
        token = x[b, t]
        probs = torch.softmax(moe.router.weight @ token * 0.5, dim=0)  # router_mult = 1/m = 16/32
        top = probs.topk(top_k)
        want = sum(w / top.values.sum() * (g.w2[e] @ (F.silu(g.w1[e] @ token) * (g.w3[e] @ token)))
                   for w, e in zip(top.values, top.indices.tolist(), strict=True))
        torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-6)
    assert moe.load.sum() == 3 * 7 * top_k and len(moe.load) == 5
    torch.testing.assert_close(moe(x), out, rtol=0, atol=0)  # deterministic


ROUTING = {
    "softmax": MoeConfig(experts=5, top_k=2),
    "softmax, biases, raw weights": MoeConfig(experts=5, top_k=2, bias_update_rate=0.01, normalize_top_k=False),
    "sigmoid, biases, shared expert": MoeConfig(experts=5, top_k=2, score="sigmoid", bias_update_rate=0.01,
                                                shared_experts=1),
    "sigmoid, raw weights, gated shared expert": MoeConfig(experts=5, top_k=3, score="sigmoid",
                                                           normalize_top_k=False, shared_experts=2,
                                                           shared_expert_gate=True),
}


@pytest.mark.parametrize("moe_cfg", list(ROUTING.values()), ids=list(ROUTING))
def test_routing_biases_choose_and_the_scores_mix_beside_the_shared_expert(moe_cfg: MoeConfig) -> None:
    """Each token's output written from the definition (DeepSeek-V3's for sigmoid scores and biases, Qwen2-MoE's for
    the gated shared expert): the k best of score + bias choose, the scores alone (renormalised or not) mix, the
    shared expert adds its output for every token. The biases (large here, and one favouring the last expert) change
    which experts a token gets; the controls: without them the choice, and so the output, differs; without the shared
    expert's output too."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, moe=moe_cfg,
                      mup=MupConfig(enabled=True, base_dim=16))
    moe = build(cfg).layers["0"].feed_forward
    if moe.expert_bias is not None:
        moe.expert_bias.copy_(torch.tensor([0.0, -0.2, 0.1, 0.0, 0.5]))
    x = torch.randn(3, 7, cfg.dim, generator=torch.Generator().manual_seed(2))
    out = moe(x)
    g = moe.grouped
    for b, t in itertools.product(range(3), range(7)):
        token = x[b, t]
        logits = moe.router.weight @ token * 0.5  # router_mult = 1/m = 16/32
        scores = torch.sigmoid(logits) if moe_cfg.score == "sigmoid" else torch.softmax(logits, dim=0)
        bias = moe.expert_bias if moe.expert_bias is not None else torch.zeros(5)
        chosen = (scores + bias).topk(moe_cfg.top_k).indices.tolist()
        weights = scores[chosen] / (scores[chosen].sum() if moe_cfg.normalize_top_k else 1.0)
        want = sum(w * (g.w2[e] @ (F.silu(g.w1[e] @ token) * (g.w3[e] @ token)))
                   for w, e in zip(weights, chosen, strict=True))
        if moe.shared is not None:
            s = moe.shared
            shared = s.w2.weight @ (F.silu(s.w1.weight @ token) * (s.w3.weight @ token))
            gate = torch.sigmoid(moe.shared_gate.weight @ token * 0.5) if moe_cfg.shared_expert_gate else 1.0
            want = want + gate * shared
        torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-6)
    if moe.expert_bias is not None:
        moe.expert_bias.zero_()
        assert not torch.allclose(moe(x), out, atol=1e-4)
    if moe.shared is not None:  # the control of the shared expert's part: without its output, other outputs
        before = moe(x)
        with torch.no_grad():
            moe.shared.w2.weight.zero_()
        assert not torch.allclose(moe(x), before, atol=1e-4)


def test_balancing_biases_even_out_a_router_that_favours_one_expert() -> None:
    """Auxiliary-loss-free balancing alone (no gradient, no balancing loss): a sigmoid router that sends every token
    to expert 0 is evened out by its biases within 100 updates (the fullest expert under 1.5× its fair share); the
    control without updates stays as skewed. Each update moves every bias by the rate, towards the mean load."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, moe=MoeConfig(
        experts=4, top_k=1, score="sigmoid", bias_update_rate=0.01))
    moe = build(cfg).layers["0"].feed_forward
    moe.update_bias(torch.tensor([10, 0, 5, 5]))
    assert moe.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    x = torch.randn(64, 16, cfg.dim, generator=torch.Generator().manual_seed(3)) + 1.0  # a common direction
    with torch.no_grad():
        moe.router.weight[0] = 0.5  # expert 0 aligned with it: it wins every token

    def fullest(updates: int) -> float:
        moe.expert_bias.zero_()
        for i in range(updates):
            moe(x[i % 4 * 16:(i % 4 + 1) * 16])
            moe.update_bias(moe.load)
        moe(x)
        return moe.load.max().item() / moe.load.sum().item() * 4

    assert fullest(0) > 3.5  # nearly everything to one expert
    assert fullest(100) < 1.5


def test_moe_parameters_follow_mup_and_count_active_ones() -> None:
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=128, init_std=0.02,
                      mup=MupConfig(enabled=True, base_dim=64), moe=MoeConfig(experts=4, top_k=1))
    plan = param_plan(cfg)
    model = build(cfg)
    assert set(plan) == {name for name, _ in model.named_parameters()}
    experts, router = plan["layers.0.feed_forward.grouped.w1"], plan["layers.0.feed_forward.router.weight"]
    assert experts.role == "hidden" and experts.lr_mult == 0.25 and experts.init_std == pytest.approx(0.01)
    assert router.role == "output" and router.lr_mult == 1.0 and model.layers["0"].feed_forward.router_mult == 0.25
    assert model.layers["0"].feed_forward.grouped.w2.std().item() == pytest.approx(0.01, rel=0.05)
    # A shared expert's matrices are hidden weights; its gate's one logit is output-like (a 1/m multiplier).
    shared = cfg.model_copy(update={"moe": MoeConfig(experts=4, top_k=1, shared_experts=2,
                                                     shared_expert_gate=True)})
    plan = param_plan(shared)
    assert plan["layers.1.feed_forward.shared.w2.weight"] == experts
    assert plan["layers.1.feed_forward.shared_gate.weight"] == router
    assert num_params(shared, active=True) - num_params(cfg, active=True) == 2 * (3 * 256 * 2 * 704 + 256)
    # OLMoE-1B-7B's shape with its vocabulary: 6.9B parameters, 1.3B of them active (the OLMoE paper's numbers).
    olmoe = load_config(None, ["job.name=x", "model.flavor=olmoe-1B-7B", "model.vocab_size=50304"]).model
    assert num_params(olmoe) == pytest.approx(6.92e9, rel=0.01)
    assert num_params(olmoe, active=True) == pytest.approx(1.28e9, rel=0.01)
    # MFU counts what a token uses: 6 × (1.07B active non-embedding + the 0.10B readout) + causal attention.
    assert flops_per_token(olmoe, 4096) == pytest.approx(6 * 1.177e9 + 6 * 16 * 2048 * 4096, rel=0.01)


def test_explicit_positions_match_implicit_ones() -> None:
    model = build(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=128))
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    assert torch.allclose(model(tokens), model(tokens, positions), atol=1e-6)


@pytest.mark.parametrize("cfg", [
    ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128),
    ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, qk_norm=True, head_size=32),
], ids=["llama", "qk-norm"])
def test_a_packed_document_gets_the_logits_it_has_alone(cfg: ModelConfig, monkeypatch) -> None:
    """Positions restarting at each document (data.document_positions) keep attention inside each document of a
    packed row: three documents packed get, each, their logits alone (1e-5)."""
    from trainer.train import model as model_module

    model = build(cfg, seq_len=64)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 128, (1, n), generator=gen) for n in (20, 28, 9)]
    row = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        packed = model(row, positions)
        starts = [0, 20, 48, 57]
        for doc, (a, b) in zip(docs, itertools.pairwise(starts), strict=True):
            assert (packed[:, a:b] - model(doc)).abs().max().item() <= 1e-5
        # The control: one document for the whole row (RoPE still restarting) and the later ones see the earlier.
        monkeypatch.setattr(model_module, "document_ids", torch.zeros_like)
        crossing = model(row, positions)
    assert (crossing[:, 20:48] - packed[:, 20:48]).abs().max().item() > 1e-3
    assert torch.equal(crossing[:, :20], packed[:, :20])  # the first document sees nothing before it either way


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_logits_match_huggingface_llama(tied: bool, kv_heads: int) -> None:
    """Same weights in transformers' LlamaForCausalLM give the same logits (fp32): the conventions match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=128, tie_embeddings=tied,
                      ffn_dim=96, rope_theta=5000.0)
    ours = build(cfg, seq_len=64)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=5000.0, max_position_embeddings=64,
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False)).eval()
    state = {hf_name(name): tensor for name, tensor in ours.state_dict().items()}
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5
