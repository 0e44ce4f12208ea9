"""LoRA adapters trained on mtrain's GPT, merged by PEFT into plain weights and written in
PEFT's format for each transformers class: PeftModel.from_pretrained on the base's copy gives
the merged model's logits; vocabulary growth for new labels; an adapter run tied to its base."""

import copy
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.config import TokenizerConfig, TokenizerKind
from data_pipeline.errors import InputError
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.exported.adapter import AdapterRun, check_base, merged, record_base, write_peft_adapter
from mtrain.exported.transformers_format import save_hf
from mtrain.exported.vocab_growth import added_labels, grown_rows
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import RunDir
from mtrain.training.adapters import FinetuneConfig, FinetuneMethod, add_adapters, plain_weights

SHAPES = {
    "gpt2": dict(positional="learned", bias=True),
    "neox": dict(),
    "llama": dict(block="llama", tie_embeddings=False),
}


# Embedding rows trained beside the adapters: a special token's, a musical one's, the last.
ROWS = [2, 10, 60]


def adapted(shape: dict, lora: FinetuneConfig) -> tuple[GPT, GPT, dict]:
    """(base, the base with trained-looking adapters and rows, the trained tensors)."""
    cfg = GPTConfig(vocab_size=61, n_layer=2, n_head=4, d_model=32, max_seq_len=32, **shape)
    torch.manual_seed(0)
    base = GPT(cfg)
    model = GPT(cfg)
    model.load_state_dict(base.state_dict())
    add_adapters(model, lora, seed=1, rows=ROWS)
    with torch.no_grad():  # B starts at zero: give it values a wrong mapping would show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if name.endswith(".rows"):  # and rows moved from the base's
                p.add_(torch.randn_like(p))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return base, model, adapters


@pytest.mark.parametrize("arch", SHAPES)
def test_the_peft_adapter_on_the_transformers_base_gives_the_merged_logits(arch, tmp_path):
    lora = FinetuneConfig(method=FinetuneMethod.lora, rank=4, alpha=8.0)
    base, model, adapters = adapted(SHAPES[arch], lora)
    inputs = torch.randint(61, (2, 16), generator=torch.Generator().manual_seed(0))
    save_hf(base, tmp_path / "base" / "hf", inputs)
    spec = AdapterRun(str(tmp_path / "base"), lora, torch.float32, ROWS)
    plain = merged(copy.deepcopy(base), adapters, spec)
    # The trained rows in the merged embedding (and output layer), every other row the base's.
    others = [i for i in range(61) if i not in ROWS]
    assert torch.equal(plain.wte.weight[others], base.wte.weight[others])
    torch.testing.assert_close(plain.wte.weight[ROWS], adapters["wte.rows"])
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs).logits, model.eval()(inputs).logits)
    # Not the base any more, and PEFT's merge agrees with the adapter model's own sum.
    assert (plain(inputs).logits - base(inputs).logits).abs().max() > 0.1
    with torch.no_grad():
        weights = plain_weights(model, dict(model.named_parameters()))
    reference = GPT(base.config)
    reference.load_state_dict(weights, strict=False)
    torch.testing.assert_close(plain(inputs).logits, reference.eval()(inputs).logits)
    tokenizers = (SimpleNamespace(vocab_size=61), SimpleNamespace(vocab_size=61))
    gap = write_peft_adapter(plain, spec, adapters, tokenizers, tmp_path / "adapter", inputs)
    assert gap < 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_a_wrong_adapter_mapping_is_refused(tmp_path, monkeypatch):
    from mtrain.exported import adapter

    lora = FinetuneConfig(method=FinetuneMethod.lora, rank=4)
    base, _, adapters = adapted({}, lora)
    inputs = torch.randint(61, (2, 16), generator=torch.Generator().manual_seed(0))
    save_hf(base, tmp_path / "base" / "hf", inputs)
    spec = AdapterRun(str(tmp_path / "base"), lora, torch.float32, ROWS)
    plain = merged(copy.deepcopy(base), adapters, spec)
    layers = adapter.HF_LAYERS["GPTNeoXForCausalLM"][2]  # forget NeoX's order of heads:
    monkeypatch.setitem(layers, "attn.qkv", (["attention.query_key_value"], adapter._same))
    tokenizers = (SimpleNamespace(vocab_size=61),) * 2
    with pytest.raises(RuntimeError, match="adapter mapping onto transformers is wrong"):
        write_peft_adapter(plain, spec, adapters, tokenizers, tmp_path / "adapter", inputs)


def tokenizer(labels: list[str]) -> MusicTokenizer:
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), labels)


def test_new_label_rows_start_as_the_mean_of_their_kind_and_old_ids_keep_their_rows():
    parent = tokenizer(["collection=a", "collection=b", "genre=x"])
    child = parent.extended(["collection=a", "collection=new", "mood=calm"])
    assert child.labels == [*parent.labels, "collection=new", "mood=calm"]
    assert child.lineage == {"parent": parent.hash, "added_labels": ["collection=new", "mood=calm"]}
    assert added_labels("base", parent, child) == ["collection=new", "mood=calm"]
    wte = torch.randn(parent.vocab_size, 8)
    state = {"wte.weight": wte, "lm_head.weight": wte}
    grown = grown_rows(state, parent, child)
    assert grown["lm_head.weight"] is grown["wte.weight"]  # tied stays tied
    rows = grown["wte.weight"]
    assert rows.shape == (child.vocab_size, 8)
    torch.testing.assert_close(rows[: parent.vocab_size], wte)
    a, b, x = (
        parent.label_ids({k: v})[0]
        for k, v in (("collection", "a"), ("collection", "b"), ("genre", "x"))
    )
    torch.testing.assert_close(rows[parent.vocab_size], (wte[a] + wte[b]) / 2)
    torch.testing.assert_close(rows[parent.vocab_size + 1], (wte[a] + wte[b] + wte[x]) / 3)


def test_a_tokenizer_that_does_not_extend_the_models_is_refused_in_one_line():
    parent = tokenizer(["collection=a", "collection=b"])
    for other in (tokenizer(["collection=b", "collection=a"]), tokenizer(["collection=a"])):
        with pytest.raises(InputError, match="prepare the data with tokenizer_from=base") as err:
            added_labels("base", parent, other)
        assert "\n" not in str(err.value)
    tsd = MusicTokenizer(
        build_base_tokenizer(TokenizerConfig(kind=TokenizerKind.TSD)), parent.labels
    )
    assert tsd.added_labels_over(parent) is None


def test_an_adapter_run_refuses_another_base(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (tmp_path / "base.safetensors").write_bytes(b"weights one")
    record_base(run, str(tmp_path), tmp_path / "base.safetensors", [])
    check_base(run, str(tmp_path), tmp_path / "base.safetensors")  # the same: fine
    (tmp_path / "base.safetensors").write_bytes(b"weights two")
    with pytest.raises(InputError, match="is not the base the adapters") as err:
        check_base(run, str(tmp_path), tmp_path / "base.safetensors")
    assert "\n" not in str(err.value)


def test_init_from_gives_its_shape_and_refuses_overrides_asking_for_another(tmp_path):
    import dataclasses
    import json

    from mtrain.exported.loading import init_from_shape

    theirs = GPTConfig(vocab_size=61, n_layer=3, n_head=4, d_model=96, max_seq_len=256)
    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(theirs)}))
    default = GPTConfig(dropout=0.1)  # the config's model group: tiny
    assert init_from_shape(str(tmp_path), default, []) == dataclasses.replace(theirs, dropout=0.1)
    assert init_from_shape(str(tmp_path), default, ["model.dropout=0.1"]).n_layer == 3
    with pytest.raises(InputError, match=r"overrides model=tiny ask for \(model.n_layer=2 vs 3"):
        init_from_shape(str(tmp_path), default, ["model=tiny"])
