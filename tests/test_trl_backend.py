"""onelayer_fast.trl.OneLayerGRPOTrainer against TRL's own GRPOTrainer (the [trl] extra; skipped without it).

The same script, seed, dataset and reward function run through TRL's GRPOTrainer with only layer L trainable
(beta > 0: TRL loads its full reference model) and through OneLayerGRPOTrainer (one-layer reference, cached
prefix, onelayer_fast's loss), generation included: the trained layers must agree to float32 rounding.
"""
from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl", reason="the [trl] extra is not installed")
datasets = pytest.importorskip("datasets", reason="the [trl] extra is not installed")

from onelayer_fast.checkpoint import merge_checkpoint, read_meta  # noqa: E402
from onelayer_fast.trl import (  # noqa: E402
    SUPPORTED_TRL_VERSIONS,
    OneLayerGRPOTrainer,
    check_trl_version,
    loss_config_from_trl,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
LAYER = 1
VOCAB = 128
PROMPTS = ["1+2=", "33+4=", "5+66=", "7+8=", "12+3=", "4+56=", "9+9=", "61+2="]  # lengths differ: left padding


def qwen2_tiny(seed: int = 0):
    """A random-init 3-layer Qwen2. The EOS row of the tied embedding is drawn large (its logit then has a std
    of ~5 where every other token's is ~0.1) so that some completions end early (masked tails) and others run to
    the limit. (tests/test_trl_lanes.py builds its models here too.)"""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[1] = 1.0 * torch.randn(config.hidden_size)
    return model


def tiny_model(path, seed: int = 0):
    """`qwen2_tiny`, saved where TRL reloads its reference model from."""
    model = qwen2_tiny(seed)
    model.save_pretrained(path)
    model.config._name_or_path = str(path)
    return model


def digit_share(completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def trl_args(out, **overrides):
    settings = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                    beta=0.04, max_steps=3, learning_rate=1e-2, use_cpu=True, bf16=False,
                    gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                    disable_tqdm=True, seed=7, shuffle_dataset=False)
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def train(trainer_class, tmp_path, layer_kwargs=None, **overrides):
    from bench.tokenizer import bench_tokenizer

    model = tiny_model(tmp_path / "model")
    if trainer_class is trl.GRPOTrainer:  # how a TRL user trains one layer
        model.requires_grad_(False)
        model.model.layers[LAYER].requires_grad_(True)
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])
    trainer = trainer_class(model=model, reward_funcs=[digit_share], args=trl_args(tmp_path / trainer_class.__name__, **overrides),
                            train_dataset=data, processing_class=bench_tokenizer(VOCAB), **(layer_kwargs or {}))
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in model.model.layers[LAYER].state_dict().items()}


def relative_difference(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).double().pow(2).sum() for k in a)
    return float(num.sqrt() / sum(a[k].double().pow(2).sum() for k in a).sqrt())


# Each case runs TRL and onelayer_fast for 3 optimizer steps (generation included), ~1 s each on 2 CPU cores.
CASES = {
    "dapo-mu1": dict(num_iterations=1),
    "dapo-mu2": dict(num_iterations=2),
    "grpo-mu2": dict(num_iterations=2, loss_type="grpo"),
    "dr_grpo-mu1": dict(num_iterations=1, loss_type="dr_grpo"),
    "bnpo-accum2": dict(num_iterations=2, loss_type="bnpo", per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "dapo-accum2": dict(num_iterations=1, per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "sequence-is-t0.7": dict(num_iterations=2, importance_sampling_level="sequence", temperature=0.7),
    "ref-sync": dict(num_iterations=1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6),
    "no-bias-correction-beta0": dict(num_iterations=2, beta=0.0, use_bias_correction_kl=False),
    "cispo-mu2": dict(num_iterations=2, loss_type="cispo", epsilon_high=1.2),
    "sapo-mu2": dict(num_iterations=2, loss_type="sapo"),
    "luspo-sequence": dict(num_iterations=2, loss_type="luspo", importance_sampling_level="sequence"),
    "vespo-mu2": dict(num_iterations=2, loss_type="vespo"),
    "entropy-bonus-and-mask": dict(num_iterations=2, entropy_coef=0.05, top_entropy_quantile=0.5),
    "entropy-bonus-grpo-accum2": dict(num_iterations=1, loss_type="grpo", entropy_coef=0.05,
                                      per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "off-policy-mask": dict(num_iterations=2, off_policy_mask_threshold=0.0, epsilon=0.1),
    "delta-epsilon-high": dict(num_iterations=2, delta=1.5, epsilon_high=0.28),
    # An optimizer step falls between generation and a micro-batch's first use: old log-probs must be taken
    # at generation time, not at first use.
    "steps-per-generation2-mu1": dict(num_iterations=1, per_device_train_batch_size=4, steps_per_generation=2),
    "steps-per-generation2-mu2": dict(num_iterations=2, per_device_train_batch_size=4, steps_per_generation=2,
                                      max_steps=4),
    # Adaptive entropy control (target above every measured entropy: the coefficient grows and applies from
    # the second step on), with its window over accumulated micro-batches and the entropy subset.
    "adaptive-entropy-mu2": dict(num_iterations=2, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0,
                                 entropy_coef_delta=0.02),
    "adaptive-entropy-accum2-quantile": dict(num_iterations=1, loss_type="grpo", use_adaptive_entropy=True,
                                             entropy_coef=0.05, entropy_target=10.0, top_entropy_quantile=0.5,
                                             per_device_train_batch_size=4, gradient_accumulation_steps=2),
    # Generation without a KV cache: its prefix states cannot be reused, the update computes its own.
    "no-kv-cache-mu2": dict(num_iterations=2, generation_kwargs={"use_cache": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_trained_layer_as_trl(tmp_path, case):
    overrides = CASES[case]
    reference, trl_layer = train(trl.GRPOTrainer, tmp_path / "trl", **overrides)
    ours, our_layer = train(OneLayerGRPOTrainer, tmp_path / "olf", layer_kwargs={"layer": LAYER}, **overrides)
    initial = tiny_model(tmp_path / "init").model.layers[LAYER].state_dict()
    moved = relative_difference({k: trl_layer[k] - initial[k] for k in initial}, {k: torch.zeros_like(v) for k, v in initial.items()})
    assert moved > 1e-3, "the layer barely trained: the comparison would prove nothing"
    assert relative_difference(trl_layer, our_layer) < 1e-5
    # The update's difference relative to how far the layer moved: the stricter measure.
    assert relative_difference({k: trl_layer[k] - initial[k] for k in initial},
                               {k: our_layer[k] - initial[k] for k in initial}) < 1e-4
    # The rollouts were the same (same rewards), and some completions ended early (masks exercised).
    trl_rewards = [h["reward"] for h in reference.state.log_history if "reward" in h]
    our_rewards = [h["reward"] for h in ours.state.log_history if "reward" in h]
    assert trl_rewards == our_rewards and len(trl_rewards) >= 1
    lengths = [h["completions/mean_length"] for h in ours.state.log_history if "completions/mean_length" in h]
    assert any(length < 8 for length in lengths)
    # TRL logs the mean token entropy at every loss call; so does OneLayerGRPOTrainer (entropy_metric)
    trl_entropy = [h["entropy"] for h in reference.state.log_history if "entropy" in h]
    our_entropy = [h["entropy"] for h in ours.state.log_history if "entropy" in h]
    assert our_entropy == pytest.approx(trl_entropy, rel=1e-4) and len(trl_entropy) >= 3
    if overrides.get("use_adaptive_entropy") or overrides.get("entropy_coef"):
        trl_coef = [h["entropy_coef"] for h in reference.state.log_history if "entropy_coef" in h]
        our_coef = [h["entropy_coef"] for h in ours.state.log_history if "entropy_coef" in h]
        assert our_coef == pytest.approx(trl_coef) and len(trl_coef) == 3
    if overrides.get("beta", 0.04) > 0:
        trl_kl = [h["kl"] for h in reference.state.log_history if "kl" in h]
        our_kl = [h["kl"] for h in ours.state.log_history if "kl" in h]
        assert our_kl == pytest.approx(trl_kl, rel=1e-4, abs=1e-7)
        assert max(trl_kl) > 0


def test_prefix_states_come_from_generation(tmp_path):
    """With HF generation and a KV cache the update runs no prefix forward: the states entering the layer are
    those generation computed. Float64: they equal a fresh prefix forward over the same rows at every position
    the update reads (all but a completion's last token, which generation never fed back). Where the records
    do not fit the rows (other rows, another order, other prompt padding) the trainer computes the prefix."""
    torch.set_default_dtype(torch.float64)
    try:
        trainer, _ = train(OneLayerGRPOTrainer, tmp_path / "a", layer_kwargs={"layer": LAYER}, num_iterations=2,
                           max_steps=2)
        assert trainer.prefix_passes == 0
        captured = {}
        original = trainer._prefix

        def spy(input_ids, attention_mask):
            captured["rows"] = (input_ids, attention_mask, trainer._capture)
            return original(input_ids, attention_mask)

        trainer._prefix = spy
        trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
        input_ids, attention_mask, capture = captured["rows"]
        from_generation = capture.prefix_for(input_ids, attention_mask)
        fresh = trainer.policy.prefix_layout(trainer._layout(input_ids, attention_mask, 1)).hidden
        read = attention_mask.bool().clone()
        read[:, -1] = False  # the last position predicts no completion token
        assert read[:, -2].any() and (~attention_mask.bool()).any()  # left padding and full-length rows exist
        torch.testing.assert_close(from_generation[read], fresh[read], rtol=1e-9, atol=1e-9)
        assert capture.prefix_for(input_ids.flip(0), attention_mask.flip(0)) is None
        assert capture.prefix_for(input_ids[1:], attention_mask[1:]) is None
        shifted = attention_mask.clone()
        shifted[:, 0] = 1
        assert capture.prefix_for(input_ids, shifted) is None
        assert capture.prefix_for(torch.cat([input_ids, input_ids[:, -2:]], 1),
                                  torch.cat([attention_mask, attention_mask[:, -2:]], 1)) is None
    finally:
        torch.set_default_dtype(torch.float32)
    no_cache, _ = train(OneLayerGRPOTrainer, tmp_path / "b", layer_kwargs={"layer": LAYER}, num_iterations=2,
                        max_steps=2, generation_kwargs={"use_cache": False})
    assert no_cache.prefix_passes == 1  # one generation batch, one prefix forward


def fixed_rollout(prompts, trainer, sampling_logprobs: bool = False):
    """TRL's rollout_func: the j-th completion of a prompt in a call is a fixed function of (prompt, j), lengths
    2 to 8 (the short ones ending in EOS), so that runs compared with each other train on the same rollouts.
    sampling_logprobs: also the sampler's log-probs (as vLLM returns them), drawn around the model's (about
    -log(VOCAB)) so that importance-sampling ratios spread over both sides of 1 (and past TRL's bounds);
    otherwise None."""
    import random
    from collections import Counter

    seen = Counter()
    prompt_ids, completion_ids, logprobs = [], [], []
    for text in prompts:
        draw = random.Random(f"{text}|{seen[text]}")
        seen[text] += 1
        length = draw.randint(2, 8)
        ids = [draw.randrange(3, VOCAB) for _ in range(length)]
        if length < 8:
            ids[-1] = 1
        prompt_ids.append(trainer.processing_class(text)["input_ids"])
        completion_ids.append(ids)
        logprobs.append([-4.85 + draw.uniform(-0.6, 0.6) for _ in ids])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "logprobs": logprobs if sampling_logprobs else None}


def sampling_rollout(prompts, trainer):
    """`fixed_rollout` with the sampler's log-probs: vLLM's rollouts, stood in for."""
    return fixed_rollout(prompts, trainer, sampling_logprobs=True)


def train_with_fake_vllm(trainer_class, tmp_path, mode, layer_kwargs=None, **overrides):
    """A run whose rollouts carry sampling log-probs as vLLM's do, with TRL's vLLM importance-sampling
    correction switched on after construction (vLLM itself is not installed: `use_vllm=True` would load it)."""
    from types import SimpleNamespace

    from bench.tokenizer import bench_tokenizer

    model = tiny_model(tmp_path / "model")
    if trainer_class is trl.GRPOTrainer:
        model.requires_grad_(False)
        model.model.layers[LAYER].requires_grad_(True)
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])
    trainer = trainer_class(model=model, reward_funcs=[digit_share], rollout_func=sampling_rollout,
                            args=trl_args(tmp_path / trainer_class.__name__, **overrides), train_dataset=data,
                            processing_class=bench_tokenizer(VOCAB), **(layer_kwargs or {}))
    if mode is not None:  # else: rollouts with sampling log-probs, no correction (a rollout_func's, say)
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.vllm_importance_sampling_mode = mode
        trainer.vllm_generation = SimpleNamespace(sync_weights=lambda: None)
        trainer._last_loaded_step = 0
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in model.model.layers[LAYER].state_dict().items()}


@pytest.mark.parametrize("mode, overrides", [
    ("sequence_mask", dict(num_iterations=1, vllm_importance_sampling_clip_max=1.5)),
    ("token_truncate", dict(num_iterations=2, vllm_importance_sampling_clip_min=0.8)),
    ("token_mask", dict(num_iterations=2, vllm_importance_sampling_clip_max=1.5, loss_type="grpo")),
    # vespo with token_truncate: with token_mask's zero ratios its gamma weight underflows to ~1e-12 here, a
    # gradient of rounding noise that Adam would scale up to a whole step on either side
    ("token_truncate", dict(num_iterations=2, loss_type="vespo", vllm_importance_sampling_clip_min=0.8)),
    # the off-policy mask measures drift from the sampler's log-probs, with or without the correction
    ("token_truncate", dict(num_iterations=2, off_policy_mask_threshold=0.05)),
    (None, dict(num_iterations=2, off_policy_mask_threshold=0.05)),
], ids=["sequence_mask-mu1", "token_truncate-mu2", "token_mask-grpo-mu2", "token_truncate-vespo-mu2",
        "token_truncate-off-policy", "no-correction-off-policy"])
def test_vllm_importance_sampling_correction_same_as_trl(tmp_path, mode, overrides):
    """TRL's vLLM importance-sampling correction (TRL computes the ratio at generation; the loss multiplies it
    into the policy term, vespo into its gamma weight): the same trained layer as TRL's own GRPOTrainer."""
    reference, trl_layer = train_with_fake_vllm(trl.GRPOTrainer, tmp_path / "trl", mode, **overrides)
    ours, our_layer = train_with_fake_vllm(OneLayerGRPOTrainer, tmp_path / "olf", mode, layer_kwargs={"layer": LAYER},
                                           **overrides)
    initial = tiny_model(tmp_path / "init").model.layers[LAYER].state_dict()
    assert relative_difference({k: trl_layer[k] - initial[k] for k in initial},
                               {k: our_layer[k] - initial[k] for k in initial}) < 1e-4
    assert relative_difference(trl_layer, our_layer) < 1e-5
    ratios = [(h["sampling/importance_sampling_ratio/min"], h["sampling/importance_sampling_ratio/max"])
              for h in ours.state.log_history if "sampling/importance_sampling_ratio/min" in h]
    trl_ratios = [(h["sampling/importance_sampling_ratio/min"], h["sampling/importance_sampling_ratio/max"])
                  for h in reference.state.log_history if "sampling/importance_sampling_ratio/min" in h]
    flat = [value for pair in ratios for value in pair]
    assert flat == pytest.approx([value for pair in trl_ratios for value in pair], rel=1e-4)
    if mode is not None:
        assert len(ratios) >= 1 and min(low for low, _ in ratios) < max(high for _, high in ratios)  # it acts

def test_old_logprobs_at_first_use_only_when_no_step_can_intervene(tmp_path, monkeypatch):
    """With TRL's default steps_per_generation (= gradient accumulation) the old log-probs are the first
    iteration's own (no pass at generation time); with an optimizer step in between they are taken at
    generation time. Either way they are filled in before the second iteration uses them."""
    seen = []
    original = OneLayerGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        pending = inputs.get("onelayer_old_logps_pending")
        seen.append((None if pending is None else bool(pending.any()),
                     bool(torch.isnan(inputs["old_per_token_logps"]).any())))
        return original(self, model, inputs)

    monkeypatch.setattr(OneLayerGRPOTrainer, "_compute_loss", spy)
    train(OneLayerGRPOTrainer, tmp_path / "a", layer_kwargs={"layer": LAYER}, num_iterations=2, max_steps=2)
    assert seen == [(True, True), (False, False)]  # first use fills the placeholder in
    seen.clear()
    train(OneLayerGRPOTrainer, tmp_path / "b", layer_kwargs={"layer": LAYER}, num_iterations=2, max_steps=2,
          per_device_train_batch_size=4, steps_per_generation=2)
    assert seen == [(None, False)] * 2  # taken at generation time: no placeholder


def test_no_reference_model_and_only_the_layer_trains(tmp_path):
    trainer, _ = train(OneLayerGRPOTrainer, tmp_path, layer_kwargs={"layer": LAYER}, max_steps=1)
    assert trainer.ref_model is None  # TRL's full reference model was never loaded
    assert trainer.beta == 0.04 and trainer.args.beta == 0.04
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainer.model.model.layers[LAYER].parameters()}


def test_one_layer_checkpoints_merge_and_resume(tmp_path):
    from bench.tokenizer import bench_tokenizer
    from onelayer_fast.checkpoint import load_layer

    straight, layer = train(OneLayerGRPOTrainer, tmp_path / "a", layer_kwargs={"layer": LAYER}, max_steps=3,
                            save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "a" / "OneLayerGRPOTrainer" / "checkpoint-2"
    assert (checkpoint / "layer.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert read_meta(checkpoint)["layer"] == LAYER and read_meta(checkpoint)["step"] == 2
    assert (checkpoint / "optimizer.pt").is_file()  # the Trainer's own state, for resuming

    at_step_2 = tiny_model(tmp_path / "base")
    merged = merge_checkpoint(at_step_2, checkpoint, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(merged)
    for key, value in whole.model.layers[LAYER].state_dict().items():
        torch.testing.assert_close(value, at_step_2.model.layers[LAYER].state_dict()[key], rtol=0, atol=0)
    assert relative_difference(layer, at_step_2.model.layers[LAYER].state_dict()) > 1e-4  # step 3 moved it

    # Resuming from step 2 loads the one layer, the Trainer's optimizer, scheduler and RNG state, and ends
    # where the uninterrupted run ended.
    model = tiny_model(tmp_path / "resume-model")
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])
    resumed = OneLayerGRPOTrainer(model=model, reward_funcs=[digit_share], train_dataset=data, layer=LAYER,
                                  args=trl_args(tmp_path / "b", max_steps=3), processing_class=bench_tokenizer(VOCAB))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert relative_difference(layer, {k: v.detach() for k, v in model.model.layers[LAYER].state_dict().items()}) < 1e-6
    assert load_layer(tiny_model(tmp_path / "c"), checkpoint)["trainer"] == "onelayer_fast.trl.OneLayerGRPOTrainer"


def test_adaptive_entropy_state_resumes(tmp_path):
    """The entropy controller's state lives in TRL's own attributes, so TRL's checkpoint saves it and a resumed
    run continues with the coefficient and last entropy it had, ending where the straight run ended."""
    from bench.tokenizer import bench_tokenizer

    knobs = dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0, entropy_coef_delta=0.02,
                 num_iterations=2)
    straight, layer = train(OneLayerGRPOTrainer, tmp_path / "a", layer_kwargs={"layer": LAYER}, max_steps=3,
                            save_strategy="steps", save_steps=2, **knobs)
    checkpoint = tmp_path / "a" / "OneLayerGRPOTrainer" / "checkpoint-2"
    assert (checkpoint / "entropy_ctrl_state.json").is_file()
    model = tiny_model(tmp_path / "resume-model")
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])
    resumed = OneLayerGRPOTrainer(model=model, reward_funcs=[digit_share], train_dataset=data, layer=LAYER,
                                  args=trl_args(tmp_path / "b", max_steps=3, **knobs),
                                  processing_class=bench_tokenizer(VOCAB))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.entropy_coef == pytest.approx(straight.entropy_coef) and straight.entropy_coef > 0.05
    assert resumed._last_world_entropy == pytest.approx(straight._last_world_entropy, rel=1e-5)
    assert relative_difference(layer, {k: v.detach() for k, v in model.model.layers[LAYER].state_dict().items()}) < 1e-6


def test_checkpoint_of_another_layer_is_refused(tmp_path):
    from bench.tokenizer import bench_tokenizer

    _, _ = train(OneLayerGRPOTrainer, tmp_path / "a", layer_kwargs={"layer": LAYER}, max_steps=1,
                 save_strategy="steps", save_steps=1)
    checkpoint = tmp_path / "a" / "OneLayerGRPOTrainer" / "checkpoint-1"
    model = tiny_model(tmp_path / "m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])
    other = OneLayerGRPOTrainer(model=model, reward_funcs=[digit_share], train_dataset=data, layer=0,
                                args=trl_args(tmp_path / "b", max_steps=2), processing_class=bench_tokenizer(VOCAB))
    with pytest.raises(ValueError, match="trained layer 1, this trainer trains layer 0"):
        other.train(resume_from_checkpoint=str(checkpoint))
    for key, value in model.state_dict().items():  # refused before anything was copied
        assert torch.equal(value, before[key]), key


def test_unsupported_settings_fail_clearly(tmp_path):
    from bench.tokenizer import bench_tokenizer

    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])

    def build(layer=LAYER, **overrides):
        return OneLayerGRPOTrainer(model=tiny_model(tmp_path / "m"), reward_funcs=[digit_share], train_dataset=data,
                                   args=trl_args(tmp_path / "out", **overrides), processing_class=bench_tokenizer(VOCAB),
                                   layer=layer)

    with pytest.raises(ValueError, match="out of range"):
        build(layer=3)
    # layer=[...] builds a LaneGRPOTrainer (tests/test_trl_lanes.py); a subclass of OneLayerGRPOTrainer trains one layer
    class OneLayerOnly(OneLayerGRPOTrainer):
        pass

    with pytest.raises(NotImplementedError, match="lanes"):
        OneLayerOnly(model=tiny_model(tmp_path / "m"), reward_funcs=[digit_share], train_dataset=data, layer=[0, 1],
                     args=trl_args(tmp_path / "out"), processing_class=bench_tokenizer(VOCAB))
    with pytest.raises(ValueError, match="sync_ref_model=True needs beta > 0"):
        build(beta=0.0, sync_ref_model=True)
    with pytest.raises(RuntimeError, match="supports TRL"):
        check_trl_version("1.15.2")
    check_trl_version(SUPPORTED_TRL_VERSIONS[-1] + ".0")


def test_loss_config_follows_trl_names():
    config = loss_config_from_trl(trl.GRPOConfig(output_dir="unused", beta=0.1, epsilon=0.3, epsilon_high=0.28,
                                                 loss_type="grpo", temperature=0.9, max_completion_length=33,
                                                 use_cpu=True, report_to="none"))
    assert (config.beta, config.epsilon_low, config.epsilon_high, config.loss_type) == (0.1, 0.3, 0.28, "grpo")
    assert (config.temperature, config.max_completion_length, config.use_bias_correction_kl) == (0.9, 33, True)
    same = loss_config_from_trl(trl.GRPOConfig(output_dir="unused", epsilon=0.25, use_cpu=True, report_to="none"))
    assert same.epsilon_high == 0.25  # TRL: epsilon_high defaults to epsilon


def test_model_given_as_a_path(tmp_path):
    """As with GRPOTrainer, `model` may be a path: TRL loads it, then the one layer is split off it."""
    from bench.tokenizer import bench_tokenizer

    tiny_model(tmp_path / "model")
    data = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = OneLayerGRPOTrainer(model=str(tmp_path / "model"), reward_funcs=digit_share, layer=-1,
                                  args=trl_args(tmp_path / "out", max_steps=1), train_dataset=data,
                                  processing_class=bench_tokenizer(VOCAB))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed), changed
