"""DCP → Hugging Face export: logit parity with the trainer's model (muP folded in), loading in vanilla
transformers, atomic output and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.train_helpers import TINY, corpus_overrides, make_job, run_trainer
from trainer.core import jobdir
from trainer.core.config import MoeConfig
from trainer.core.jobdir import JobDir
from trainer.core.layers import load_config
from trainer.export.hf import ExportError, export
from trainer.train.model import Transformer

MUP = ["model.mup.enabled=true", "model.mup.base_dim=32", "model.mup.input_alpha=3.0", "model.mup.output_alpha=2.0",
       "model.mup.attn_alpha=1.5"]


pytestmark = pytest.mark.xdist_group("trained-exports")  # with test_eval.py: one worker, one cache of trained jobs

_TRAINED: dict[str, Path] = {}
"""Jobs trained in this process, by their config: tests of one config share one training."""


def trained_step(tmp_path: Path, corpus: Path, name: str, *overrides: str) -> tuple[Path, Path]:
    """A job trained 2 steps by 2 FSDP ranks, copied into `tmp_path` (the test may change its copy): its directory
    and its final checkpoint. Trained once per config (next to the session's corpus) and copied for each test."""
    settings = ["cluster.devices_per_node=2", "train.steps=2", "checkpoint.interval=2", *overrides]
    key = load_config(None, [f"job.name={name}", *TINY, *corpus_overrides(corpus), *settings]).model_dump_json()
    if key not in _TRAINED:
        fresh = make_job(corpus.parent / "trained" / str(len(_TRAINED)), name, corpus, *settings)
        done = run_trainer(fresh, 2)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        _TRAINED[key] = fresh
    job = shutil.copytree(_TRAINED[key], tmp_path / name)
    root = job / "checkpoints"
    return job, jobdir.step_dir(root, jobdir.latest_complete(root))


def trainer_model(job: Path, step_dir: Path) -> Transformer:
    """The trainer's own model with the checkpoint's weights, in one process."""
    cfg = JobDir(job).read_config()
    model = Transformer(cfg.model, cfg.data.seq_len)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


def trainer_logits(job: Path, step_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return trainer_model(job, step_dir)(tokens)


QWEN3 = ["model.qk_norm=true", "model.head_size=32", "model.n_kv_heads=2"]
"""QK-norm with heads wider than dim / n_heads and grouped keys: exported as Qwen3."""
FAMILIES = {
    "mha": (["model.n_kv_heads=4"], "LlamaForCausalLM"),
    "gqa": (["model.n_kv_heads=2"], "LlamaForCausalLM"),
    "qwen3": (QWEN3, "Qwen3ForCausalLM"),
    "moe-top2": (["model.n_kv_heads=2", "model.moe.experts=4", "model.moe.top_k=2", "model.moe.expert_dim=48"],
                 "MixtralForCausalLM"),
    "qk-moe-top1": ([*QWEN3, "model.moe.experts=4", "model.moe.top_k=1", "model.moe.expert_dim=48",
                     "model.moe.normalize_top_k=false"], "Qwen3MoeForCausalLM"),
}
"""Model shapes and the transformers class each exports to."""


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_model_gives_the_trainers_logits(tmp_path: Path, corpus: Path, mup: bool, tied: bool,
                                                  family: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape, cls = FAMILIES[family]
    job, step = trained_step(tmp_path, corpus, "src", *(MUP if mup else []), f"model.tie_embeddings={tied}", *shape)
    out = export(JobDir(job).read_config(), step, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(hf).__name__ == cls
    assert hf.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - trainer_logits(job, step, tokens)).abs().max().item()
    assert diff <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer("hello world")["input_ids"]


def test_bf16_export_generates_and_bad_inputs_are_named(tmp_path: Path, corpus: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    job, step = trained_step(tmp_path, corpus, "src")
    cfg = JobDir(job).read_config()
    out = export(cfg, step, tmp_path / "bf16", dtype=torch.bfloat16, shard_bytes=100_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8

    with pytest.raises(ExportError, match="already exists"):
        export(cfg, step, out)
    (step / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        export(cfg, step, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))


def test_convert_cli_names_what_is_missing(tmp_path: Path, corpus: Path, capsys) -> None:
    from trainer.export.cli import main

    job = make_job(tmp_path, "untrained", corpus)
    assert main([str(job), str(tmp_path / "out")]) == 2
    assert "holds no complete checkpoint yet" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a job directory" in capsys.readouterr().err
    job, step = trained_step(tmp_path, corpus, "src")
    assert main([str(job), str(tmp_path / "out"), "--step", "7"]) == 2
    assert "step-7 does not exist; complete checkpoints: step-2" in capsys.readouterr().err
    assert main([str(job), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert "exported" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()
    assert not list(tmp_path.glob(".out.partial*"))  # the staging folder is gone
    # A mixture with raw top-k weights and no QK-norm has no transformers class: refused before anything is written.
    cfg = JobDir(job).read_config()
    moe = cfg.model.model_copy(update={"moe": MoeConfig(experts=4, top_k=1, normalize_top_k=False)})
    with pytest.raises(ExportError, match="normalize_top_k is false without model.qk_norm"):
        export(cfg.model_copy(update={"model": moe}), step, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize(("moe", "qk_norm", "fragment"), [
    ({"bias_update_rate": 0.001}, False, "bias_update_rate with model.moe.score=softmax: the transformers classes "
                                         "with routing biases (Glm4Moe, DeepseekV3, Dots1) score with a sigmoid"),
    ({"shared_experts": 1}, False, "Qwen2MoeForCausalLM, whose shared expert is gated"),
    ({"shared_experts": 1, "shared_expert_gate": True}, True, "this model has QK-norm"),
    ({"score": "sigmoid"}, True, "Glm4MoeForCausalLM, which has at least one shared expert (model.moe.shared_experts)"
                                 ", ungated (model.moe.shared_expert_gate=false); this model has none"),
    ({"score": "sigmoid", "shared_experts": 1, "shared_expert_gate": True}, False, "DeepseekV3ForCausalLM routes "
                                                                                   "this way but its attention"),
])
def test_a_mixture_no_transformers_class_holds_is_refused_by_name(moe: dict, qk_norm: bool, fragment: str) -> None:
    from trainer.core.config import ModelConfig
    from trainer.export.hf import hf_family

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, qk_norm=qk_norm, moe={"experts": 4, "expert_dim": 48, **moe})
    with pytest.raises(ExportError) as refused:
        hf_family(cfg)
    assert fragment in str(refused.value)
    assert "nothing was written" in str(refused.value)


@pytest.mark.parametrize(("tied", "family"), [(False, "gqa"), (True, "gqa"), (True, "qwen3"), (False, "moe-top2"),
                                             (True, "qk-moe-top1")])
def test_hf_to_dcp_to_hf_is_bit_identical_and_starts_a_job(tmp_path: Path, corpus: Path, tied: bool,
                                                           family: str) -> None:
    from safetensors.torch import load_file

    from trainer.export.hf_import import import_hf, model_config

    shape = FAMILIES[family][0]
    job, step = trained_step(tmp_path, corpus, "src", f"model.tie_embeddings={tied}", *shape)
    cfg = JobDir(job).read_config()
    first = export(cfg, step, tmp_path / "first")
    imported = model_config(first)
    def architecture(m) -> tuple:
        return m.qk_norm, m.head_dim, m.kv_heads, m.moe.experts, m.moe.top_k, m.expert_hidden, m.tie_embeddings

    assert architecture(imported) == architecture(cfg.model)
    dcp_step = import_hf(first, imported, tmp_path / "imported")
    second = export(cfg, dcp_step, tmp_path / "second")

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The same through the command line, and a folder that is no HF model.
    from trainer.export.cli import main

    assert main(["--from-hf", str(first), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "step-0" / jobdir.COMPLETE).is_file()
    assert main(["--from-hf", str(tmp_path / "cli"), str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()

    # A new job starts from the imported weights (its own optimizer and step 0).
    new = make_job(tmp_path, "from-hf", corpus, f"checkpoint.init_from={dcp_step}", f"model.tie_embeddings={tied}",
                   "train.steps=1", *shape)
    done = run_trainer(new)
    assert done.returncode == 0 and f"restored model from {dcp_step}" in done.stdout, done.stderr[-2000:]
    # An import holds weights only: asking it for more is refused by name.
    more = make_job(tmp_path, "from-hf-more", corpus, f"checkpoint.init_from={dcp_step}",
                    f"model.tie_embeddings={tied}", "checkpoint.init_restore=[model, optimizer]", *shape)
    done = run_trainer(more)
    assert done.returncode == 2 and f"checkpoint.init_from: {dcp_step} holds no optimizer state (it holds: model)" \
        in done.stdout, done.stdout[-2000:]


MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 512, "intermediate_size": 48, "num_local_experts": 4,
           "num_experts_per_tok": 2}


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"model_type": "gpt2"}, "model_type is 'gpt2'"),
    ({"num_local_experts": None}, "no 'num_local_experts', which a mixtral config holds"),
    ({"num_experts_per_tok": 5}, "not a model this trainer can build (moe: Value error, top_k = 5 exceeds"),
    ({"sliding_window": 4096}, "sliding-window attention is not supported"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 48, "mlp_only_layers": [0]},
     "dense layers between its mixtures"),
])
def test_an_hf_config_the_model_cannot_take_is_refused_by_name(tmp_path: Path, changes: dict, fragment: str) -> None:
    import json

    from trainer.export.hf_import import model_config

    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in {**MIXTRAL, **changes}.items()
                                                      if v is not None}))
    with pytest.raises(ExportError) as refused:
        model_config(tmp_path)
    assert fragment in str(refused.value)


def test_a_qwen3_moe_config_without_norm_topk_prob_mixes_raw_weights(tmp_path: Path) -> None:
    import json

    from trainer.export.hf_import import model_config

    qwen = {**MIXTRAL, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 48}
    (tmp_path / "config.json").write_text(json.dumps(qwen))  # transformers' default: norm_topk_prob false
    assert model_config(tmp_path).moe.normalize_top_k is False
    (tmp_path / "config.json").write_text(json.dumps({**qwen, "norm_topk_prob": True}))
    assert model_config(tmp_path).moe.normalize_top_k is True


def test_upload_dry_run_lists_the_files_and_a_missing_token_is_named(tmp_path: Path, corpus: Path, capsys,
                                                                     monkeypatch) -> None:
    """No network here: everything up to the Hub calls is exercised, and the calls are recorded."""
    from trainer.export import hub
    from trainer.export.cli import main

    for name in hub.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    job, _ = trained_step(tmp_path, corpus, "src")
    assert main([str(job), str(tmp_path / "a"), "--upload", "org/model"]) == 2
    assert "no Hugging Face token: export HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before any work
    assert main([str(job), str(tmp_path / "a"), "--upload", "not-a-repo", "--dry-run"]) == 2
    assert "'not-a-repo' is not ORG/NAME" in capsys.readouterr().err

    assert main([str(job), str(tmp_path / "b"), "--upload", "org/model", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "repository org/model (public), revision (branch) step-2" in out
    assert "model-00001-of-00001.safetensors" in out and "README.md" in out and "tokenizer.json" in out
    card = (tmp_path / "b" / "README.md").read_text()
    assert "# src (step 2)" in card and "steps: 2 of 2 planned" in card and '"dim": 64' in card

    calls = []

    class RecordingApi:
        def __init__(self, token: str):
            calls.append(("token", token))

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs)) or "https://hub/commit"

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main([str(job), str(tmp_path / "c"), "--upload", "org/model", "--revision", "v1", "--private"]) == 0
    assert [c[0] for c in calls] == ["token", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][2]["private"] is True and calls[2][2]["branch"] == "v1"
    assert calls[3][2]["revision"] == "v1" and calls[3][2]["folder_path"] == str(tmp_path / "c")
    assert "hf_test_token" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "c").rglob("*")
                                          if p.is_file())


def test_export_from_a_tensor_parallel_checkpoint(tmp_path: Path, corpus: Path) -> None:
    """TP shards weights on other axes than FSDP; DCP reassembles them, the export does not care."""
    from transformers import LlamaForCausalLM

    job, step = trained_step(tmp_path, corpus, "tp", "parallel.tp=2", *MUP)
    out = export(JobDir(job).read_config(), step, tmp_path / "hf")
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (LlamaForCausalLM.from_pretrained(out)(tokens).logits - trainer_logits(job, step, tokens)).abs().max()
    assert diff.item() <= 1e-5


EXPORT_MEMORY = """
import sys, torch, torch.distributed.checkpoint as dcp
from pathlib import Path
from trainer.core.config import AnvilConfig
from trainer.export.hf import export
from trainer.train.model import Transformer
cfg = AnvilConfig(job={"name": "big"}, model={"dim": 512, "n_layers": 24, "n_heads": 8, "vocab_size": 32000},
                  data={"seq_len": 256})
root = Path(sys.argv[1])
if sys.argv[2] == "make":  # in its own process: the model must not set this process's peak
    model = Transformer(cfg.model, 256)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(root / "step-1"), no_dist=True)
    (root / "step-1" / "COMPLETE").write_text("{}")
    print(sum(p.numel() * 4 for p in model.parameters()), max(p.numel() * 4 for p in model.parameters()))
else:
    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: imports must not count
        f.write("5")
    before = kib("VmRSS:")
    export(cfg, root / "step-1", root / "hf", shard_bytes=32 * 2**20)
    print((kib("VmHWM:") - before) * 1024)
"""


def test_export_memory_stays_near_the_largest_tensor(tmp_path: Path) -> None:
    """A 109M-parameter model (436 MB in fp32) exports with peak memory growing by a few of its largest
    tensors (the 65 MB embedding), not by the model's size."""
    import subprocess
    import sys

    from tests.train_helpers import trainer_env

    def run(phase: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, str(tmp_path), phase], capture_output=True,
                              text=True, env=trainer_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return list(map(int, done.stdout.split()))

    size, largest = run("make")
    (grown,) = run("export")
    assert size > 400e6 and 0 < grown < 4 * largest < 0.6 * size, (size, largest, grown)
