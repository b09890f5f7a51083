"""Fine-tuning loops run end to end on converted models: transformers' ``Trainer`` and
``Seq2SeqTrainer``, accelerate's ``Accelerator`` (with its checkpoints and mixed precision),
``init_empty_weights`` and dispatch, ``save_model`` and ``from_pretrained`` both ways, and
``generate()`` with dynamic and static caches. Every model is built from a tiny config with
random weights, every dataset is a list of dicts in memory; the oracle is always the original
model run through the same loop with the same seeds. ``convert(model)`` of the LLaMA family
runs its recipe's torch operations, so its runs agree to the bit; BERT's ``nn.LayerNorm``
and the fused layers run the kernels (rounded once from float64), so theirs agree to float
rounding, which Adam's normalized steps carry into the weights."""

import copy
import os
import shutil
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from normlab.torch import FusedAddRMSNorm, convert  # noqa: E402

_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, attention_dropout=0.0)
# the kernels against transformers' float32 arithmetic, after a few AdamW steps
_ROUNDING = dict(rtol=1e-4, atol=1e-4)


def _causal(family="llama", **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**_TINY, **extra}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights away from their initial ones (and Gemma's zeros)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def _bert():
    config = AutoConfig.for_model("bert", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def _converted(model, fuse):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every norm of these models is converted
        return convert(copy.deepcopy(model), fuse=fuse)


def _texts(n=8, longest=7, seed=3, classes=None):
    """Token sequences of lengths 3 to ``longest``, labelled with themselves (a causal LM) or
    with one of ``classes``."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids = torch.randint(3, 100, (int(torch.randint(3, longest + 1, (1,), generator=generator)),),
                            generator=generator)
        label = ids.clone() if classes is None else torch.randint(0, classes, (), generator=generator)
        samples.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=label))
    return samples


def _pad(batch):
    """Right padding with an attention mask; padded labels are ignored by the loss."""
    length = max(len(sample["input_ids"]) for sample in batch)

    def pad(t, value):
        return torch.cat([t, t.new_full((length - len(t),), value)])

    labels = [sample["labels"] for sample in batch]
    return dict(input_ids=torch.stack([pad(s["input_ids"], 0) for s in batch]),
                attention_mask=torch.stack([pad(s["attention_mask"], 0) for s in batch]),
                labels=torch.stack([pad(t, -100) if t.dim() else t for t in labels]))


def _train(model, out, train, resume=None, eval_dataset=None, **options):
    args = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                logging_steps=1, report_to=[], seed=7, save_strategy="no", disable_tqdm=True, log_level="error")
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **options}), train_dataset=train,
                      eval_dataset=eval_dataset, data_collator=_pad)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logged(trainer, key="loss"):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _assert_same_weights(actual, expected, tolerance=None):
    actual, expected = actual.state_dict(), expected.state_dict()
    assert list(actual) == list(expected)
    for name in expected:
        if tolerance is None:
            assert torch.equal(actual[name], expected[name]), name
        else:
            torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=name)


_OPTIONS = {
    "accumulation, clipping, decay and label smoothing": dict(
        gradient_accumulation_steps=2, per_device_train_batch_size=1, max_grad_norm=0.1, weight_decay=0.5,
        label_smoothing_factor=0.1),
    "bf16": dict(bf16=True),
    "checkpointing, grouped by length, tokens seen and neftune": dict(
        gradient_checkpointing=True, train_sampling_strategy="group_by_length", include_num_input_tokens_seen=True,
        neftune_noise_alpha=5.0),
}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
@pytest.mark.parametrize("option", list(_OPTIONS))
def test_trainer_trains_a_converted_llama_as_it_trains_the_original(option, fuse, tmp_path):
    model = _causal()
    converted = _converted(model, fuse)
    train = _texts()
    expected = _train(model, tmp_path / "original", train, **_OPTIONS[option])
    actual = _train(converted, tmp_path / "converted", train, **_OPTIONS[option])
    tolerance = _ROUNDING if fuse else None
    torch.testing.assert_close(_logged(actual), _logged(expected), **(tolerance or dict(rtol=0, atol=0)))
    _assert_same_weights(actual.model, expected.model, tolerance)
    assert actual.state.num_input_tokens_seen == expected.state.num_input_tokens_seen
    assert Trainer.get_decay_parameter_names(None, converted) == Trainer.get_decay_parameter_names(None, model)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_trainer_trains_evaluates_and_predicts_a_converted_bert_as_the_original(bf16, tmp_path):
    # BERT's nn.LayerNorm twins: the kernels in float32, torch's own op on bfloat16
    model = _bert()
    converted = _converted(model, fuse=False)
    assert Trainer.get_decay_parameter_names(None, converted) == Trainer.get_decay_parameter_names(None, model)
    train, held_out = _texts(classes=3), _texts(n=4, seed=9, classes=3)
    options = dict(bf16=bf16, weight_decay=0.1, eval_strategy="steps", eval_steps=2, eval_dataset=held_out,
                   max_steps=4)
    expected = _train(model, tmp_path / "original", train, **options)
    actual = _train(converted, tmp_path / "converted", train, **options)
    torch.testing.assert_close(_logged(actual), _logged(expected), **_ROUNDING)
    torch.testing.assert_close(_logged(actual, "eval_loss"), _logged(expected, "eval_loss"), **_ROUNDING)
    _assert_same_weights(actual.model, expected.model, _ROUNDING)
    torch.testing.assert_close(actual.predict(held_out).predictions, expected.predict(held_out).predictions,
                               **_ROUNDING)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_a_converted_model_resumed_from_a_trainer_checkpoint_equals_its_uninterrupted_run(fuse, tmp_path):
    converted = _converted(_causal(), fuse)
    train = _texts()
    options = dict(max_steps=6, save_strategy="steps", save_steps=2)
    uninterrupted = _train(copy.deepcopy(converted), tmp_path / "full", train, **options)
    _train(copy.deepcopy(converted), tmp_path / "cut", train, **options)
    for step in (4, 6):  # as if stopped after the checkpoint of step 2
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{step}")
    resumed = _train(copy.deepcopy(converted), tmp_path / "cut", train, resume=True, **options)
    assert _logged(resumed)[-4:] == _logged(uninterrupted)[-4:]
    _assert_same_weights(resumed.model, uninterrupted.model)
    assert isinstance(resumed.model.model.layers[0].post_attention_layernorm, FusedAddRMSNorm) == fuse


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_trainer_save_model_of_a_converted_model_loads_into_the_plain_class_and_back(fuse, tmp_path):
    model = _causal(tie_word_embeddings=True)
    converted = _converted(model, fuse)
    trainer = _train(converted, tmp_path / "run", _texts(), max_steps=2)
    trainer.save_model(tmp_path / "saved")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # the converted checkpoint, unconverted
    assert not any(type(m).__module__.startswith("normlab") for m in plain.modules())
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    _assert_same_weights(plain, trainer.model)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(ids).logits, plain.eval()(ids).logits,
                                   **(_ROUNDING if fuse else dict(rtol=0, atol=0)))
    again = convert(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), fuse=fuse)  # and converted again
    _assert_same_weights(again, trainer.model)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_load_best_model_at_end_restores_the_same_checkpoint_into_a_fused_model(tmp_path):
    model = _causal(tie_word_embeddings=True)
    fused = _converted(model, fuse=True)
    options = dict(eval_dataset=_texts(n=4, seed=9), eval_strategy="steps", eval_steps=1, save_strategy="steps",
                   save_steps=1, load_best_model_at_end=True, learning_rate=0.05)
    expected = _train(model, tmp_path / "original", _texts(), **options)
    actual = _train(fused, tmp_path / "fused", _texts(), **options)
    assert os.path.basename(actual.state.best_model_checkpoint) == os.path.basename(
        expected.state.best_model_checkpoint)
    assert actual.model is fused and isinstance(fused.model.layers[0].post_attention_layernorm, FusedAddRMSNorm)
    assert fused.lm_head.weight is fused.model.embed_tokens.weight
    _assert_same_weights(fused, expected.model, _ROUNDING)


def _accelerate_loop(model, mixed_precision, tmp_path, save_after=None, load=None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state(True)  # (one state a process: a Trainer's, or another precision's)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=2)
    set_seed(11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(_texts(n=16), batch_size=2, shuffle=True, collate_fn=_pad)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if load is not None:
        accelerator.load_state(load)
    losses = []
    for step, batch in enumerate(loader):
        if load is not None and step < 4:
            continue  # (the batches before the saved state)
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        if step + 1 == save_after:
            accelerator.save_state(tmp_path)
    return accelerator.unwrap_model(model), losses, accelerator.get_state_dict(model)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_an_accelerate_loop_and_its_saved_state_train_a_converted_model_as_the_original(fuse, mixed_precision,
                                                                                       tmp_path):
    model = _causal()
    converted = _converted(model, fuse)
    # autocast rounds the norms' float32 outputs to bfloat16 for the next matmul: a last-ulp
    # difference of the kernels there moves that product by a bfloat16 unit
    tolerance = (dict(rtol=1e-3, atol=1e-3) if mixed_precision == "bf16" else _ROUNDING) if fuse else None
    expected, expected_losses, expected_state = _accelerate_loop(copy.deepcopy(model), mixed_precision,
                                                                 tmp_path / "original", save_after=4)
    actual, actual_losses, actual_state = _accelerate_loop(copy.deepcopy(converted), mixed_precision,
                                                           tmp_path / "converted", save_after=4)
    torch.testing.assert_close(actual_losses, expected_losses, **(tolerance or dict(rtol=0, atol=0)))
    _assert_same_weights(actual, expected, tolerance)
    assert list(actual_state) == list(expected_state)
    assert isinstance(actual.model.layers[0].post_attention_layernorm, FusedAddRMSNorm) == fuse
    # from the state saved after four steps: the original's last four steps
    resumed, resumed_losses, _ = _accelerate_loop(copy.deepcopy(converted), mixed_precision, tmp_path / "again",
                                                  load=tmp_path / "converted")
    original_resumed, original_losses, _ = _accelerate_loop(copy.deepcopy(model), mixed_precision,
                                                            tmp_path / "again", load=tmp_path / "original")
    torch.testing.assert_close(resumed_losses, original_losses, **(tolerance or dict(rtol=0, atol=0)))
    _assert_same_weights(resumed, original_resumed, tolerance)


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_a_model_built_empty_then_converted_loads_its_checkpoint_and_dispatches_with_the_original_logits(fuse,
                                                                                                        tmp_path):
    from accelerate import dispatch_model, init_empty_weights, load_checkpoint_and_dispatch

    model = _causal().eval()
    model.save_pretrained(tmp_path / "checkpoint")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config)
    empty = _converted(empty, fuse)  # (convert deep-copies: a copy on the meta device)
    assert isinstance(empty.model.norm, torch.nn.RMSNorm)
    loaded = load_checkpoint_and_dispatch(empty, str(tmp_path / "checkpoint"), device_map="auto",
                                          no_split_module_classes=empty._no_split_modules)
    tolerance = _ROUNDING if fuse else dict(rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, **tolerance)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    offloaded = dispatch_model(_converted(model, fuse), device_map=device_map, offload_dir=str(tmp_path / "offload"))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected, **tolerance)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(offloaded.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_generate_gives_the_original_tokens_with_dynamic_and_static_caches_greedy_and_sampled(family, fuse):
    model = _causal(family).eval()
    converted = _converted(model, fuse)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # the first sequence is left-padded
    ids[0, :2] = 0
    for cache in ("dynamic", "static"):
        for sample in (False, True):
            kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=sample, pad_token_id=0,
                          cache_implementation=cache, top_k=0 if sample else None)
            tokens = []
            for m in (model, converted):
                torch.manual_seed(5)
                tokens.append(m.generate(ids, **kwargs))
            assert torch.equal(tokens[1], tokens[0]), (cache, sample)
