"""Adapter methods on a tiny BERT built from config: exact trainable-parameter counts, save/load
and merge round trips, loading with plain peft, and AdaLoRA's budget schedule being stepped."""

from __future__ import annotations

import pytest
import torch

from adaptune import api
from adaptune.errors import ModelError
from adaptune.train import prepare, run
from conftest import tiny_config

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
    "bitfit": BIASES + HEAD,
    "full": BACKBONE + HEAD,
    "head": HEAD,
}


@pytest.mark.parametrize("method", list(EXPECTED_TRAINABLE))
def test_exact_parameter_counts_and_save_load_round_trip(method, tiny_encoder, cls_files,
                                                         tmp_path):
    cfg = tiny_config(tiny_encoder, *cls_files, tmp_path / method,
                      method={"name": method, "rank": RANK})
    result = run(cfg)
    m = result.metrics
    assert m["trainable_params"] == EXPECTED_TRAINABLE[method]
    adapter_params = m["trainable_params"] - HEAD if method in ("lora", "adalora") else 0
    if method == "adalora":
        adapter_params += 2 * L  # one frozen `ranknum` scalar per adapted module
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


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_plain_peft_loading_and_merge_match_adaptune(method, tiny_encoder, cls_files, tmp_path):
    from peft import PeftModel

    result = run(tiny_config(tiny_encoder, *cls_files, tmp_path / "run",
                             method={"name": method, "rank": RANK}, train={"max_steps": 8}))
    texts = ["good fun", "a bore", "so bad", "great film"]
    ours = api.load(result.adapter_dir)
    expected = _logits(ours, texts)
    # The head is inside the adapter: plain peft restores it onto a fresh base.
    base = api.build_base(result.adapter_dir)
    fresh_head = _logits(api.Predictor(base, ours.tokenizer, ours.meta), texts)
    assert not torch.allclose(fresh_head, expected)
    plain = PeftModel.from_pretrained(api.build_base(result.adapter_dir), str(result.adapter_dir))
    torch.testing.assert_close(_logits(api.Predictor(plain, ours.tokenizer, ours.meta), texts),
                               expected)
    merged = api.load(result.adapter_dir, merge=True)
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
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
