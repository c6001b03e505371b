"""`kernl-compile` on inputs a new user gets wrong: each ends with one message and exit status
1 (2 for a bad --buckets), never a Python traceback, and is refused before any bucket is
compiled when the options alone show it cannot work."""

import copy
import json
import sys

import pytest
import torch
import transformers as T
from click.testing import CliRunner

import kernl.compiler
import kernl.compiler.tasks.encoder
import kernl.runtime
from kernl.artifacts import read_manifest
from kernl.compiler.cli import compile_command, main
from kernl.compiler.trace import UnsupportedModelError, check_task, task_of
from kernl.compiler.validate import ValidationError

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=80,
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "m"
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "m"
    torch.manual_seed(0)
    config = T.GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        vocab_size=97,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    T.GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def run(*args):
    return CliRunner().invoke(compile_command, [str(a) for a in args], prog_name="kernl-compile")


def assert_clean_failure(result, code, *needles):
    # CliRunner turns an uncaught exception into exit code 1 with result.exception set: a
    # clean failure is a SystemExit carrying the code, and a message.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_bf16_on_the_cpu_is_refused_up_front(bert_dir, tmp_path):
    result = run(
        bert_dir,
        "-o",
        tmp_path / "a",
        "--buckets",
        "batch=1 seq=8",
        "--dtype",
        "bf16",
        "--device",
        "cpu",
    )
    assert_clean_failure(
        result, 1, "kernl-compile: error:", "bf16", "Triton's interpreter", "--no-kernels"
    )
    assert "loading model" not in result.output  # refused before loading anything
    assert not (tmp_path / "a").exists()


def test_kernl_compile_names_itself_in_its_errors(bert_dir, tmp_path):
    # the group's subcommand shares kernl-compile's code, which wrote "kernl-compile: error:"
    args = [bert_dir, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", "--dtype", "bf16"]
    result = CliRunner().invoke(
        main, ["compile", *map(str, args), "--device", "cpu"], prog_name="kernl"
    )
    assert_clean_failure(result, 1, "kernl compile: error:", "bf16")
    assert "kernl-compile" not in result.output


def test_bf16_on_the_cpu_without_kernels_compiles(bert_dir, tmp_path):
    result = run(
        bert_dir,
        "-o",
        tmp_path / "a",
        "--buckets",
        "batch=1 seq=8",
        "--dtype",
        "bf16",
        "--device",
        "cpu",
        "--no-kernels",
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "a").dtype == "bfloat16"


def test_a_validation_failure_is_a_message_not_a_traceback(bert_dir, tmp_path, monkeypatch):
    def failing_validate(*args, **kwargs):
        raise ValidationError("bucket b1_s8: output last_hidden_state differs from eager")

    monkeypatch.setattr(kernl.compiler.tasks.encoder, "validate", failing_validate)
    result = run(
        bert_dir,
        "-o",
        tmp_path / "a",
        "--buckets",
        "batch=1 seq=8",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-kernels",
    )
    assert_clean_failure(
        result,
        1,
        "validation against eager failed",
        "bucket b1_s8: output last_hidden_state differs",
        "--atol",
    )
    assert not (tmp_path / "a").exists()


def test_a_bucket_longer_than_the_position_table_is_refused_before_tracing(bert_dir, tmp_path):
    result = run(
        bert_dir,
        "-o",
        tmp_path / "a",
        "--buckets",
        "batch=1 seq=8,128",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-kernels",
    )
    assert_clean_failure(result, 2, "1x128", "80 positions", "max_position_embeddings=80")
    assert "export" not in result.output  # not even the 1x8 bucket was traced
    assert not (tmp_path / "a").exists()


def test_buckets_in_the_bench_form_BxS(bert_dir, tmp_path):
    result = run(
        bert_dir,
        "-o",
        tmp_path / "a",
        "--buckets",
        "1x8,2x16",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-kernels",
    )
    assert result.exit_code == 0, result.output
    assert [(b.batch, b.seq) for b in read_manifest(tmp_path / "a").bucket_list()] == [
        (1, 8),
        (2, 16),
    ]
    help_text = run("--help").output
    assert "1x16,8x128" in help_text and "max_position_embeddings" in help_text


def test_a_causal_lm_compiles_without_task(gpt2_dir, tmp_path):
    result = run(
        gpt2_dir,
        "-o",
        tmp_path / "lm",
        "--buckets",
        "batch=1 prompt=8 cache=16",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "lm").task == "causal-lm"


def test_a_causal_lm_cache_over_its_positions_is_refused(gpt2_dir, tmp_path):
    result = run(
        gpt2_dir,
        "-o",
        tmp_path / "lm",
        "--buckets",
        "batch=1 prompt=8 cache=128",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    assert_clean_failure(result, 1, "64 learned positions", "cache<=64")
    assert not (tmp_path / "lm").exists()


@pytest.mark.parametrize(
    "architecture, task",
    [
        ("LlamaForCausalLM", "causal-lm"),
        ("Qwen2ForCausalLM", "causal-lm"),
        ("GPT2LMHeadModel", "causal-lm"),
        ("BertForMaskedLM", "masked-lm"),
        ("BertForSequenceClassification", "sequence-classification"),
        ("BertForQuestionAnswering", "question-answering"),
        ("BertModel", "base"),
    ],
)
def test_task_follows_architectures(architecture, task):
    assert task_of(T.PretrainedConfig(architectures=[architecture])) == task


@pytest.mark.parametrize(
    "architecture",
    ["ElectraForPreTraining", "BertForPreTraining", "BertForNextSentencePrediction",
     "GPT2DoubleHeadsModel"],
)  # fmt: skip
def test_a_head_kernl_has_no_task_for_is_said_not_dropped(architecture):
    """ELECTRA's discriminator checkpoints: compiled as their encoder, the head dropped in
    silence (a model object of the same class compiles with its head)."""
    with pytest.raises(UnsupportedModelError, match=f"{architecture}: kernl has no task") as e:
        task_of(T.PretrainedConfig(architectures=[architecture]))
    assert "--task base" in str(e.value) and "kernl.optimize" in str(e.value)


def test_a_model_name_holding_for_is_no_head():
    assert task_of(T.PretrainedConfig(architectures=["RoFormerModel"])) == "base"


def test_an_unknown_head_compiles_as_it_is_when_given_as_an_object():
    electra = T.ElectraForPreTraining(T.ElectraConfig(**SMALL, embedding_size=16))
    assert task_of(electra.config, electra) == "base"


def test_an_unsupported_causal_lm_is_named_before_its_buckets(tmp_path):
    """BertLMHeadModel is inferred as causal-lm: encoder buckets were refused first ("unknown
    axis 'seq' for causal-lm"), the model type only after the user rewrote them."""
    torch.manual_seed(0)
    T.BertLMHeadModel(T.BertConfig(**SMALL, is_decoder=True)).save_pretrained(tmp_path / "m")
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert_clean_failure(result, 1, "model type 'bert' (BertLMHeadModel) is not supported")
    assert not (tmp_path / "a").exists()


def test_a_head_the_checkpoint_lacks_is_refused_not_made_up(tmp_path):
    """A question-answering checkpoint compiles its head (start and end logits, as Hugging
    Face). A bare encoder's checkpoint compiled as question-answering would get a random
    qa_outputs: refused, naming the missing weights."""
    torch.manual_seed(0)
    qa = T.BertForQuestionAnswering(T.BertConfig(**SMALL)).eval()
    qa.save_pretrained(tmp_path / "qa")
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(tmp_path / "bare")
    result = run(tmp_path / "bare", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32", "--task", "question-answering")  # fmt: skip
    assert_clean_failure(result, 1, "qa_outputs.weight", "not in the checkpoint", "random")
    assert not (tmp_path / "a").exists()
    result = run(tmp_path / "qa", "-o", tmp_path / "b", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "b").task == "question-answering"
    model = kernl.runtime.load(tmp_path / "b")
    ids = torch.randint(1, SMALL["vocab_size"], (1, 6))
    got, want = model(input_ids=ids), qa(input_ids=ids)
    torch.testing.assert_close(got.start_logits, want.start_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.end_logits, want.end_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("saved", ["bare", "question-answering", "roberta-classifier"])
def test_a_checkpoint_without_a_pooler_compiles_its_encoder_without_one(tmp_path, saved):
    """BertModel(add_pooling_layer=False), a question-answering checkpoint or a RoBERTa
    classifier (neither has a pooler) compiled as base: AutoModel built a pooler the checkpoint
    lacks, and the compile was refused for its missing weights, though the encoder's own
    output is whole. It compiles without one, as Hugging Face's class does given
    add_pooling_layer=False, says so, and matches that model."""
    torch.manual_seed(0)
    if saved == "roberta-classifier":
        cfg = T.RobertaConfig(**{**SMALL, "max_position_embeddings": 40}, pad_token_id=1)
        T.RobertaForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    elif saved == "question-answering":
        T.BertForQuestionAnswering(T.BertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    else:
        T.BertModel(T.BertConfig(**SMALL), add_pooling_layer=False).save_pretrained(tmp_path / "m")
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32", "--task", "base")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "holds no pooler: compiled without one" in result.output
    eager = T.AutoModel.from_pretrained(tmp_path / "m", add_pooling_layer=False).eval()
    model = kernl.runtime.load(tmp_path / "a", device="cpu")
    ids = torch.randint(2, SMALL["vocab_size"], (1, 6))
    got = model(input_ids=ids)
    assert "pooler_output" not in got
    want = eager(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-4, rtol=1e-4)


def test_a_model_without_sdpa_is_traced_with_its_own_attention(tmp_path):
    """`--task` loads with SDPA attention; MPNet has none, and the compile failed with Hugging
    Face's advice to pass attn_implementation, which kernl-compile cannot. Its own attention
    is traced (and put on kernl.attention: tests/e2e/test_compile_load.py)."""
    torch.manual_seed(0)
    cfg = T.MPNetConfig(**{**SMALL, "max_position_embeddings": 64})
    T.MPNetModel(cfg).save_pretrained(tmp_path / "mpnet")
    result = run(tmp_path / "mpnet", "-o", tmp_path / "a", "--task", "base",
                 "--buckets", "batch=1 seq=8", "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert "attn_implementation" not in result.output
    assert result.exit_code == 0, result.output
    assert kernl.runtime.load(tmp_path / "a", device="cpu").input_names


def test_a_model_that_is_not_there_says_so_without_network_advice(tmp_path):
    result = run(tmp_path / "nope", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8")
    assert_clean_failure(result, 1, "no such folder")
    result = run("acme/not-cached", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8")
    assert_clean_failure(result, 1, "not in the local Hugging Face cache", "never downloads")
    assert "internet" not in result.output and "huggingface.co" not in result.output


@pytest.mark.parametrize("out", ["", ".", "..", "sub/.."])
def test_an_empty_output_path_or_the_working_directory_is_refused(
    bert_dir, tmp_path, monkeypatch, out
):
    """-o "" (an unset $OUT in a script) is the working directory, which the compile replaced
    whole and deleted (the shell left in a deleted folder); -o . likewise."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    result = run(bert_dir, "-o", out, "--buckets", "batch=1 seq=8", *CPU_FP32)
    assert_clean_failure(result, 1, "empty" if out == "" else "working directory")
    assert (work / "keep.txt").read_text() == "mine" and (work / "sub").is_dir()


def test_a_file_or_an_empty_path_as_model_is_named_as_such(bert_dir, tmp_path):
    # the config file itself was reported as a folder "with no config.json"
    result = run(bert_dir / "config.json", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8")
    assert_clean_failure(result, 1, "config.json is a file", "model folder")
    result = run("", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8")
    assert_clean_failure(result, 1, "the model path is empty")
    assert not (tmp_path / "a").exists()


def test_per_layer_outputs_are_refused_not_dropped(tmp_path):
    """A config with output_hidden_states: Hugging Face returns a tuple per layer, which kernl
    does not serve; it was dropped without a word (hidden_states came back None)."""
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**SMALL, output_hidden_states=True)).save_pretrained(tmp_path / "m")
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert_clean_failure(result, 1, "hidden_states", "output_hidden_states")
    assert not (tmp_path / "a").exists()


def test_a_decoder_berts_cache_is_said_not_dropped_in_silence(tmp_path):
    """BertModel(is_decoder=True) returns a cache beside its hidden states (use_cache is on):
    the artifact serves the tensors, and the compile says the cache is left out."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**SMALL, is_decoder=True)).eval()
    messages = []
    report = kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32",
                                    device="cpu", kernels=False, progress=messages.append)  # fmt: skip
    assert report.not_served == ["cache"]
    assert any("not served: the model's cache" in m for m in messages), messages
    assert "not served (not tensors): cache" in report.table()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    out = kernl.runtime.load(tmp_path / "a", device="cpu")(input_ids=ids)
    assert sorted(out.keys()) == ["last_hidden_state", "pooler_output"]
    torch.testing.assert_close(out["last_hidden_state"], expected, atol=1e-5, rtol=1e-5)
    model.config.use_cache = False  # nothing left out: nothing said
    messages.clear()
    report = kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "b", dtype="fp32",
                                    device="cpu", kernels=False, progress=messages.append)  # fmt: skip
    assert report.not_served == [] and not any("not served" in m for m in messages)


CPU_FP32 = ("--device", "cpu", "--dtype", "fp32", "--no-kernels")


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--atol", "nan", "nan is not a finite number"),
        ("--rtol", "nan", "nan is not a finite number"),
        ("--rtol", "inf", "inf is not a finite number"),
        ("--atol", "-1", "not in the range x>=0"),
    ],
)
def test_a_tolerance_that_is_nan_or_negative_is_refused_up_front(
    bert_dir, tmp_path, option, value, needle
):
    # NaN turned validation off (no error compares greater than NaN) and a negative tolerance
    # failed every bucket after it was compiled.
    result = run(bert_dir, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", *CPU_FP32,
                 option, value)  # fmt: skip
    assert_clean_failure(result, 2, option, needle)
    assert "loading model" not in result.output
    assert not (tmp_path / "a").exists()


def test_the_python_api_refuses_a_nan_or_negative_tolerance(bert_dir, tmp_path):
    from kernl.compiler.validate import resolve_tolerance

    assert resolve_tolerance(torch.float32, None, 0) == (1e-4, 0.0)
    for atol, rtol in [(float("nan"), None), (None, float("nan")), (-1e-3, None),
                       (None, float("inf")), ("1e-3", None)]:  # fmt: skip
        with pytest.raises(ValueError, match="atol|rtol"):
            resolve_tolerance(torch.float32, atol, rtol)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        kernl.compiler.compile(str(bert_dir), "batch=1 seq=8", tmp_path / "a", dtype="fp32",
                               device="cpu", kernels=False, rtol=float("nan"))  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_a_damaged_weights_file_is_a_message_not_a_traceback(bert_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes((bert_dir / "model.safetensors").read_bytes()[:500])
    result = run(bad, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", *CPU_FP32)
    assert_clean_failure(result, 1, "kernl-compile: error:", "cannot read the checkpoint of",
                         str(bad), "SafetensorError")  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_a_weights_index_that_is_not_json_is_named(tmp_path, bert_dir):
    """A truncated model.safetensors.index.json: the error was "base: Expecting value: line 2
    column 1", naming no file."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    (bad / "model.safetensors.index.json").write_text('{"metadata": \n')
    result = run(bad, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", *CPU_FP32)
    assert_clean_failure(result, 1, "cannot read the checkpoint of", "is not JSON",
                         "(model.safetensors.index.json)", "Expecting value")  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_a_config_that_is_not_json_is_named_not_called_missing(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    result = run(bad, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", *CPU_FP32)
    assert_clean_failure(result, 1, "cannot read", "config.json", "not a valid JSON file",
                         "line 1 column 2")  # fmt: skip
    assert "cannot find model" not in result.output


@pytest.mark.parametrize(
    "buckets, needle",
    [
        ("batch=99999999999999999999 seq=8", "batch=99999999999999999999 is more than the 65536"),
        ("70000x1", "batch=70000 is more than the 65536"),
        ("batch=1 seq=2000000", "seq=2000000 is more than the 1048576"),
        ("batch=4096 seq=8192", "more than the 16777216"),
    ],
)
def test_a_bucket_over_the_readers_limits_is_refused_before_loading(
    bert_dir, tmp_path, buckets, needle
):
    # It compiled (or overflowed int64 after the model loaded) into an artifact that
    # verify and load then refused.
    result = run(bert_dir, "-o", tmp_path / "a", "--buckets", buckets, *CPU_FP32)
    assert_clean_failure(result, 2, "--buckets", needle)
    assert "loading model" not in result.output
    assert not (tmp_path / "a").exists()


def test_a_validation_failure_names_the_bucket_as_BxS(bert_dir, tmp_path, monkeypatch):
    import kernl.compiler.validate

    class Off(kernl.compiler.validate.Executor):  # the program's outputs, each off by one
        def run(self, inputs):
            return [t + 1 for t in super().run(inputs)]

    monkeypatch.setattr(kernl.compiler.validate, "Executor", Off)
    result = run(bert_dir, "-o", tmp_path / "a", "--buckets", "batch=1 seq=8", *CPU_FP32)
    assert_clean_failure(result, 1, "validation against eager failed", "bucket 1x8: output")
    assert "b1_s8" not in result.output


def test_an_unforeseen_failure_is_one_line_and_the_traceback_is_on_verbose(
    bert_dir, tmp_path, monkeypatch
):
    def broken_validate(*args, **kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(kernl.compiler.tasks.encoder, "validate", broken_validate)
    args = (bert_dir, "-o", tmp_path / "a", "--buckets", "1x8", *CPU_FP32)
    assert_clean_failure(
        run(*args),
        1,
        # the bucket it came from (an I-BERT bucket past its position table failed so, review)
        "IndexError: index out of range in self (while compiling bucket 1x8)",
        "--verbose",
        "please report it",
    )
    assert not (tmp_path / "a").exists()
    result = run(*args, "--verbose")
    assert isinstance(result.exception, IndexError)  # the traceback, for the report


def test_a_multiple_choice_head_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    T.BertForMultipleChoice(T.BertConfig(**SMALL)).save_pretrained(tmp_path / "m")
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "1x8", *CPU_FP32)
    assert_clean_failure(result, 1, "BertForMultipleChoice", "multiple-choice")
    assert not (tmp_path / "a").exists()


def test_a_model_that_fails_on_the_probe_ids_is_named(monkeypatch):
    """The signature probe runs the model on [batch, seq] ids: a failure there is the model's
    call convention, said as such (it was a bare shape error from inside the model)."""
    from kernl.compiler.trace import model_signature

    model = T.BertModel(T.BertConfig(**SMALL)).eval()

    def reshaping_forward(input_ids=None, attention_mask=None, token_type_ids=None, **kw):
        return input_ids.view(-1, 11)

    monkeypatch.setattr(model, "forward", reshaping_forward)
    with pytest.raises(
        UnsupportedModelError, match=r"fails on \[batch, seq\] token ids \(2x7, one of two small"
    ):
        model_signature(model, torch.device("cpu"))


def test_a_branch_on_input_values_is_refused_in_one_line(tmp_path, capfd):
    """Dynamic RoPE branches on each call's length: export printed 100+ lines of partial
    graph, then the compile ended on torch's "Could not guard on data-dependent expression"."""
    if not hasattr(T, "NomicBertConfig"):
        pytest.skip("this transformers has no NomicBERT")
    torch.manual_seed(0)
    config = T.NomicBertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, head_dim=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0},
    )  # fmt: skip
    T.NomicBertModel(config).eval().save_pretrained(tmp_path / "m")
    capfd.readouterr()
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "1x8", *CPU_FP32)
    assert_clean_failure(
        result, 1, "NomicBertModel branches on a value computed from its inputs",
        "dynamic_frequency_update", "rope type is 'default'",
    )  # fmt: skip
    assert "def forward" not in capfd.readouterr().err + result.output
    assert not (tmp_path / "a").exists()


def test_export_runs_where_sys_stderr_is_none(monkeypatch):
    """pythonw, some daemons: no stderr. What export wrote there is written back only where
    there is one (it failed every export with an AttributeError)."""
    from kernl.artifacts.schema import Bucket
    from kernl.compiler.trace import FlatModel, export_bucket

    model = T.BertModel(T.BertConfig(**SMALL)).eval()
    monkeypatch.setattr(sys, "stderr", None)
    flat = FlatModel(model, ["input_ids"], ["last_hidden_state"])
    assert export_bucket(flat, Bucket(1, 8), 120, torch.device("cpu")) is not None


def test_a_feed_forward_in_chunks_is_probed_at_multiples_of_the_chunk():
    """chunk_size_feed_forward=4: the probe ran the model at 2x7, which it refuses, and the
    compile was refused though every bucket asked for (8, 16) runs."""
    from kernl.compiler.trace import model_signature

    model = T.BertModel(T.BertConfig(**SMALL, chunk_size_feed_forward=4)).eval()
    signature = model_signature(model, torch.device("cpu"))
    assert {o.name: o.seq_axis for o in signature.outputs} == {
        "last_hidden_state": 1,
        "pooler_output": None,
    }


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "m"
    torch.manual_seed(0)
    config = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                        num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                        pad_token_id=0, eos_token_id=1)  # fmt: skip
    T.T5ForConditionalGeneration(config).eval().save_pretrained(path)
    return path


T5_BUCKETS = ("--buckets", "batch=1 source=8 cache=8", "--device", "cpu", "--dtype", "fp32")


@pytest.mark.parametrize("option", ["--atol", "--rtol"])
def test_a_tolerance_is_refused_where_validation_compares_greedy_ids(t5_dir, tmp_path, option):
    # They were accepted and dropped: a seq2seq compile validates greedy ids, not values.
    result = run(t5_dir, "-o", tmp_path / "a", *T5_BUCKETS, option, "5")
    assert_clean_failure(result, 2, option, "seq2seq-lm", "greedy ids")
    assert "loading model" not in result.output
    assert not (tmp_path / "a").exists()
    with pytest.raises(kernl.compiler.api.OptionNotApplicableError, match=option[2:]):
        kernl.compiler.compile(str(t5_dir), "batch=1 source=8 cache=8", tmp_path / "a",
                               dtype="fp32", device="cpu", **{option[2:]: float("nan")})  # fmt: skip
    help_text = " ".join(run("--help").output.split())  # unwrapped
    assert "Encoder tasks and causal-lm only: seq2seq-lm and speech-seq2seq" in help_text


def test_no_tune_keeps_the_seq2seq_decode_step_on_torch(t5_dir, tmp_path, monkeypatch):
    # --no-tune was dropped: on a GPU the decode step was still timed and kernl's kernels chosen.
    import kernl.compiler.tasks.seq2seq as seq2seq

    seen = []
    monkeypatch.setattr(seq2seq, "compile_seq2seq", lambda *a, **kw: seen.append(kw) or 1 / 0)
    for tune in (True, False):
        with pytest.raises(ZeroDivisionError):
            kernl.compiler.compile(str(t5_dir), "batch=1 source=8 cache=8", tmp_path / "a",
                                   dtype="fp16", tune=tune)  # fmt: skip
    assert [kw["kernels"] for kw in seen] == [True, False]
    monkeypatch.undo()
    result = run(t5_dir, "-o", tmp_path / "a", *T5_BUCKETS, "--no-tune")
    assert result.exit_code == 0, result.output
    assert "decode step on torch" in result.output


def test_gpt2_without_a_head_compiles_without_token_types_and_matches_eager(tmp_path):
    """GPT2Model takes token_type_ids (looked up in its word embeddings) but its config has no
    type_vocab_size: every bucket compiled, then the artifact check refused the unranged input
    and the user was told it was a bug in kernl."""
    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=97)
    T.GPT2Model(config).eval().save_pretrained(tmp_path / "m")
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "1x8,2x16", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert [s.name for s in read_manifest(tmp_path / "a").inputs] == ["input_ids", "attention_mask"]
    model = kernl.runtime.load(tmp_path / "a")
    eager = T.GPT2Model.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :7], want[1, :7], atol=1e-4, rtol=1e-4)
    # A model with a token-type table keeps the input.
    from kernl.compiler.trace import model_signature

    bert = T.BertModel(T.BertConfig(**SMALL)).eval()
    names = [s.name for s in model_signature(bert, torch.device("cpu")).inputs]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]


def test_an_unknown_model_type_is_one_line_without_install_advice(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"model_type": "foobar_unknown", "architectures": ["FoobarModel"]}'
    )
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "1x8", *CPU_FP32)
    assert_clean_failure(result, 1, "'foobar_unknown'", f"transformers {T.__version__}")
    error = result.output[result.output.index("kernl-compile: error:") :]
    assert error.count("\n") == 1, error
    assert "pip install" not in error and "git+" not in error and "huggingface" not in error


def test_an_unknown_model_type_is_named_before_the_buckets_are_read(tmp_path):
    """Without --task, a causal LM's buckets were read as an encoder's first ("unknown axis
    'prompt' for an encoder"): the model type this transformers lacks is the news."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"model_type": "mycustom", "architectures": ["MyCustomForCausalLM"]}'
    )
    buckets = "batch=1 prompt=8 cache=16"
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", buckets, *CPU_FP32)
    assert_clean_failure(result, 1, "'mycustom' is not known to the installed transformers")
    assert "unknown axis" not in result.output


def test_block_sparse_bigbird_is_refused_and_full_attention_compiles(tmp_path):
    """HF's BigBird switches itself to full attention, for good, on an input too short for its
    blocks: kernl's probes were such inputs, so block-sparse checkpoints compiled and validated
    as full attention (1.5e-2 from a fresh model at seq 32), and the model passed to compile()
    came back switched."""
    torch.manual_seed(0)
    cfg = T.BigBirdConfig(**SMALL, block_size=4, num_random_blocks=1)
    model = T.BigBirdModel(cfg).eval()
    with pytest.raises(UnsupportedModelError, match=r"block-sparse attention.*up to 28 tokens"):
        kernl.compiler.compile(model, "batch=1 seq=32", tmp_path / "a", dtype="fp32",
                               device="cpu")  # fmt: skip
    assert model.config.attention_type == "block_sparse"
    layers = model.encoder.layer
    assert {type(layer.attention.self).__name__ for layer in layers} == {
        "BigBirdBlockSparseAttention"
    }
    cfg.attention_type = "original_full"
    kernl.compiler.compile(T.BigBirdModel(cfg), "batch=1 seq=8", tmp_path / "b", dtype="fp32",
                           device="cpu")  # fmt: skip


class SwitchesItself(T.BertModel):
    """A model whose forward changes its own mode (as BigBird's does) after its first call."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        out = super().forward(input_ids, attention_mask, token_type_ids, **kwargs)
        self.mode = "after the first call"
        return out


def test_a_model_that_changes_itself_when_run_is_refused_by_name(tmp_path):
    model = SwitchesItself(T.BertConfig(**SMALL)).eval()
    model.mode = "as given"
    with pytest.raises(UnsupportedModelError, match=r"changed itself when kernl ran it on a 2x7 "
                       r"input \(mode: 'as given' -> 'after the first call'\)"):  # fmt: skip
        kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32",
                               device="cpu")  # fmt: skip


class ChangesItselfLater(T.BertModel):
    """Changes the hunt found the first check missed: a bool flag, a config setting, a
    submodule replaced by one of its class, a mode switched on the third call (the probes
    make two: the compile's export and validation made the third)."""

    how = "flag"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        out = super().forward(input_ids, attention_mask, token_type_ids, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.how == "flag":
            self.warm = True
        elif self.how == "config":
            self.config.my_mode = "other"
        elif self.how == "swap" and self.calls == 1:
            self.pooler = copy.deepcopy(self.pooler)
        elif self.how == "third" and self.calls == 3:
            self.mode = "other"
        return out


@pytest.mark.parametrize(
    "how, said",
    [
        ("flag", r"when kernl ran it on a 2x7 input \(warm: None -> True\)"),
        ("config", r"\(config\.my_mode: None -> 'other'\)"),
        ("swap", r"\(pooler: replaced by another BertPooler;"),
        ("third", r"while kernl compiled bucket 1x8 \(mode: None -> 'other'\)"),
    ],
)
def test_later_and_quieter_self_changes_are_refused_by_name(how, said, tmp_path):
    model = ChangesItselfLater(T.BertConfig(**SMALL)).eval()
    model.how = how
    with pytest.raises(UnsupportedModelError, match="changed itself .*" + said):
        kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32",
                               device="cpu")  # fmt: skip


class SettlesReferenceCompile(T.BertModel):
    """transformers 5.0's ModernBERT sets config.reference_compile None -> False on its first
    forward (whether it would torch.compile its own layers): a setting settled once, which
    kernl refused as a model that changed itself."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        self.config.reference_compile = False
        return super().forward(input_ids, attention_mask, token_type_ids, **kwargs)


def test_a_config_setting_settled_on_the_first_call_is_not_a_change(tmp_path):
    model = SettlesReferenceCompile(T.BertConfig(**SMALL)).eval()
    model.config.reference_compile = None
    kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32", device="cpu")


def test_a_config_without_a_vocabulary_is_named(tmp_path):
    # CANINE reads characters: a raw AttributeError on config.vocab_size before
    torch.manual_seed(0)
    model = T.CanineModel(T.CanineConfig(hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=64))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="CanineConfig has no vocab_size"):
        kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32",
                               device="cpu")  # fmt: skip


def test_ctrl_c_exits_130_and_leaves_no_partial_artifact(bert_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernl.compiler.tasks.encoder, "validate", interrupted)
    result = run(bert_dir, "-o", tmp_path / "a", "--buckets", "1x8", *CPU_FP32)
    assert result.exit_code == 130, result.output
    assert "Interrupted." in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, no partial folder
    result = CliRunner().invoke(
        main, ["compile", str(bert_dir), "-o", str(tmp_path / "a"), "--buckets", "1x8", *CPU_FP32]
    )
    assert result.exit_code == 130, result.output


def test_ctrl_c_after_the_new_artifact_is_in_place_says_it_is(bert_dir, tmp_path, monkeypatch):
    """Ctrl-C while the replaced artifact was deleted (seconds for GBs) printed "Interrupted."
    alone, read as if the previous artifact were still there: the new one was."""
    import kernl.artifacts.writer as writer

    out = tmp_path / "a"
    assert run(bert_dir, "-o", out, "--buckets", "1x8", *CPU_FP32).exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "remove_left_over", interrupted)
    result = run(bert_dir, "-o", out, "--buckets", "1x16", *CPU_FP32)
    assert result.exit_code == 130, result.output
    assert f"Interrupted after {out} was written: it holds the new artifact" in result.stderr
    assert "Traceback" not in result.output
    assert [(b.batch, b.seq) for b in kernl.artifacts.verify_artifact(out).bucket_list()] == [
        (1, 16)
    ]


def _forget_architectures(folder):
    """config.json as checkpoints saved before transformers wrote `architectures` have it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["architectures"]
    path.write_text(json.dumps(config))


def test_a_head_checkpoint_naming_no_architecture_keeps_its_head(tmp_path):
    """An old classifier checkpoint whose config.json has no `architectures` was compiled as
    its encoder (task base), the classifier dropped with only transformers' load report
    saying so. Now refused, naming the unused weights; --task picks either way."""
    torch.manual_seed(0)
    clf = T.BertForSequenceClassification(T.BertConfig(**SMALL, num_labels=3)).eval()
    clf.save_pretrained(tmp_path / "clf")
    _forget_architectures(tmp_path / "clf")
    opts = ["--buckets", "batch=1 seq=8", "--device", "cpu", "--dtype", "fp32"]
    result = run(tmp_path / "clf", "-o", tmp_path / "a", *opts)
    assert_clean_failure(result, 1, "names no architecture", "classifier.weight", "--task")
    assert not (tmp_path / "a").exists()
    result = run(tmp_path / "clf", "-o", tmp_path / "b", *opts, "--task", "sequence-classification")
    assert result.exit_code == 0, result.output
    ids = torch.randint(1, SMALL["vocab_size"], (1, 6))
    got = kernl.runtime.load(tmp_path / "b")(input_ids=ids).logits
    torch.testing.assert_close(got, clf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    result = run(tmp_path / "clf", "-o", tmp_path / "c", *opts, "--task", "base")
    assert result.exit_code == 0, result.output  # asked for: the encoder alone


def test_a_head_saved_from_a_users_own_class_keeps_its_head(tmp_path):
    """`class MyClassifier(BertForSequenceClassification)` saves architectures
    ["MyClassifier"]: no task's name, so the folder compiled as its encoder with the
    classifier dropped in silence (review 2026-12-07). Refused as a config naming none."""

    class MyClassifier(T.BertForSequenceClassification):
        pass

    torch.manual_seed(0)
    MyClassifier(T.BertConfig(**SMALL, num_labels=3)).save_pretrained(tmp_path / "clf")
    opts = ["--buckets", "batch=1 seq=8", "--device", "cpu", "--dtype", "fp32"]
    result = run(tmp_path / "clf", "-o", tmp_path / "a", *opts)
    assert_clean_failure(
        result, 1, "names no architecture kernl knows (MyClassifier)", "classifier.weight"
    )
    assert not (tmp_path / "a").exists()


def test_an_encoder_only_checkpoint_compiles_from_its_folder(tmp_path):
    """T5EncoderModel (sentence-T5's encoder) loaded as AutoModel was T5Model, whose decoder
    weights the checkpoint lacks: refused, though the object compiled (review 2026-12-07).
    The bare class the config names is loaded."""
    torch.manual_seed(0)
    config = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    t5 = T.T5EncoderModel(config).eval()
    t5.save_pretrained(tmp_path / "t5")
    opts = ["--buckets", "batch=1 seq=8", "--device", "cpu", "--dtype", "fp32"]
    result = run(tmp_path / "t5", "-o", tmp_path / "a", *opts)
    assert result.exit_code == 0, result.output
    ids = torch.randint(1, 100, (1, 6))
    got = kernl.runtime.load(tmp_path / "a")(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, t5(input_ids=ids).last_hidden_state, atol=1e-4, rtol=1e-4)


def test_an_encoder_checkpoint_naming_no_architecture_compiles_as_base(tmp_path):
    """With a stale buffer of the encoder's own in the checkpoint (an old GPT-2's
    `h.0.attn.masked_bias`): unused, but no head."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(**SMALL), add_pooling_layer=True).eval()
    bert.save_pretrained(tmp_path / "m")
    _forget_architectures(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["encoder.layer.0.attention.self.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    result = run(tmp_path / "m", "-o", tmp_path / "a", "--buckets", "batch=1 seq=8",
                 "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "a").task == "base"


def test_a_subclass_of_a_head_is_that_head():
    """A user's subclass keeps its head's task (`MyLlama(LlamaForCausalLM)` was compiled as
    base for a moment, with no generate), and of the bare model stays base."""

    class BertWithHooks(T.BertForSequenceClassification):
        pass

    class MyEncoderModel(T.BertModel):
        pass

    clf = BertWithHooks(T.BertConfig(**SMALL))
    assert task_of(clf.config, clf) == "sequence-classification"
    check_task("sequence-classification", clf)
    with pytest.raises(UnsupportedModelError, match="pass task='sequence-classification'"):
        check_task("base", clf)
    encoder = MyEncoderModel(T.BertConfig(**SMALL, architectures=["BertForMaskedLM"]))
    assert task_of(encoder.config, encoder) == "base"


def test_a_head_object_kernl_has_no_task_for_is_compiled_as_base_only():
    """BertForPreTraining from a masked-LM checkpoint (architectures: BertForMaskedLM) was
    labelled masked-lm, and any task was accepted for it: its outputs are its own."""
    pre = T.BertForPreTraining(T.BertConfig(**SMALL, architectures=["BertForMaskedLM"]))
    assert task_of(pre.config, pre) == "base"
    check_task("base", pre)
    for task in ("masked-lm", "sequence-classification"):
        with pytest.raises(UnsupportedModelError, match="no task for its head.*task=.base."):
            check_task(task, pre)
