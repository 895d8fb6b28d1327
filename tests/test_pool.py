"""ModelPool: lazy loading, body/head split, and clear errors on a bad pool."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

from mergelit.tasks import TASKS
from mergelit.pool import ModelPool


def make_pool(pool_paths, **overrides) -> ModelPool:
    finetuned = {**pool_paths["finetuned"], **overrides}
    return ModelPool(pool_paths["pretrained"], finetuned, pool_paths["tokenizer"])


def test_bodies_and_heads(pool_paths):
    pool = make_pool(pool_paths)
    assert pool.tasks == list(TASKS)
    theta0 = pool.pretrained_body()
    assert "wte.weight" in theta0 and "h.0.attn.c_attn.weight" in theta0
    assert not any(k.startswith(("transformer.", "lm_head")) for k in theta0)
    for task in TASKS:
        model = GPT2ForSequenceClassification.from_pretrained(pool_paths["finetuned"][task])
        body = pool.finetuned_body(task)
        assert body.keys() == theta0.keys()
        for key, value in model.transformer.state_dict().items():
            assert torch.equal(body[key], value)
        assert torch.equal(pool.head(task), model.score.weight)
        assert pool.head(task).shape[0] == (3 if task == "mnli" else 2)
    assert pool.body_config().pad_token_id == 50256  # the real gpt2 config has none


def test_nothing_is_loaded_until_asked(pool_paths):
    pool = ModelPool("/does/not/exist", {"cola": "/nor/this"})
    assert pool.tasks == ["cola"]
    with pytest.raises(FileNotFoundError, match="/does/not/exist"):
        pool.pretrained_body()


def test_bare_gpt2model_pretrained_checkpoint(pool_paths, tmp_path):
    body = GPT2Model.from_pretrained(pool_paths["pretrained"])
    body.save_pretrained(tmp_path / "bare")
    pool = ModelPool(str(tmp_path / "bare"), pool_paths["finetuned"], pool_paths["tokenizer"])
    reference = make_pool(pool_paths).pretrained_body()
    for key, value in pool.pretrained_body().items():
        assert torch.equal(value, reference[key])


def test_unknown_task_is_named(pool_paths):
    with pytest.raises(ValueError, match="'sst'"):
        make_pool(pool_paths, sst="x")


def test_another_architecture_names_the_config_field(pool_paths, tmp_path):
    config = GPT2Config.from_pretrained(pool_paths["finetuned"]["rte"])
    config.n_positions = 256
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rte")
    pool = make_pool(pool_paths, rte=str(tmp_path / "rte"))
    with pytest.raises(ValueError, match=r"'rte'.*n_positions 256, the pretrained model's 512"):
        pool.check()


def test_shape_mismatch_under_the_same_config_names_the_tensor(pool_paths, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "rte"
    shutil.copytree(pool_paths["finetuned"]["rte"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:256].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'wpe\.weight'.*\(256, .*\(512, "):
        make_pool(pool_paths, rte=str(folder)).check()


def test_checkpoint_without_safetensors_is_refused(pool_paths, tmp_path):
    folder = tmp_path / "cola"
    shutil.copytree(pool_paths["finetuned"]["cola"], folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    torch.save({}, folder / "pytorch_model.bin")
    pool = make_pool(pool_paths, cola=str(folder))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        pool.finetuned_body("cola")


def test_head_with_wrong_number_of_labels_is_refused(pool_paths):
    # The mrpc checkpoint (2 labels) given as mnli (3 labels).
    pool = make_pool(pool_paths, mnli=pool_paths["finetuned"]["mrpc"])
    with pytest.raises(ValueError, match="'mnli'.*2 labels.*3"):
        pool.check()


def test_a_hub_id_offline_without_a_cached_copy_is_named(pool_paths, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = make_pool(pool_paths, cola="someone/gpt2_cola_not_downloaded")
    with pytest.raises(FileNotFoundError, match=r"'someone/gpt2_cola_not_downloaded'.*offline"):
        pool.check()


def test_reused_parts_are_kept_for_one_group_and_only_in_sweeps(pool_paths):
    pool = make_pool(pool_paths)
    calls = []
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert pool.reused("a", "k", compute) == 1 and pool.reused("a", "k", compute) == 2  # a plain run keeps nothing
    pool.keep_reused(True)
    assert pool.reused("a", "k", compute) == 3 and pool.reused("a", "k", compute) == 3
    assert pool.reused("b", "k", compute) == 4 and pool.reused("a", "k", compute) == 3  # a wrapper and its base
    assert pool.reused("c", "k", compute) == 5  # a third group drops the least recently used ("b")
    assert pool.reused("a", "k", compute) == 3 and pool.reused("b", "k", compute) == 6
    pool.keep_reused(False)
    assert pool.reused("a", "k", compute) == 7


ARCHITECTURE_CHANGES = [
    ("n_layer", 3), ("n_embd", 32), ("n_head", 4), ("vocab_size", 50000), ("n_positions", 256),
    ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6), ("n_inner", 128),
    ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
]


@pytest.mark.parametrize("field, value", ARCHITECTURE_CHANGES, ids=[f for f, _ in ARCHITECTURE_CHANGES])
def test_every_architecture_field_is_compared(field, value, pool_paths, tmp_path):
    import json

    folder = tmp_path / "rte"
    shutil.copytree(pool_paths["finetuned"]["rte"], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"'rte'.*{field} {value!r}"):
        make_pool(pool_paths, rte=str(folder)).check()


@pytest.mark.parametrize("name", ["score.bias", "transformer.h.2.ln_1.weight", "classifier.weight"])
def test_a_tensor_the_body_does_not_have_is_refused(name, pool_paths, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "rte"
    shutil.copytree(pool_paths["finetuned"]["rte"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state[name] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'rte'.*holds a tensor '{name}'.*silently ignored"):
        make_pool(pool_paths, rte=str(folder)).check()


def test_a_missing_tensor_is_refused(pool_paths, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "rte"
    shutil.copytree(pool_paths["finetuned"]["rte"], folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'rte'.*no tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        make_pool(pool_paths, rte=str(folder)).check()


def test_a_pretrained_config_that_contradicts_its_own_weights_blames_the_pretrained_model(pool_paths, tmp_path):
    import json

    folder = tmp_path / "pretrained"
    shutil.copytree(pool_paths["pretrained"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = 1024  # its wpe has 512 rows
    (folder / "config.json").write_text(json.dumps(config))
    pool = ModelPool(str(folder), pool_paths["finetuned"], pool_paths["tokenizer"])
    with pytest.raises(ValueError, match=r"'wpe\.weight' of the pretrained model.*\(512, .*\(1024, "):
        pool.check()


def test_duplicate_task_names_are_refused_everywhere(tmp_path):
    from mergelit.configfile import load_yaml
    from mergelit.pool import fusionbench_pool_args
    from mergelit.tasks import ordered_tasks

    with pytest.raises(ValueError, match="'sst2' is listed twice"):
        ordered_tasks(["sst2", "cola", "sst2"])
    with pytest.raises(ValueError, match="names task 'sst2' twice.*'sst2'.*'gpt2_sst2'"):
        fusionbench_pool_args({"models": [{"name": "_pretrained_", "path": "gpt2"}, {"name": "sst2", "path": "a"},
                                          {"name": "gpt2_sst2", "path": "b"}]})
    config = tmp_path / "pool.yaml"
    config.write_text("pool:\n  finetuned:\n    sst2: a\n    cola: b\n    sst2: c\n")
    with pytest.raises(ValueError, match=r"pool\.yaml.*'sst2' appears twice.*lines 3 and 5"):
        load_yaml(config)
