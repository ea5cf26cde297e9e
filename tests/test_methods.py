"""Adapter methods on a tiny BERT built from config: exact trainable-parameter counts, save/load
and merge round trips, loading with plain peft, and AdaLoRA's budget schedule being stepped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptune import api
from adaptune.errors import ModelError, NotApplicable
from adaptune.train import prepare, run
from conftest import dev_accuracy_of_predictions, tiny_config

# Tiny BERT: hidden H=32, L=2 layers, FFN 64, 2 labels.
H, L, FFN, C = 32, 2, 64, 2
HEAD = H * C + C
BACKBONE = (200 * H + 256 * H + 2 * H + 2 * H) + L * (4 * (H * H + H) + 2 * H + (H * FFN + FFN)
                                                    + (FFN * H + H) + 2 * H)
BIASES = L * (4 * H + H + FFN + H + H) + H  # q,k,v,o, attention LN, FFN in/out, output LN; emb LN
RANK = 4
EXPECTED_TRAINABLE = {
    "lora": 2 * L * RANK * (H + H) + HEAD,  # A (r x in) + B (out x r) on query and value
    "adalora": 2 * L * 6 * (H + H + 1) + HEAD,  # init rank ceil(1.5 r) = 6: A, B and E
    "dora": 2 * L * RANK * (H + H) + 2 * L * H + HEAD,  # LoRA + one magnitude per output
    "ia3": 2 * L * H + L * FFN + HEAD,  # key/value outputs rescaled, FFN-out input rescaled
    "beft": L * H + HEAD,  # a bias vector on each value projection
    "vera": 2 * L * (H + RANK) + HEAD,  # lambda_b (out) and lambda_d (r); A, B frozen, shared
    "loha": 2 * L * 2 * RANK * (H + H) + HEAD,  # two (out x r, r x in) pairs
    # Kronecker factors of 32 = 4 x 8 on both sides: w1 4 x 4 full, w2 8 x 8 full (r=4 is not
    # below max(8, 8) / 2, so peft does not decompose it).
    "lokr": 2 * L * (4 * 4 + 8 * 8) + HEAD,
    "oft": 2 * L * (32 * 31 // 2) + HEAD,  # one 32-block: a skew-symmetric 32 x 32, upper part
    "peft": 2 * L * 10 + HEAD,  # FourierFT, n_frequency 10 spectral coefficients per layer
    "prompt_tuning": 5 * H + HEAD,  # 5 virtual tokens, one embedding each
    "prefix_tuning": 5 * 2 * L * H + HEAD,  # 5 virtual tokens, a key and a value per layer
    "bitfit": BIASES + HEAD,
    "full": BACKBONE + HEAD,
    "head": HEAD,
}


# Options each method needs on the tiny model (its layers are 32 wide).
OPTIONS = {"peft": {"peft": {"config": '{"peft_type": "FOURIERFT", "n_frequency": 10}'}},
           "prompt_tuning": {"prompt_tuning": {"virtual_tokens": 5}},
           "prefix_tuning": {"prefix_tuning": {"virtual_tokens": 5}}}
# Prompt learning: peft wraps the backbone (its feature-extraction model), not the task model.
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
# Frozen adapter tensors that count in the total (VeRA's shared random projections; AdaLoRA's
# `ranknum` scalars; OFT's and FourierFT's frozen buffers are not parameters).
FROZEN_EXTRA = {"adalora": 2 * L, "vera": 0}
PEFT_METHODS = [m for m in EXPECTED_TRAINABLE if m not in ("bitfit", "full", "head")]


@pytest.mark.parametrize("method", list(EXPECTED_TRAINABLE))
def test_exact_parameter_counts_and_save_load_round_trip(method, tiny_encoder, cls_files,
                                                         tmp_path):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / method,
                      method={"name": method, "rank": RANK, **OPTIONS.get(method, {})})
    result = run(cfg)
    m = result.metrics
    assert m["trainable_params"] == EXPECTED_TRAINABLE[method]
    adapter_params = m["trainable_params"] - HEAD if method in PEFT_METHODS else 0
    adapter_params += FROZEN_EXTRA.get(method, 0)
    assert m["total_params"] == BACKBONE + HEAD + adapter_params
    assert m["backbone_params"] == BACKBONE

    # The reloaded model reproduces the dev score the run reported for its best adapter.
    predictor = api.load(result.adapter_dir)
    reloaded = prepare(cfg).evaluate(predictor.model)
    assert reloaded == pytest.approx(m["dev"], abs=1e-9)


def _logits(predictor, texts):
    features = predictor.task.encode(predictor.task.make_examples(texts), predictor.tokenizer,
                                     predictor.labels, 32, "predict")
    batch = predictor.task.collate(features, predictor.tokenizer.pad_token_id)
    with torch.no_grad():
        return predictor.model(**batch).logits


MERGEABLE = {"lora", "adalora", "dora", "ia3", "beft", "vera", "loha", "lokr", "oft"}


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_plain_peft_loading_and_merge_match_adaptune(method, tiny_encoder, cls_files, tmp_path):
    from peft import PeftModel

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             method={"name": method, "rank": RANK, **OPTIONS.get(method, {})},
                             train={"max_steps": 8}))
    texts = ["good fun", "a bore", "so bad", "great film"]
    ours = api.load(result.adapter_dir)
    expected = _logits(ours, texts)
    # The head is inside the adapter: plain peft restores it onto a fresh base.
    base = api.build_base(result.adapter_dir)
    fresh_head = _logits(api.Predictor(base, ours.tokenizer, ours.meta), texts)
    assert not torch.allclose(fresh_head, expected)
    import json

    named = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert named["base_model_name_or_path"] == tiny_encoder  # the base, not null
    plain = api.build_base(result.adapter_dir)
    if method in PROMPT_LEARNING:  # peft's part is the backbone's; the head lies beside it
        from safetensors.torch import load_file

        plain.backbone = PeftModel.from_pretrained(plain.backbone, str(result.adapter_dir))
        head = load_file(str(result.adapter_dir / "trainable.safetensors"))
        assert set(head) == {n for n, _ in plain.named_parameters() if n.startswith("task_head.")}
        plain.load_state_dict(head, strict=False)
    else:
        plain = PeftModel.from_pretrained(plain, str(result.adapter_dir))
    torch.testing.assert_close(_logits(api.Predictor(plain, ours.tokenizer, ours.meta), texts),
                               expected)
    if method in PROMPT_LEARNING:
        with pytest.raises(NotApplicable, match="nothing to fold into the base"):
            api.load(result.adapter_dir, merge=True)
    if method not in MERGEABLE:
        return
    merged = api.load(result.adapter_dir, merge=True)
    from peft import PeftModel as _Peft

    assert not isinstance(merged.model, _Peft)
    torch.testing.assert_close(_logits(merged, texts), expected, atol=1e-5, rtol=1e-4)


def test_adalora_budget_schedule_is_stepped_by_the_flow(tiny_encoder, cls_files, tmp_path,
                                                        monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    calls: list[int] = []
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        calls.append(global_step)
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    steps = 20
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "ada",
                             method={"name": "adalora", "rank": 2,
                                     "adalora": {"init_rank": 6, "delta_t": 2, "tinit": 0.1,
                                                 "tfinal": 0.2}},
                             train={"max_steps": steps, "batch_size": 4}))
    assert calls == list(range(1, steps + 1))
    import json

    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == steps and saved["tinit"] == 2 and saved["tfinal"] == 4
    # The budget was really re-allocated: the final ranks add up to the target budget
    # (target rank 2 x 4 adapted modules), below the initial 6 x 4.
    pattern = saved["rank_pattern"]
    assert pattern and sum(sum(mask) for mask in pattern.values()) == 2 * 4


def test_bitfit_refuses_a_model_without_biases(tiny_decoder, cls_files, tmp_path):
    cfg = tiny_config(tiny_decoder, *cls_files, tmp_path / "out", method={"name": "bitfit"})
    with pytest.raises(ModelError, match="no bias parameters"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_decoder_classification_with_lora(tiny_decoder, cls_files, tmp_path):
    result = run(tiny_config(tiny_decoder, *cls_files, tmp_path / "dec",
                             method={"name": "lora", "rank": 2}))
    # q_proj (32 -> 32) and v_proj (32 -> 16, 2 KV heads of 8): A r x in + B out x r
    assert result.metrics["trainable_params"] == L * 2 * ((32 + 32) + (32 + 16)) + (32 * 2 + 2)


def test_classification_head_dropout_only_on_encoders():
    """Encoders' mean-pooled states get dropout 0.1; a decoder's last-token state gets none (a few
    of its features are huge, and dropping one swings the logits): in train mode the decoder
    head is deterministic and the encoder head is not."""
    from adaptune.spec import Family, ModelSpec
    from adaptune.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    hidden, mask = torch.randn(4, 5, 64), torch.ones(4, 5, dtype=torch.long)
    for family, deterministic in ((Family.DECODER, True), (Family.ENCODER, False)):
        spec = ModelSpec("m", "m", family, (), None, None)
        head = ClassificationTask().build_head(64, ["neg", "pos"], spec).train()
        same = torch.equal(head(hidden, mask).logits, head(hidden, mask).logits)
        assert same is deterministic, family


@pytest.mark.integration
def test_compiled_blocks_train_like_eager(tiny_decoder, cls_files, tmp_path):
    """train.compile compiles each repeated block (2 Llama layers) in place and trains to the same
    losses and dev predictions as eager (up to float reassociation in fused kernels); checkpoint
    keys are unchanged, so a compiled run's adapter loads like any other."""
    from adaptune.modeling import compile_blocks

    cfg = tiny_config(tiny_decoder, *cls_files, tmp_path / "eager", method={"name": "lora"},
                      train={"max_steps": 3, "eval_every": 3})
    model = prepare(cfg).build_model()
    keys = set(model.state_dict())
    assert compile_blocks(model) == L
    assert set(model.state_dict()) == keys

    eager = run(cfg).metrics
    compiled = run(cfg.replace(output_dir=str(tmp_path / "compiled"),
                               train={"compile": True})).metrics
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-4)
    assert compiled["dev"] == pytest.approx(eager["dev"], abs=1e-6)
    api.load(tmp_path / "compiled" / "adapter")


def test_compile_blocks_finds_the_repeated_blocks():
    """Named blocks that repeat (BertLayer x 3, not the single BertEmbeddings); for a model that
    names none (MPNet), the longest list of same-class modules."""
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

    from adaptune.modeling import compile_blocks

    small = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
             "num_attention_heads": 2, "intermediate_size": 32}
    bert = BertModel(BertConfig(**small))
    assert compile_blocks(bert) == 3
    assert all(layer._compiled_call_impl is not None for layer in bert.encoder.layer)
    assert bert.embeddings._compiled_call_impl is None
    assert compile_blocks(MPNetModel(MPNetConfig(**small))) == 3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_moving_inits_save_an_adapter_for_the_untouched_base(init, tiny_encoder, cls_files,
                                                                 tmp_path):
    """PiSSA and OLoRA move the base weights (the base keeps the residual). The saved adapter
    is converted to one for the original base (rank 2r), head included, and reproduces the
    trained model's outputs on a freshly built base."""
    import json

    from adaptune.train import setup

    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / init,
                      method={"rank": RANK, "lora": {"init": init}})
    p = prepare(cfg)
    tr = setup(p)
    model = tr.model
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    texts = ["good fun", "a bore", "so bad", "great film"]
    from adaptune.artifact import write_adapter

    folder = tmp_path / "adapter"
    write_adapter(model, p.run, p.labels, folder)
    loaded = api.load(folder)
    features = loaded.task.encode(loaded.task.make_examples(texts), loaded.tokenizer,
                                  loaded.labels, 32, "predict")
    batch = loaded.task.collate(features, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(_logits(loaded, texts), expected, atol=1e-5, rtol=1e-4)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * RANK


def test_eva_initialises_from_a_pass_over_training_batches(tiny_encoder, cls_files, tmp_path,
                                                          monkeypatch):
    import peft

    seen = []
    real = peft.initialize_lora_eva_weights

    def spy(model, dataloader=None, **kwargs):
        seen.append(dataloader)
        return real(model, dataloader=dataloader, **kwargs)

    monkeypatch.setattr(peft, "initialize_lora_eva_weights", spy)
    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "eva",
                             method={"rank": RANK, "lora": {"init": "eva"}}))
    assert len(seen) == 1 and seen[0] is not None
    assert result.metrics["trainable_params"] == EXPECTED_TRAINABLE["lora"]
    predictor = api.load(result.adapter_dir)
    assert prepare(result.config).evaluate(predictor.model) == pytest.approx(
        result.metrics["dev"], abs=1e-9)


def test_loraplus_gives_b_its_own_learning_rate(tiny_encoder, cls_files, tmp_path):
    from adaptune.train import setup

    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / "lp",
                      method={"rank": RANK, "lora": {"loraplus_lr_ratio": 16}},
                      train={"lr": 1e-3})
    tr = setup(prepare(cfg))
    names = {id(p): n for n, p in tr.model.named_parameters()}
    lrs = {}
    for group in tr.optimizer.param_groups:
        for param in group["params"]:
            lrs[names[id(param)]] = group["initial_lr"] if "initial_lr" in group else group["lr"]
    b = [v for k, v in lrs.items() if "lora_B" in k]
    a = [v for k, v in lrs.items() if "lora_A" in k]
    assert b and a and b == pytest.approx([16e-3] * len(b)) and a == pytest.approx([1e-3] * len(a))


def test_methods_refuse_what_they_cannot_apply_to(tiny_encoder, tiny_decoder, cls_files,
                                                 tmp_path):
    from adaptune.config import compose
    from adaptune.errors import ConfigError, NotApplicable

    with pytest.raises(NotApplicable, match="beft: .* has no bias parameters"):
        run(tiny_config(tiny_decoder, *cls_files, tmp_path / "b", method={"name": "beft"}))
    with pytest.raises(NotApplicable, match="block_size=5 does not divide the input width 32"):
        run(tiny_config(tiny_encoder, *cls_files, tmp_path / "o",
                        method={"name": "oft", "oft": {"block_size": 5}}))
    with pytest.raises(ConfigError, match="method.vera.d_initial is an option of vera, but "
                                          "method.name is 'lora'"):
        compose({"method": {"vera": {"d_initial": 0.5}}})
    with pytest.raises(ConfigError, match="method.lora.init is an option of lora and dora"):
        compose({"method": {"name": "ia3", "lora": {"init": "pissa"}}})
    with pytest.raises(ConfigError, match="method.peft.config: expected a JSON mapping"):
        compose({"method": {"name": "peft", "peft": {"config": "{not json"}}})
    with pytest.raises(ConfigError, match="method.name=peft needs a peft config"):
        compose({"method": {"name": "peft"}})
    # A YAML mapping is taken as the JSON config.
    cfg = compose({"method": {"name": "peft", "peft": {"config": {"peft_type": "FOURIERFT"}}}})
    assert cfg.method.peft.config == '{"peft_type": "FOURIERFT"}'


def test_prompt_learning_refuses_what_it_cannot_serve(tiny_encoder, tiny_decoder, cls_files,
                                                      tmp_path, monkeypatch):
    from adaptune.config import compose
    from adaptune.errors import ConfigError
    from adaptune.spec import resolve

    # Virtual tokens take positions: the tiny models have 256.
    with pytest.raises(ConfigError, match="with 20 virtual tokens of method.name=prompt_tuning; "
                                          "use at most 236"):
        resolve(compose({"model": {"name": tiny_encoder, "max_length": 250},
                         "method": {"name": "prompt_tuning"}}))
    # Summarization predicts by generating, which peft's feature-extraction model does not
    # prompt.
    with pytest.raises(NotApplicable, match="prefix_tuning: the summarization task predicts by "
                                            "generating"):
        resolve(compose({"model": {"name": tiny_decoder}, "method": {"name": "prefix_tuning"},
                         "data": {"task": "summarization"}}))
    # A family whose forward fails under peft's prefix is refused before training, naming it.
    from peft import PeftModelForFeatureExtraction

    def broken(self, *args, **kwargs):
        raise TypeError("unexpected keyword 'past_key_values'")

    monkeypatch.setattr(PeftModelForFeatureExtraction, "forward", broken)
    with pytest.raises(NotApplicable, match="prefix_tuning: peft's prefix tuning does not run "
                                            "on .*: TypeError: unexpected keyword"):
        run(tiny_config(tiny_encoder, *cls_files, tmp_path / "p",
                        method={"name": "prefix_tuning"}))
    assert not (tmp_path / "p" / "adapter").exists()


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_on_a_decoder_learns_and_reloads(method, tiny_decoder, cls_files,
                                                         tmp_path):
    result = run(tiny_config(tiny_decoder, *cls_files, tmp_path / method,
                             method={"name": method, **OPTIONS[method]},
                             train={"max_steps": 30, "lr": 3e-2}))
    # The tiny Llama's keys and values are 16 wide (2 of its 4 heads of 8: grouped queries).
    per_token = {"prompt_tuning": H, "prefix_tuning": 2 * L * 16}[method]
    assert result.metrics["trainable_params"] == 5 * per_token + HEAD
    # The tiny set is learnable from the prompt and head alone; chance is 0.5.
    assert result.metrics["dev"]["accuracy"] >= 0.75
    predictor = api.load(result.adapter_dir)
    assert dev_accuracy_of_predictions(predictor, cls_files[1]) == \
        pytest.approx(result.metrics["dev"]["accuracy"])


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_continues_pretraining_and_reloads(method, tiny_encoder, tiny_decoder,
                                                           tmp_path):
    """Language modelling (a domain stage): masked LM on the encoder, causal LM on the decoder,
    whose head has no parameters (the adapter is peft's files alone)."""
    from adaptune.train import prepare
    from test_domain import _corpus

    for model in (tiny_encoder, tiny_decoder):
        out = tmp_path / Path(model).name
        cfg = tiny_config(model, _corpus(tmp_path), "", out, model={"max_length": 64},
                          data={"task": "lm", "dataset": "", "dev_path": ""},
                          method={"name": method, **OPTIONS[method]}, train={"max_steps": 6})
        result = run(cfg)
        reloaded = prepare(cfg).evaluate(api.load(result.adapter_dir).model)
        assert reloaded["perplexity"] == pytest.approx(result.metrics["dev"]["perplexity"],
                                                       rel=1e-6)
