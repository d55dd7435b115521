"""Supervised fine-tuning: TRL's column conventions and which tokens carry the loss (checked by
hand on the byte-level tiny tokenizer), the loss against transformers' own cross-entropy, packing
and gradient accumulation leaving the loss unchanged, bad rows, learning, LoRA, exact resume, and
final/ used as the policy and reference of DPO and GRPO."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.cli import main
from tether.core.losses import nll_sum
from tether.data.errors import DataError
from tether.data.sft import collate_sft, load_sft_dataset
from tether.models import load_policy, tiny_causal_lm
from tether.models.logprobs import backbone_and_head, position_ids_from_mask
from tether.models.packing import packing_supported, plan_packing
from tether.runs import read_metrics
from tether.runs.config import ConfigError
from tether.train.sft import SFTConfig, SFTLogProbs, evaluate, micro_nll, train

ROOT = Path(__file__).resolve().parents[2]
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_causal_lm(seed=0).tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _trained_text(tok, ex):
    """The decoded tokens that carry the loss, in order."""
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])


# -- data: formats and masks -----------------------------------------------------------------


def test_prompt_completion_strings_mask_the_completion_and_eos(tok):
    ex = load_sft_dataset([{"prompt": "ab", "completion": "cd"}], tok)[0]
    eos = tok.eos_token_id
    assert ex.input_ids == [*_ids(tok, "abcd"), eos]
    assert ex.loss_mask == [False, False, True, True, True]
    assert ex.prompt_length == 2 and ex.num_loss_tokens == 3
    every = load_sft_dataset(
        [{"prompt": "ab", "completion": "cd"}], tok, completion_only_loss=False
    )
    assert every[0].loss_mask == [False, True, True, True, True]  # the first token is no target


def test_text_rows_train_every_token_after_the_first(tok):
    ex = load_sft_dataset([{"text": "xyz"}], tok)[0]
    assert ex.input_ids == [*_ids(tok, "xyz"), tok.eos_token_id]
    assert ex.loss_mask == [False, True, True, True] and ex.prompt_length == 0
    # an EOS already there is not doubled
    assert load_sft_dataset([{"text": "xy" + EOS}], tok)[0].input_ids == [
        *_ids(tok, "xy"),
        tok.eos_token_id,
    ]


def test_messages_train_the_assistant_turns_only(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    ex = load_sft_dataset([{"messages": msgs}], tok)[0]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered.endswith(EOS + "\n")
    # the whole conversation, without the newline the template writes after the final EOS
    assert tok.decode(ex.input_ids) == rendered[:-1]
    # each assistant turn's content and its end-of-turn token; not the newline after it
    assert _trained_text(tok, ex) == "yo" + EOS + "a" + EOS
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_length == len(_ids(tok, prompt))
    assert ex.loss_mask[ex.prompt_length - 1] is False and ex.loss_mask[ex.prompt_length] is True
    n_trained = len(_ids(tok, "yo")) + 1 + len(_ids(tok, "a")) + 1
    assert ex.num_loss_tokens == n_trained
    every = load_sft_dataset([{"messages": msgs}], tok, completion_only_loss=False)[0]
    assert every.input_ids == ex.input_ids and every.num_loss_tokens == len(ex.input_ids) - 1


def test_as_chat_and_message_prompt_completion(tok):
    wrapped = load_sft_dataset([{"prompt": "ab", "completion": "cd"}], tok, as_chat=True)[0]
    conv = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    assert tok.decode(wrapped.input_ids) == tok.apply_chat_template(conv, tokenize=False)[:-1]
    assert _trained_text(tok, wrapped) == "cd" + EOS
    as_lists = load_sft_dataset([{"prompt": conv[:1], "completion": conv[1:]}], tok)[0]
    assert as_lists == wrapped
    # the same conversation as `messages` is the same example
    assert load_sft_dataset([{"messages": conv}], tok)[0] == wrapped


def test_collate_right_pads_and_aligns_the_loss_mask(tok):
    ds = load_sft_dataset([{"prompt": "ab", "completion": "cd"}, {"text": "x"}], tok)
    b = collate_sft(ds, pad_id=tok.pad_token_id)
    assert b["input_ids"].shape == (2, 5)
    assert b["attention_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert b["loss_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
    ]
    assert b["index"].tolist() == [0, 1]


def test_truncation_cuts_the_completion_end_and_a_long_prompt_is_an_error(tok):
    rows = [{"prompt": "abc", "completion": "defghij"}, {"text": "0123456789"}]
    ds = load_sft_dataset(rows, tok, max_length=6)
    assert ds.num_truncated == 2
    assert ds[0].input_ids == _ids(tok, "abcdef") and ds[0].loss_mask == [False] * 3 + [True] * 3
    assert ds[1].input_ids == _ids(tok, "012345")
    with pytest.raises(DataError) as e:
        load_sft_dataset(
            [{"text": "ok"}, {"prompt": "abcdefgh", "completion": "x"}], tok, max_length=6
        )
    assert e.value.problems[0].row == 1 and e.value.problems[0].field == "prompt"
    assert "max_length=6" in str(e.value)
    with pytest.raises(DataError, match="truncate=true") as e:
        load_sft_dataset(rows, tok, max_length=6, truncate=False)
    assert [p.row for p in e.value.problems] == [0, 1]


def test_bad_rows_are_all_reported_with_row_and_field(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "fine", "completion": "row"},
        {"prompt": "no completion"},
        {"input": "x"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        {"text": ""},
        {"prompt": [{"role": "user", "content": "q"}], "completion": "a string"},
        {"text": "t", "prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.raises(DataError) as e:
        load_sft_dataset(path, tok)
    where = [(p.row, p.field) for p in e.value.problems]
    assert where == [
        (1, "completion"),
        (2, None),
        (3, "messages"),
        (4, "messages[1].role"),
        (5, "text"),
        (6, "completion"),
        (7, None),
        (9, None),
    ]
    msg = str(e.value)
    assert msg.startswith(str(path)) and "row 2 (line 3)" in msg and "malformed JSON" in msg
    assert "'messages' column (conversational)" in msg and "more than one format" in msg


def test_csv_and_parquet_sources(tok, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,completion\nab,cd\n"x, y",z\n')
    ds = load_sft_dataset(csv, tok)
    assert [e.input_ids for e in ds] == [
        [*_ids(tok, "abcd"), tok.eos_token_id],
        [*_ids(tok, "x, yz"), tok.eos_token_id],
    ]
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow writes None for the columns a row does not have: still one format per row
    table = pa.Table.from_pylist([{"text": "abc", "prompt": None}, {"text": None, "prompt": "p"}])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError) as e:
        load_sft_dataset(tmp_path / "d.parquet", tok)
    assert [(p.row, p.field) for p in e.value.problems] == [(1, "completion")]


# -- the loss ----------------------------------------------------------------------------------


def test_nll_sum_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), -4.0]])
    m = torch.tensor([[False, True, True], [True, False, False]])
    assert nll_sum(lp, m).item() == pytest.approx(5.5)  # NaN at a masked position never leaks


@pytest.fixture(scope="module")
def mixed_batch(tok):
    rows = [
        {"prompt": "Say something:", "completion": " a long enough answer here"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"text": "plain text row"},
        {"prompt": "Q", "completion": "A"},
    ]
    return collate_sft(load_sft_dataset(rows, tok), pad_id=tok.pad_token_id)


def test_loss_equals_transformers_cross_entropy(mixed_batch):
    """A second, independent computation: HF's own loss with labels −100 off the loss tokens."""
    model = tiny_causal_lm(seed=0).model.eval()
    b = mixed_batch
    with torch.no_grad():
        total, n = micro_nll(SFTLogProbs(model, packing=False), b)
        labels = b["input_ids"].masked_fill(~b["loss_mask"], -100)
        hf = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(), labels=labels
        )
    assert n == int(b["loss_mask"].sum())
    assert (total / n).item() == pytest.approx(hf.loss.item(), rel=1e-5)


def test_packing_gives_the_same_loss_and_gradient(mixed_batch):
    model = tiny_causal_lm(seed=0).model
    b = mixed_batch
    backbone, _ = backbone_and_head(model)
    assert packing_supported(backbone)
    am = b["attention_mask"]
    assert plan_packing(am, position_ids_from_mask(am)) is not None  # this batch does pack
    out = {}
    for packing in (True, False):
        model.zero_grad()
        total, n = micro_nll(SFTLogProbs(model, packing), b)
        (total / n).backward()
        out[packing] = (total.item(), [p.grad.clone() for p in model.parameters()])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for g1, g0 in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


# -- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """A learnable mix of the three formats: every answer is ' great fun' (or 'great fun')."""
    rng = random.Random(0)
    words = ["film", "plot", "cast", "story", "scene", "music"]
    rows = []
    for i in range(60):
        w = rng.choice(words)
        rows.append(
            [
                {"prompt": f"The {w} was", "completion": " great fun"},
                {
                    "messages": [
                        {"role": "user", "content": f"The {w} {i}?"},
                        {"role": "assistant", "content": "great fun"},
                    ]
                },
                {"text": f"The {w} was great fun"},
            ][i % 3]
        )
    d = tmp_path_factory.mktemp("sft-data")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:48]))
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[48:]))
    return d / "train.jsonl", d / "eval.jsonl"


def _cfg(tiny_dir, data, out, **kw):
    base = dict(
        model=str(tiny_dir),
        train_data=str(data[0]),
        eval_data=str(data[1]),
        output_dir=str(out),
        learning_rate=5e-3,
        lr_scheduler="constant",
        batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=1,
        eval_steps=100,
        save_steps=0,
        max_length=64,
        seed=1,
        mixed_precision="no",
        report_to=[],
    )
    base.update(kw)
    return SFTConfig(**base)


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_accumulation_and_packing_do_not_change_the_training(tiny_dir, sft_data, tmp_path):
    """The step's loss is normalised by the loss tokens of all its micro-batches: accumulating
    over 2 micro-batches (of different token counts) equals one batch, packed or not."""
    runs = {
        "one": dict(gradient_accumulation_steps=1),
        "accum": dict(gradient_accumulation_steps=2),
        "accum-unpacked": dict(gradient_accumulation_steps=2, packing=False),
    }
    for name, kw in runs.items():
        train(_cfg(tiny_dir, sft_data, tmp_path / name, max_steps=3, **kw))
    ref = _weights(tmp_path / "one")
    losses = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    initial = load_file(str(tiny_dir / "model.safetensors"))
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3  # it moved
    for name in ("accum", "accum-unpacked"):
        w = _weights(tmp_path / name)
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], rtol=0, atol=2e-6)
        other = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        assert other == pytest.approx(losses, rel=1e-5)


def test_sft_learns_and_final_is_the_policy_and_reference_of_dpo_and_grpo(
    tiny_dir, sft_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sft"
    argv = ["train", "sft", "-c", str(ROOT / "recipes" / "sft.yaml"), f"model={tiny_dir}"]
    argv += [f"train_data={sft_data[0]}", f"eval_data={sft_data[1]}", f"output_dir={out}"]
    argv += ["max_steps=12", "eval_steps=6", "learning_rate=1e-2", "warmup_steps=0"]
    argv += ["max_length=64", "mixed_precision=no", "logging_steps=4", "report_to=[]"]
    argv += ["lr_scheduler=constant"]
    assert main(argv) == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/nll" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    before, after = evals[0]["eval/nll"], evals[-1]["eval/nll"]
    assert after < before - 2.0, (before, after)  # ≈5.6 nats per token at the start
    assert evals[-1]["eval/nll_before"] == before
    assert evals[-1]["eval/ppl"] == pytest.approx(math.exp(after), rel=1e-6)
    train_rows = [r for r in rows if "loss" in r]
    assert {"loss", "nll", "tokens", "lr", "grad_norm"} <= set(train_rows[-1])
    assert train_rows[-1]["tokens"] > train_rows[0]["tokens"] > 0

    # final/ loads as a policy and is the trained model: same held-out NLL
    final = out / "final"
    pol = load_policy(final, dtype="float32")
    held = list(load_sft_dataset(sft_data[1], pol.tokenizer, max_length=64, as_chat=True))

    class _Acc:  # what evaluate() needs of an accelerator
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    again = evaluate(SFTLogProbs(pol.model, True), held, 8, pol.tokenizer.pad_token_id, _Acc())
    assert again["eval/nll"] == pytest.approx(after, rel=1e-5)

    # ... and as model= of DPO: its reference is the SFT model, so the first loss is log 2
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "\n".join(
            json.dumps({"prompt": f"The film {i} was", "chosen": " great", "rejected": " bad"})
            for i in range(8)
        )
    )
    dpo_out = tmp_path / "dpo"
    argv = ["train", "dpo", f"model={final}", f"train_data={prefs}", f"output_dir={dpo_out}"]
    argv += ["max_steps=1", "batch_size=4", "eval_fraction=0", "eval_generate=false"]
    argv += ["reference=copy", "max_length=32", "max_prompt_length=16", "mixed_precision=no"]
    argv += ["save_steps=0", "logging_steps=1", "report_to=[]", "exact_kl_samples=0"]
    assert main(argv) == 0
    dpo_rows = [r for r in read_metrics(dpo_out) if "loss" in r]
    assert dpo_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)

    # ... and of GRPO: one step runs from it
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"The film {i} was"}) for i in range(4)))
    grpo_out = tmp_path / "grpo"
    argv = ["train", "grpo", f"model={final}", f"prompts={prompts}", f"output_dir={grpo_out}"]
    argv += ["max_steps=1", "batch_size=2", "num_generations=2", "max_new_tokens=4"]
    argv += ["reward=tests.helpers.rewards:vowel_fraction", "eval_steps=0", "save_steps=0"]
    argv += ["mixed_precision=no", "report_to=[]"]
    assert main(argv) == 0
    assert (grpo_out / "final" / "config.json").is_file()


def test_lora_run_saves_an_adapter_that_loads(tiny_dir, sft_data, tmp_path):
    peft = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    out = tmp_path / "lora"
    final = train(_cfg(tiny_dir, sft_data, out, peft=peft, learning_rate=2e-2, max_steps=6))
    assert final["eval/nll"] < final["eval/nll_before"] - 0.3
    assert (out / "final" / "adapter_config.json").is_file()
    assert not (out / "final" / "model.safetensors").exists()
    pol = load_policy(out / "final", dtype="float32")
    held = list(load_sft_dataset(sft_data[1], pol.tokenizer, max_length=64))
    b = collate_sft(held, pol.tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = micro_nll(SFTLogProbs(pol.model.eval(), True), b)
    assert (total / n).item() == pytest.approx(final["eval/nll"], rel=1e-5)


def test_resume_equals_uninterrupted(tiny_dir, sft_data, tmp_path):
    kw = dict(max_steps=6, save_steps=3, logging_steps=3, eval_steps=3)
    train(_cfg(tiny_dir, sft_data, tmp_path / "full", **kw))
    train(_cfg(tiny_dir, sft_data, tmp_path / "half", **{**kw, "max_steps": 3}))
    final = train(_cfg(tiny_dir, sft_data, tmp_path / "half", **kw, resume=True))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ("loss", "nll", "tokens", "eval/nll", "eval/nll_before")
    ra, rb = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert {k: x[k] for k in keys if k in x} == {k: y[k] for k in keys if k in y}
    assert final["eval/nll_before"] == ra[0]["eval/nll"]


def test_config_and_data_errors(tiny_dir, sft_data, tmp_path):
    for kw, name in [
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(eval_steps=-1), "eval_steps"),
        (dict(max_length=1), "max_length"),
    ]:
        with pytest.raises(ValueError, match=name):
            SFTConfig(**kw)
    with pytest.raises(ConfigError, match="train_data is required"):
        train(SFTConfig(output_dir=str(tmp_path / "x"), model=str(tiny_dir)))
    with pytest.raises(ConfigError, match="max_length"):
        train(_cfg(tiny_dir, sft_data, tmp_path / "long", max_length=4096))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({"x": 1}))
    with pytest.raises(DataError, match=r"bad\.jsonl.*\n.*row 1"):
        train(_cfg(tiny_dir, (bad, sft_data[1]), tmp_path / "bad"))


@pytest.mark.slow
def test_smollm2_sft_lowers_heldout_nll(tmp_path):
    """The real model on the shipped instruction data: 15 steps lower the held-out NLL."""
    cfg = SFTConfig(
        model="smollm2-135m-instruct",
        train_data=str(ROOT / "data" / "sft_train.jsonl"),
        eval_data=str(ROOT / "data" / "sft_eval.jsonl"),
        as_chat=True,
        output_dir=str(tmp_path / "run"),
        learning_rate=5e-5,
        max_steps=15,
        batch_size=8,
        eval_steps=100,
        save_steps=0,
        report_to=[],
    )
    final = train(cfg)
    assert final["eval/nll"] < final["eval/nll_before"] - 0.3
