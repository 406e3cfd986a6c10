import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rabtriever_ray import config as config_module
from rabtriever_ray.config import (
    REFERENCE_CONFIGS,
    REFERENCE_END,
    REFERENCE_START,
    ConfigError,
    DistillConfig,
    EvaluateConfig,
    IndexConfig,
    PromptConfig,
    ScoreTeacherConfig,
    StudentConfig,
    TeacherConfig,
    TeacherTrainConfig,
    config_help,
    config_reference_markdown,
    documented_config_reference,
    load_config,
    parse_job_args,
    to_dict,
    write_config_reference,
)
from rabtriever_ray.config import main as config_main
from rabtriever_ray.models import load_causal_lm
from rabtriever_ray.prompts import PromptBuilder
from rabtriever_ray.specs import CANDIDATES, NEGATIVE_POOLS, ROUND_POOLS, CandidateSpec, parse_spec

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
# Which dataclass each folder under configs/ holds.
CONFIG_CLASSES = {
    "teacher": TeacherConfig,
    "teacher_train": TeacherTrainConfig,
    "configs": DistillConfig,
    "score_teacher": ScoreTeacherConfig,
    "index": IndexConfig,
    "evaluate": EvaluateConfig,
}


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_yaml_loads_and_starts_with_its_command(path):
    assert path.read_text().startswith("#"), f"{path} must start with a comment giving its command"
    first = path.read_text().splitlines()[0]
    assert "python jobs/" in first or "load_config(" in first, f"{path}: its first line is not a command"
    config = load_config(CONFIG_CLASSES[path.parent.name], path)
    if isinstance(config, TeacherConfig):
        # The prompt renders with a real chat-template tokenizer and its answer words are single tokens.
        _, tokenizer = load_causal_lm("tiny-random-llama", device="cpu")
        builder = PromptBuilder(tokenizer, config.prompt)
        assert builder.pair_prompts(["q"], ["d"]).input_ids


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: tiny-random-llama\nprompt:\n  max_doc_tokens: 64\n")
    config = load_config(
        TeacherConfig,
        path,
        ["prompt.max_query_tokens=32", "max_batch_tokens=100", "dtype=bfloat16", "prompt.system=None"],
    )
    assert config.model == "tiny-random-llama"
    assert config.prompt.max_doc_tokens == 64 and config.prompt.max_query_tokens == 32
    assert config.max_batch_tokens == 100 and config.dtype == "bfloat16" and config.prompt.system is None
    assert config.prompt.instruction == PromptConfig().instruction
    assert to_dict(config)["prompt"]["max_doc_tokens"] == 64


def test_command_line_type_conversion():
    config = load_config(StudentConfig, None, ["input_norm=false", "proj_dim=8", "predictor_hidden= 16"])
    assert config.input_norm is False and config.proj_dim == 8 and config.predictor_hidden == 16
    assert load_config(StudentConfig, None, ["input_norm=yes"]).input_norm is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["prompt.max_doc_tokns=5"],
            "unknown config key 'prompt.max_doc_tokns'; did you mean 'prompt.max_doc_tokens'",
        ),
        (["modle=x"], "unknown config key 'modle'"),
        (["max_batch_tokens=lots"], "max_batch_tokens='lots' is not a valid int"),
        (["dtype=float8"], "'dtype' must be one of"),
        (["prompt=3"], "'prompt' is a section"),
        (["nokey"], "not of the form key=value"),
        (["prompt.max_doc_tokens=0"], "prompt.max_doc_tokens must be >= 1"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TeacherConfig, None, overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        ("modell: x\n", "unknown config key 'modell'"),
        (
            "prompt:\n  answer_yes: yes\n",
            "'prompt.answer_yes' expects str, got bool True \\(quote it in YAML\\)",
        ),
        ("prompt:\n  yes: x\n", "key prompt.True is not a string"),
        ("max_batch_tokens: 1.5\n", "'max_batch_tokens' expects int"),
        ("prompt: 3\n", "'prompt' must be a mapping"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("a: [\n", "not valid YAML"),
        ("prompt:\n  max_query_tokens: -1\n", "prompt.max_query_tokens must be >= 1"),
    ],
)
def test_bad_yaml_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TeacherConfig, path)
    assert str(path) in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TeacherConfig, "/no/such/file.yaml")


def test_help_lists_every_key_with_its_help():
    text = config_help(TeacherConfig)
    for key in ("model", "prompt.instruction", "prompt.max_doc_tokens", "max_batch_tokens", "dtype"):
        assert f"  {key} (" in text
    assert "documents are cut at the end" in text


def test_distill_config_file_loads_and_matches_its_teacher_prompt():
    root = Path(__file__).resolve().parents[1] / "configs"
    distill = load_config(DistillConfig, root / "esconv_strategy.yaml")
    teacher = load_config(TeacherConfig, root / "teacher" / "esconv_strategy.yaml")
    assert distill.train_data == "esconv_strategy_train" and distill.max_val_queries == 150
    # Pre-scored data from jobs/score_teacher.py with the teacher config is accepted only with the same prompt.
    assert distill.teacher.prompt == teacher.prompt and distill.teacher.model == teacher.model
    # The fine-tuned teacher is trained with the same prompt it is then scored and distilled with.
    trained = load_config(TeacherTrainConfig, root / "teacher_train" / "esconv_strategy.yaml")
    assert trained.teacher.prompt == teacher.prompt and trained.teacher.model == teacher.model


def test_a_section_given_as_a_string_is_its_shorthand_field(tmp_path):
    """``teacher: runs/x`` (YAML) and ``teacher=runs/x`` (override) set teacher.model and keep the rest."""
    path = tmp_path / "d.yaml"
    path.write_text("teacher: runs/my_teacher\n")
    assert load_config(DistillConfig, path).teacher == TeacherConfig(model="runs/my_teacher")
    path.write_text("teacher:\n  prompt:\n    doc_label: Skill\n")
    config = load_config(DistillConfig, path, ["teacher=runs/my_teacher", "teacher.max_batch_tokens=64"])
    assert config.teacher.model == "runs/my_teacher" and config.teacher.prompt.doc_label == "Skill"
    assert config.teacher.max_batch_tokens == 64
    trained = load_config(TeacherTrainConfig, None, ["teacher=tiny-random-llama"])
    assert trained.teacher.model == "tiny-random-llama"
    # A section without a shorthand field still needs its keys.
    with pytest.raises(ConfigError, match="'student' is a section"):
        load_config(DistillConfig, None, ["student=big"])
    path.write_text("student: big\n")
    with pytest.raises(ConfigError, match="'student' must be a mapping"):
        load_config(DistillConfig, path)


def test_a_section_given_as_a_yaml_path_is_loaded_from_that_file(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs" / "teacher"
    teacher = load_config(TeacherConfig, root / "esconv_strategy.yaml")
    config = load_config(
        DistillConfig, None, [f"teacher={root / 'esconv_strategy.yaml'}", "teacher.prompt.max_doc_tokens=99"]
    )
    assert config.teacher == dataclasses.replace(
        teacher, prompt=dataclasses.replace(teacher.prompt, max_doc_tokens=99)
    )
    path = tmp_path / "d.yaml"
    path.write_text(f"teacher: {root / 'scifact.yaml'}\n")
    assert load_config(DistillConfig, path).teacher == load_config(TeacherConfig, root / "scifact.yaml")
    # The section's file is checked like any config file, and named in the error.
    bad = tmp_path / "teacher.yaml"
    bad.write_text("modell: x\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: unknown config key 'modell'"):
        load_config(DistillConfig, None, [f"teacher={bad}"])
    # A teacher YAML where the job's own config is expected says where it belongs.
    with pytest.raises(
        ConfigError, match="looks like a teacher config \\(TeacherConfig\\): pass it as --teacher"
    ):
        load_config(DistillConfig, root / "scifact.yaml")


# -- docs/configuration.md's configuration reference ---------------------------------------------------------------


def test_documented_config_reference_is_current():
    assert documented_config_reference() == config_reference_markdown(), (
        "docs/configuration.md's configuration reference is stale: run "
        "python -m rabtriever_ray.config.reference --write"
    )


def test_the_command_line_checks_docs_configuration_md_by_default():
    done = subprocess.run(
        [sys.executable, "-m", "rabtriever_ray.config.reference", "--check"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert str(Path("docs") / "configuration.md") in done.stdout and "current" in done.stdout


def _reference_sections(markdown: str) -> dict[str, list[str]]:
    """Table rows under each ``#### <class>`` heading."""
    sections: dict[str, list[str]] = {}
    for part in markdown.split("#### ")[1:]:
        name, _, body = part.partition("\n")
        sections[name] = [line for line in body.splitlines() if line.startswith("| `")]
    return sections


def _every_field(cls: type, prefix: str = ""):
    """(dotted key, field, owning class) of every field, nested dataclasses (found on a default instance) too."""
    defaults = cls()
    derived = getattr(cls, "DERIVED", {})
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f, cls
        if dataclasses.is_dataclass(getattr(defaults, f.name)):
            for key, *rest in _every_field(type(getattr(defaults, f.name)), f"{prefix}{f.name}."):
                if key.removeprefix(f"{prefix}{f.name}.").split(".")[0] not in derived.get(f.name, ()):
                    yield (key, *rest)


def test_the_distillation_recipe_for_its_teacher_keeps_its_own_defaults_and_refuses_keys_it_sets():
    config = load_config(DistillConfig, None, ["finetune.lr=0.001"])
    assert (config.finetune.lr, config.finetune.train_layers) == (
        0.001,
        DistillConfig().finetune.train_layers,
    )
    assert DistillConfig().finetune.train_layers == 8 != TeacherTrainConfig().train_layers
    reference = config_reference_markdown()
    assert "| `finetune.train_layers` | `int` | 8 |" in reference and "`finetune.data`" not in reference
    for key in ("data=x", "teacher.model=x", "val_split=test", "seed=3"):
        with pytest.raises(
            ConfigError, match=f"finetune.{key.split('.')[0].split('=')[0]} is set by the distil"
        ):
            load_config(DistillConfig, None, [f"finetune.{key}"])


def test_config_reference_has_a_row_per_field_with_its_help():
    sections = _reference_sections(config_reference_markdown())
    assert list(sections) == [cls.__name__ for cls, _ in REFERENCE_CONFIGS]
    covered = set()
    for cls, _ in REFERENCE_CONFIGS:
        rows = {
            row.split(" | ", 1)[0].removeprefix("| `").removesuffix("`"): row
            for row in sections[cls.__name__]
        }
        keys = []
        for key, f, owner in _every_field(cls):
            covered.add(owner)
            keys.append(key)
            help_text = f.metadata["help"].replace("|", r"\|").replace("<", r"\<")
            assert rows.get(key, "").endswith(f" | {help_text} |"), (
                f"{cls.__name__}: no row for {key!r} with its help"
            )
        assert list(rows) == keys  # in field order, nothing else
    # Every config dataclass of the module is reachable from a top-level config, so none is left out.
    dataclasses_in_module = {
        v for v in vars(config_module).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
    }
    assert covered == dataclasses_in_module


def test_config_reference_renders_types_and_defaults_as_yaml_takes_them():
    markdown = config_reference_markdown()
    assert "| `share_prefix` | `bool` | true |" in markdown
    assert "| `prompt.system` | `str \\| None` | `None` |" in markdown
    assert "| `dtype` | `auto` \\| `float32` \\| `bfloat16` \\| `float16` | `auto` |" in markdown
    assert '| `data_dir` | `str` | `""` |' in markdown
    assert "| `loss` | `LossConfig` | `loss.*` below | loss mix |" in markdown
    assert "| `lr` | `float` | 0.001 |" in markdown
    assert "| `demo_distill` | `list[str]` | `[]` |" in markdown
    assert "| `router.max_ongoing_requests` | `int` | 256 |" in markdown
    assert "runs/\\<name>" in markdown and "all \\| bm25:K" in markdown  # no HTML tag, no extra column


def test_check_fails_on_a_stale_copy_and_write_replaces_only_the_block(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text(
        f"# Title\n\nintro\n\n{REFERENCE_START}\n| `model` | old |\n{REFERENCE_END}\n\n## After\n"
    )
    page.chmod(0o640)
    check = [sys.executable, "-m", "rabtriever_ray.config.reference", "--check", "--file", str(page)]
    stale = subprocess.run(check, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert stale.returncode == 1
    assert "stale" in stale.stderr and "python -m rabtriever_ray.config.reference --write" in stale.stderr

    config_main(["--write", "--file", str(page)])
    text = page.read_text()
    assert text.startswith(f"# Title\n\nintro\n\n{REFERENCE_START}\n\n#### TeacherConfig\n")
    assert text.endswith(f" |\n\n{REFERENCE_END}\n\n## After\n")
    assert documented_config_reference(page) == config_reference_markdown()
    # Renamed over the old file: its mode is kept and no temporary file is left behind.
    assert page.stat().st_mode & 0o777 == 0o640 and [p.name for p in tmp_path.iterdir()] == [
        "configuration.md"
    ]
    assert write_config_reference(page) is False  # already current: the file is left alone
    config_main(["--check", "--file", str(page)])  # current: returns, no exit status 1


def test_page_without_markers_is_an_error(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text(f"# Title\n{REFERENCE_END}\n{REFERENCE_START}\n")
    with pytest.raises(ConfigError, match="expected one <!-- config-reference:start --> line"):
        write_config_reference(page)
    assert page.read_text() == f"# Title\n{REFERENCE_END}\n{REFERENCE_START}\n"


def test_prompt_differences_read_missing_fields_as_their_defaults():
    """Records written before a prompt field existed were rendered with its default, or, for the instruction's
    place, with the instruction closing the message, as every prompt was then."""
    from rabtriever_ray.config import PromptConfig, prompt_differences, recorded_prompt, to_dict

    before = ("enable_thinking", "answer_prefix", "instruction_first")
    old_record = {k: v for k, v in to_dict(PromptConfig()).items() if k not in before}
    closing = PromptConfig(instruction_first=False)
    assert prompt_differences(old_record, to_dict(closing)) == []
    assert recorded_prompt(old_record) == {**old_record, "instruction_first": False}
    assert prompt_differences(old_record, to_dict(PromptConfig())) == [("instruction_first", False, True)]
    assert prompt_differences(old_record, to_dict(PromptConfig(answer_prefix="Answer:"))) == [
        ("answer_prefix", "", "Answer:"),
        ("instruction_first", False, True),
    ]
    assert prompt_differences(to_dict(PromptConfig()), to_dict(PromptConfig())) == []
    # A published reranker's template has no such choice: its old records read as today's.
    qwen3 = PromptConfig(preset="qwen3-reranker")
    old_qwen3 = {k: v for k, v in to_dict(qwen3).items() if k not in before}
    assert prompt_differences(old_qwen3, to_dict(qwen3)) == []
    assert prompt_differences({"doc_label": "Skill"}, {"doc_label": "Document"}) == [
        ("doc_label", "Skill", "Document")
    ]


# -- the jobs' command line ----------------------------------------------------------------------------------------


def test_job_flags_set_the_keys_of_the_same_name_then_overrides_apply(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs"
    argv = ["--data", "D", "--split", "dev", "--out", "O", "--candidates", "all", "--max-queries", "20"]
    argv += [
        "--model",
        "tiny-random-llama",
        "--training",
        "--actors",
        "1:4",
        "teacher.prompt.max_doc_tokens=7",
    ]
    config = parse_job_args(ScoreTeacherConfig, argv, aliases={"--model": "teacher"})
    assert (config.data, config.split, config.out, config.max_queries, config.actors) == (
        "D",
        "dev",
        "O",
        20,
        "1:4",
    )
    assert config.training is True and config.overwrite is False
    assert config.teacher.model == "tiny-random-llama" and config.teacher.prompt.max_doc_tokens == 7
    # A teacher YAML as --teacher; a job YAML as --config, the flags and overrides on top of it.
    teacher = load_config(TeacherConfig, root / "teacher" / "scifact.yaml")
    argv = ["--teacher", str(root / "teacher" / "scifact.yaml"), "--methods", "bm25,teacher", "seed=3"]
    config = parse_job_args(
        EvaluateConfig, ["--config", str(root / "evaluate" / "esconv_strategy.yaml"), *argv]
    )
    assert config.teacher == teacher and config.methods == ["bm25", "teacher"] and config.seed == 3
    assert config.max_queries == 300  # from the YAML
    index = parse_job_args(
        IndexConfig, ["--checkpoint", "C", "--data", "D", "--out", "O", "--index-type", "hnsw"]
    )
    assert index.index_type == "hnsw" and index.teacher is None and index.actors == "1:1"


def test_a_job_config_names_what_is_missing_or_misplaced():
    with pytest.raises(ConfigError, match="missing required config key 'out': set it with --out"):
        parse_job_args(ScoreTeacherConfig, ["--data", "D"])
    with pytest.raises(ConfigError, match="actors expects MIN:MAX or N, got 'many'"):
        parse_job_args(IndexConfig, ["--checkpoint", "C", "--data", "D", "--out", "O", "--actors", "many"])
    teacher_yaml = Path(__file__).resolve().parents[1] / "configs" / "teacher" / "esconv_strategy.yaml"
    with pytest.raises(ConfigError, match="looks like a teacher config .*: pass it as --teacher"):
        parse_job_args(EvaluateConfig, ["--config", str(teacher_yaml), "--data", "D", "--split", "dev"])
    with pytest.raises(SystemExit):
        parse_job_args(ScoreTeacherConfig, ["--no-such-flag", "x"])


# -- candidate specs: parsed once, when a config is built ------------------------------------------------------------

# Every key that takes a spec, with the forms it accepts as its errors list them.
SPEC_KEYS = [
    (DistillConfig, "candidates", "all, bm25:K, random:K (K an integer >= 1) or a path to a TREC run file"),
    (DistillConfig, "val_candidates", "all, bm25:K, random:K (K an integer >= 1) or a path to a TREC run file"),
    (
        DistillConfig,
        "round_pool",
        "all, bm25:K, student:K (K an integer >= 1) or a path to a TREC run file",
    ),
    (TeacherTrainConfig, "negatives_from", "all or bm25:K (K an integer >= 1)"),
    (TeacherTrainConfig, "val_candidates", "all, bm25:K, random:K (K an integer >= 1) or a path to a TREC run file"),
    (ScoreTeacherConfig, "candidates", "all, bm25:K, random:K (K an integer >= 1) or a path to a TREC run file"),
    (EvaluateConfig, "candidates", "all, bm25:K, random:K (K an integer >= 1) or a path to a TREC run file"),
]
MISSING_RUN = "no/such/run.trec"


def _spec_problem(key: str, value: str) -> str:
    """What the error says is wrong with ``value`` for ``key`` (before the accepted forms)."""
    if value == "":
        return "empty"
    if value.startswith("student:") and key != "round_pool":
        return "student:K is not accepted here"
    if value.startswith("random:") and key in ("round_pool", "negatives_from"):
        return "random:K is not accepted here"
    if value in ("bm25:x", "random:z", "student:y"):
        return f"{value.split(':')[0]}:K needs an integer K"
    if value == "bm25:0":
        return "K must be >= 1"
    if key == "negatives_from":  # negatives never come from a run file: the value is just not a form it takes
        return ""
    return f"no run file at {MISSING_RUN}"


BAD_SPECS = [
    (cls, key, accepted, value)
    for cls, key, accepted in SPEC_KEYS
    for value in ("bm25:x", "bm25:0", "random:z", "student:3", "student:y", MISSING_RUN, "")
    if (key, value) != ("round_pool", "student:3")
]


@pytest.mark.parametrize(
    "cls, key, accepted, value", BAD_SPECS, ids=[f"{c.__name__}.{k}={v!r}" for c, k, _, v in BAD_SPECS]
)
def test_a_bad_spec_fails_at_construction_and_at_load_naming_the_key(tmp_path, cls, key, accepted, value):
    problem = _spec_problem(key, value)
    message = f"{key} {value!r}: {problem + '; ' if problem else ''}expected {accepted}"
    with pytest.raises(ConfigError) as built:
        cls(**{key: value})
    assert str(built.value) == message
    with pytest.raises(ConfigError) as overridden:
        load_config(cls, None, [f"{key}={value}"])
    assert str(overridden.value) == f"defaults: {message}"
    path = tmp_path / "job.yaml"
    path.write_text(f"{key}: {value!r}\n")
    with pytest.raises(ConfigError) as loaded:
        load_config(cls, path)
    assert str(loaded.value) == f"{path}: {message}"


def test_a_bad_spec_in_a_section_names_its_dotted_key():
    message = "defaults: finetune.negatives_from 'bm25:x': bm25:K needs an integer K"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DistillConfig, None, ["finetune.negatives_from=bm25:x"])


def test_good_specs_parse_once_beside_their_keys(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 1.0 bm25\n")
    config = load_config(
        DistillConfig, None, [f"candidates={run}", "val_candidates=bm25:6", "round_pool=student:4"]
    )
    assert config.candidates_spec == CandidateSpec("run", path=run) and config.candidates_spec.is_run
    assert config.val_candidates_spec == CandidateSpec("bm25", k=6) and not config.val_candidates_spec.is_run
    assert config.round_pool_spec == CandidateSpec("student", k=4)
    assert config.finetune.negatives_from_spec == config.finetune.val_candidates_spec == CandidateSpec("all")
    trained = TeacherTrainConfig(negatives_from="bm25:5", val_candidates=str(run))
    assert trained.negatives_from_spec.k == 5 and trained.val_candidates_spec.path == run
    assert ScoreTeacherConfig(candidates="bm25:3").candidates_spec.k == 3
    assert DistillConfig(candidates="random:3").candidates_spec == CandidateSpec("random", k=3)
    assert EvaluateConfig(candidates=str(run)).candidates_spec.is_run
    # The keys stay strings: the YAML, the overrides, to_dict and the reference are as before.
    assert config.candidates == str(run) and to_dict(config)["round_pool"] == "student:4"
    assert not any(key.endswith("_spec") for key in to_dict(config))
    assert dataclasses.replace(config, round_pool="bm25:9").round_pool_spec == CandidateSpec("bm25", k=9)


def test_a_spec_reads_back_from_its_text(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("")
    for text, allowed in [
        ("all", CANDIDATES),
        ("bm25:20", NEGATIVE_POOLS),
        ("random:4", CANDIDATES),
        ("student:5", ROUND_POOLS),
    ]:
        spec = parse_spec(text, "key", allowed)
        assert str(spec) == spec.text == text and parse_spec(spec.text, "key", allowed) == spec
    assert str(parse_spec(str(run), "candidates")) == str(run)
    # Another error class, for a reader that parses a spec at run time; ValueError by default.
    with pytest.raises(KeyError, match="negatives_from 'student:2': student:K is not accepted here"):
        parse_spec("student:2", "negatives_from", NEGATIVE_POOLS, KeyError)
    with pytest.raises(ValueError, match="candidates 'bm25:-1': K must be >= 1"):
        parse_spec("bm25:-1", "candidates")


def test_specs_and_the_configs_import_no_torch_ray_or_pyarrow():
    """The configs parse their specs themselves: building one imports neither the training code nor its stack."""
    code = (
        "import sys, rabtriever_ray.specs\n"
        "heavy = {'torch', 'ray', 'pyarrow', 'rabtriever_ray.rounds', 'rabtriever_ray.data'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "from rabtriever_ray.config import DistillConfig\n"
        "DistillConfig(round_pool='student:4')\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[]"]
