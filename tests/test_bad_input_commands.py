"""Bad input to the other sub-commands (docs/bad-input.md: merge, moe, eval, plan, data): each
refused with one line and exit 2 before any model loads, nothing written, through the CLI.

The harness (expect_error, run_cli, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import pytest

from test_bad_input import _wide_console, expect_error, run_cli, work  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_model_dir()
    return {"base": base, "r8": random_lora_adapter(root / "r8", base, r=8),
            "r4": random_lora_adapter(root / "r4", base, seed=1, r=4)}


# --------------------------------------------------------------------------- merge

MERGE = [
    (["adapters=[{r8},{r4}]", "weights=[.nan,1]"], "weights must be a finite number, got nan"),
    (["adapters=[{r8},{r4}]", "weights=[1e400,1]", "method=cat"], "weights must be a finite number, got inf"),
    (["adapters=[{r8},{r8}]", "weights=[0,0]"], "weights are all 0"),
    (["adapters=[{r8},{r4}]", "method=svd", "svd_rank=0"], "svd_rank must be >= 1, got 0"),
    (["adapters=[{r8},{r8}]", "method=linear", "svd_rank=4"], "svd_rank= applies to the *svd methods"),
    (["adapters=[{r8},{r8}]", "method=linear", "density=0.5"], "density= applies to the ties*"),
    (["adapters=[{r8},{r8}]", "method=ties", "density=2"], "density must be in (0, 1], got 2.0"),
    (["adapters=[{r8},{r8}]", "seed=-1"], "seed must be in [0, 4294967295], got -1"),
    (["adapter={r8}", "max_shard_size=abc"], "max_shard_size: expected a size like 12GiB"),
    (["adapter={r8}", "max_shard_size=0"], "max_shard_size: expected a size of at least 1 byte"),
    (["adapter={r8}/adapter_config.json"], "is a file, not an adapter directory; the adapter is the folder"),
    (["adapter={r8}", "adapters=[{r4}]"], "give exactly one of adapter=DIR"),
    (["adapters=[{r8}]"], "adapters= needs at least 2 adapter directories, got 1"),
]


@pytest.mark.parametrize("args,says", MERGE, ids=[" ".join(a) for a, _ in MERGE])
def test_merge_refuses(work, capsys, adapters, args, says):
    expect_error(["merge", *[a.format(**adapters) for a in args], f"out_dir={work / 'merged'}"], 2, says,
                 capsys=capsys, root=work)


def test_empty_out_dir_is_named_as_empty(work, capsys, adapters):
    expect_error(["merge", f"adapter={adapters['r8']}", "out_dir="], 2, "out_dir is empty: give the directory",
                 capsys=capsys, root=work)


def test_merge_records_the_svd_rank_it_used(tmp_path, adapters):
    import json

    from finetune.merge import combine_adapters

    out = combine_adapters([str(adapters["r8"]), str(adapters["r4"])], str(tmp_path / "c"), method="svd")
    assert json.loads((out / "merge_info.json").read_text())["svd_rank"] == 8  # peft's default: the largest


# --------------------------------------------------------------------------- moe


def _moe_yaml(work, base, extra: str = "", expert: str = "") -> str:
    f = work / "moe.yaml"
    f.write_text(f"base_model: {base}\ngate_mode: random\n{extra}experts:\n  - source_model: {base}\n{expert}"
                 f"  - source_model: {base}\n")
    return str(f)


MOE = [
    ("", "    noise_scale: lots\n", "experts[0]: noise_scale: expected null or a finite number, got 'lots'"),
    ("", "    noise_scale: .nan\n", "experts[0]: noise_scale must be a finite number, got nan"),
    ("", "    noise_scale: -1\n", "experts[0]: noise_scale must be >= 0, got -1.0"),
    ("", "    residual_scale: .inf\n", "experts[0]: residual_scale must be a finite number, got inf"),
    ("seed: abc\n", "", "seed: expected an integer, got 'abc'"),
    ("seed: -4\n", "", "seed must be in [0, 4294967295], got -4"),
    ("experts_per_token: true\n", "", "experts_per_token: expected an integer, got 'True'"),
    ("experts_per_token: 3\n", "", "experts_per_token must be an integer in [1, 2], got 3"),
    ("dtype: int8\n", "", "dtype must be one of auto, bf16"),
    ("quantize_prompting: maybe\n", "", "quantize_prompting: expected true or false, got 'maybe'"),
]


@pytest.mark.parametrize("extra,expert,says", MOE, ids=[m[2][:40] for m in MOE])
def test_moe_config_refuses(work, capsys, adapters, extra, expert, says):
    spec = _moe_yaml(work, adapters["base"], extra, expert)
    expect_error(["moe", f"config={spec}", f"out_dir={work / 'moe'}"], 2, says, capsys=capsys, root=work)


@pytest.mark.parametrize("arg,says", [
    ("max_tokens=-1", "max_tokens must be >= 1, got -1"),
    ("max_rows=0", "max_rows must be >= 1, got 0"),
    ("max_shard_size=abc", "max_shard_size: expected a size like 12GiB"),
])
def test_moe_command_refuses(work, capsys, adapters, arg, says):
    spec = _moe_yaml(work, adapters["base"])
    expect_error(["moe", f"config={spec}", arg, f"out_dir={work / 'moe'}"], 2, says, capsys=capsys, root=work)


def test_moe_config_binary_file(work, capsys):
    f = work / "moe.yaml"
    f.write_bytes(b"\x00\xff\xfe\x80binary")
    expect_error(["moe", f"config={f}", f"out_dir={work / 'moe'}"], 2, "is not UTF-8 text", capsys=capsys, root=work)


def test_moe_report_rows_checked(tmp_path):
    from finetune.errors import UsageError
    from finetune.moe.report import read_rows, row_text

    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"text": "a"}\n\xff\xfe\n')
    with pytest.raises(UsageError, match="not UTF-8 text"):
        read_rows(str(f))
    f.write_text("3")
    f = f.rename(tmp_path / "rows.json")
    with pytest.raises(UsageError, match="report data .*rows.json: expected a JSON list of rows .*got int"):
        read_rows(str(f))
    with pytest.raises(UsageError, match="field 'instruction' must be a string"):
        row_text({"instruction": 42}, None)
    with pytest.raises(UsageError, match="field 'messages' must be a list of turns"):
        row_text({"messages": ["hi"]}, None)


# --------------------------------------------------------------------------- eval


def _suite(work, line: str, metrics: str = "loss") -> str:
    f = work / "bad-suite.yaml"
    f.write_text(f"name: bad\ntasks:\n  - name: qa\n    data: data.jsonl\n    metrics: [{metrics}]\n{line}")
    (work / "data.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    return str(f)


EVAL_SUITE = [
    ("    batch_size: 0\n", "task 1: batch_size must be >= 1, got 0"),
    ("    seq_len: abc\n", "task 1: seq_len: expected an integer, got 'abc'"),
    ("    limit: -3\n", "task 1: n must be >= 1, got -3"),
    ("    generation: {max_new_tokens: 0}\n", "generation.max_new_tokens must be >= 1, got 0"),
    ("    generation: {top_p: 2}\n", "generation.top_p must be in (0, 1], got 2.0"),
    ("    generation: {do_sample: sometimes}\n", "generation.do_sample: expected true or false, got 'sometimes'"),
    ("    prompt: html\n", "task 1: prompt must be one of chat, plain, got 'html'"),
    ("    target_delimiter: ' '\n", "task 'qa': target_delimiter applies to plain prompts only"),
]


@pytest.mark.parametrize("line,says", EVAL_SUITE, ids=[s for _, s in EVAL_SUITE])
def test_eval_suite_values(work, capsys, adapters, line, says):
    suite = _suite(work, line)
    expect_error(["eval", f"suite={suite}", "models=[base]", f"base_model={adapters['base']}",
                  f"out_dir={work / 'eval'}", "progress=false"], 2, says, capsys=capsys, root=work)


def test_eval_rolling_metric_needs_plain_prompt(work, capsys, adapters):
    suite = _suite(work, "", metrics="bits_per_byte")
    expect_error(["eval", f"suite={suite}", "models=[base]", f"base_model={adapters['base']}",
                  f"out_dir={work / 'eval'}", "progress=false"], 2,
                 "metric 'bits_per_byte' is lm-eval's rolling perplexity of plain text; add prompt: plain",
                 capsys=capsys, root=work)


def test_eval_text_rows_with_a_prompt_metric(work, capsys, adapters):
    suite = _suite(work, "    prompt: plain\n")
    (work / "data.jsonl").write_text('{"text": "Some plain text."}\n')
    expect_error(["eval", f"suite={suite}", "models=[base]", f"base_model={adapters['base']}",
                  f"out_dir={work / 'eval'}", "progress=false"], 2,
                 "metric 'loss' needs rows with a prompt; rows with only 'text' take word_perplexity",
                 capsys=capsys, root=work)


def test_eval_reference_not_an_adapter(work, capsys, adapters):
    expect_error(["eval", "suite=tiny-pref", "models=[base]", f"base_model={adapters['base']}",
                  f"reference={work}", f"out_dir={work / 'eval'}", "progress=false"], 2,
                 "is not an adapter directory (no adapter_config.json)", capsys=capsys, root=work)


@pytest.mark.parametrize("arg,says", [
    ("n=-2", "n must be >= 1, got -2"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("max_new_tokens=0", "max_new_tokens must be >= 1, got 0"),
    ("device=tpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
])
def test_eval_args(work, capsys, adapters, arg, says):
    expect_error(["eval", "suite=tiny", "models=[base]", f"base_model={adapters['base']}", arg,
                  f"out_dir={work / 'eval'}", "progress=false"], 2, says, capsys=capsys, root=work)


# --------------------------------------------------------------------------- plan and data


@pytest.mark.parametrize("arg,says", [
    ("gpu_memory=1e400", "gpu_memory: expected a size of at least 1 byte"),
    ("gpu_memory=0", "gpu_memory: expected a size of at least 1 byte"),
    ("gpu_memory=twelve", "gpu_memory: expected a size like 12GiB"),
    ("slack=-1", "slack must be in [0, 1), got -1.0"),
    ("train.lr=-1", "train.lr must be in (0, 1], got -1.0"),
])
def test_plan_refuses(work, capsys, arg, says):
    expect_error(["plan", "recipe=tiny-lora", arg], 2, says, capsys=capsys, root=work)


def test_plan_gpu_memory_in_bytes(capsys):
    rc, out, err = run_cli(["plan", "recipe=tiny-lora", "gpu_memory=16000000000", "format=json"], capsys)
    assert rc == 0 and '"budget_bytes": 16000000000' in out, err


@pytest.mark.parametrize("arg,says", [
    ("n=-1", "n must be >= 0, got -1"),
    ("data.max_rows=0", "data.max_rows must be >= 1, got 0"),
])
def test_data_refuses(work, capsys, arg, says):
    expect_error(["data", "recipe=tiny-lora", arg], 2, says, capsys=capsys, root=work)


def test_data_binary_file(work, capsys):
    f = work / "bin.jsonl"
    f.write_bytes(b"x\x00\xff\xfe\x80binary")
    expect_error(["data", "recipe=tiny-lora", f"data.path={f}", "data.format=text"], 2, "not UTF-8 text",
                 capsys=capsys, root=work)


def test_unexpected_errors_are_not_a_bare_type_name(capsys, monkeypatch):
    import finetune.cli as cli

    def boom(argv):
        raise AssertionError()

    monkeypatch.setattr(cli, "run", boom)
    rc, out, err = run_cli(["recipes"], capsys)
    assert rc == 1 and err.startswith("error: internal error, please report it") and "AssertionError" in err


def test_strict_names_the_first_bad_line(work, capsys):
    import json

    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(40)]
    lines[3] = lines[30] = json.dumps({"instruction": "no output"})  # rows are shuffled before use
    f = work / "data.jsonl"
    f.write_text("\n".join(lines) + "\n")
    expect_error(["data", "recipe=tiny-lora", f"data.path={f}", "data.format=alpaca", "data.strict=true",
                  "data.cache=false"], 2, "data.jsonl line 4: field 'output'", capsys=capsys, root=work)


def test_eval_data_binary_file(work, capsys, adapters):
    f = work / "bin.jsonl"
    f.write_bytes(b"x\x00\xff\xfe\x80binary")
    expect_error(["eval", "suite=tiny", "models=[base]", f"base_model={adapters['base']}", f"data={f}",
                  f"out_dir={work / 'eval'}", "progress=false"], 2, "is not UTF-8 text", capsys=capsys, root=work)
