"""tether export, and the portable base model of a LoRA run's adapter."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers.runs import make_run
from tether.cli import main
from tether.export import PROVENANCE_FILE, export_run
from tether.models import load_policy
from tether.models.loading import (
    make_adapter_base_portable,
    portable_base_name,
    resolve_adapter_base,
)
from tether.trained import load_trained, resolve_trained

IDS = torch.tensor([[5, 80, 17, 33, 101, 7, 64, 2], [1, 2, 3, 4, 5, 6, 7, 8]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.double()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("full"), peft=None)


def test_lora_export_is_the_merged_adapter_and_loads_with_plain_transformers(lora_run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in plain.state_dict())
    lora = load_policy(lora_run / "final", dtype="float32", merge_adapter=False)
    assert lora.is_peft
    base = load_policy(lora_run.parent / "tiny", dtype="float32").model
    assert (logits(lora.model) - logits(base)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(plain), logits(lora.model), rtol=0, atol=1e-4)
    info = json.loads((out / PROVENANCE_FILE).read_text())
    assert info["checkpoint"] == "final" and info["step"] == 2 and info["merged_adapter"]
    assert info["base_model"] == str(lora_run.parent / "tiny")
    assert info["run_dir"] == str(lora_run.resolve())


def test_the_export_loads_where_peft_cannot_be_imported(lora_run, tmp_path):
    out = export_run(lora_run, tmp_path / "e").out
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, len(t))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LlamaForCausalLM", "260"]


def test_export_of_a_checkpoint_is_that_step(lora_run, tmp_path):
    step1 = export_run(lora_run, tmp_path / "s1", checkpoint="step-1")
    assert step1.trained.step == 1 and step1.trained.checkpoint == "step-000001"
    from_ckpt = load_trained(resolve_trained(str(lora_run), "1"))
    plain = AutoModelForCausalLM.from_pretrained(step1.out)
    torch.testing.assert_close(logits(plain), logits(from_ckpt.model), rtol=0, atol=1e-4)
    final = AutoModelForCausalLM.from_pretrained(export_run(lora_run, tmp_path / "f").out)
    assert (logits(plain) - logits(final)).abs().max() > 1e-2
    # step 2's checkpoint is what final/ holds
    step2 = load_trained(resolve_trained(str(lora_run), "step-2"))
    torch.testing.assert_close(logits(final), logits(step2.model), rtol=0, atol=1e-4)


def test_full_fine_tune_export_and_bfloat16(full_run, tmp_path):
    result = export_run(full_run, tmp_path / "e")
    assert not result.merged_adapter
    plain = AutoModelForCausalLM.from_pretrained(result.out)
    final = load_policy(full_run / "final", dtype="float32").model
    torch.testing.assert_close(logits(plain), logits(final), rtol=0, atol=0)
    half = export_run(full_run, tmp_path / "h", dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(half.out, dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_default_out_and_replacing_a_previous_export(full_run, capsys):
    assert main(["export", str(full_run)]) == 0
    first = (full_run / "export" / PROVENANCE_FILE).read_text()
    assert main(["export", str(full_run), "--checkpoint", "step-1"]) == 0
    assert json.loads((full_run / "export" / PROVENANCE_FILE).read_text())["step"] == 1
    assert first != (full_run / "export" / PROVENANCE_FILE).read_text()
    assert not [p for p in full_run.iterdir() if p.name.startswith(".export")]  # no leftovers
    assert "exported" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "step-7"], "has no checkpoint 'step-7'; it has final, step-000001"),
        (["--checkpoint", "best"], "best not found"),
        (["--out", "{tiny}"], "is a directory that is not a tether export"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(full_run, capsys, args, message):
    args = [a.replace("{tiny}", str(full_run.parent / "tiny")) for a in args]
    assert main(["export", str(full_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("tether export: error:") and len(err.strip().splitlines()) == 1


def test_not_a_run_dir_or_without_final(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a tether run directory" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    run = make_run(tmp_path / "r", peft=None)
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "final not found" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# The adapter's base model is recorded portably
# ------------------------------------------------------------------------------------------------


def test_a_lora_final_records_its_base_relative_to_itself(lora_run):
    config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../../tiny"


def test_a_moved_run_directory_still_loads(lora_run, tmp_path):
    before = logits(load_policy(lora_run / "final", merge_adapter=False).model)
    moved = tmp_path / "elsewhere"
    shutil.copytree(lora_run.parent, moved)  # the run and its base model, moved together
    shutil.rmtree(moved / "run" / "export", ignore_errors=True)
    hidden = lora_run.parent.with_name(lora_run.parent.name + "-hidden")
    lora_run.parent.rename(hidden)  # the original location is gone
    try:
        after = load_policy(moved / "run" / "final", merge_adapter=False)
        torch.testing.assert_close(logits(after.model), before, rtol=0, atol=0)
    finally:
        hidden.rename(lora_run.parent)


def test_embedded_models_are_recorded_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    cached = (tmp_path / "cache" / "models" / "smollm2-135m-instruct").resolve()
    assert portable_base_name(str(cached), tmp_path / "run" / "final") == "smollm2-135m-instruct"
    assert portable_base_name("org/model", tmp_path) == "org/model"
    assert portable_base_name(str(tmp_path / "m"), tmp_path / "run" / "final") == "../../m"
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(cached), "r": 4})
    )
    make_adapter_base_portable(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved == {"base_model_name_or_path": "smollm2-135m-instruct", "r": 4}
    assert resolve_adapter_base("smollm2-135m-instruct", adapter) == "smollm2-135m-instruct"
    assert resolve_adapter_base("org/model", adapter) == "org/model"
    (tmp_path / "m").mkdir()
    assert resolve_adapter_base("../m", adapter) == str((tmp_path / "m").resolve())
