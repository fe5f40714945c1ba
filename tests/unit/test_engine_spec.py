"""One engine spec: each config holds a BackendSpec, and every field of it can be set from each
config's YAML `args:` (or settings mapping) and from the CLIs. A new spec field fails here until
it has a sample value below, and then until it reaches every config."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from backends.spec import SPEC_FIELDS, BackendSpec
from deployments.config import LLM_APP_ENGINE, UNUSED_SPEC_FIELDS, LLMAppConfig, ServeConfig
from deployments.serve_cli import config_from_args as serve_config_from_cli
from deployments.serve_cli import parse_args as serve_cli_args
from jobs.generate import JobConfig
from jobs.generate import parse_args as job_cli_args

REPO_ROOT = Path(__file__).resolve().parents[2]
# Per spec field: (what a user writes, what the spec then holds), unlike every config's default.
SAMPLES = {
    "backend": ("vllm", "vllm"),
    "model": ("some/model-folder", "some/model-folder"),
    "guard": ("none", None),
    "max_num_seqs": (3, 3),
    "dtype": ("float16", "float16"),
    "device": ("cuda", "cuda"),
    "num_threads": (3, 3),
    "max_model_len": (1024, 1024),
    "enforce_eager": (True, True),
    "kv_cache_gib": (2, 2),
    "gpu_memory_utilization": (0.5, 0.5),
    "wedge_timeout_s": (12.5, 12.5),
}
# The LLM app runs Ray Serve LLM's engine, which these never reach: each is refused (with a
# value unlike the app's own) rather than silently dropped. Every other field is settable there.
LLM_APP_REFUSED = {"backend": "codefast", "num_threads": 3, "gpu_memory_utilization": 0.5,
                   "wedge_timeout_s": 12.5}
JOB = {"input": "in.jsonl", "output": "out"}


def test_every_spec_field_has_a_sample_unlike_each_configs_default():
    assert set(SAMPLES) == set(SPEC_FIELDS), "a new BackendSpec field: give it a sample here, plumb it"
    defaults = {"serve": ServeConfig().engine, "job": BackendSpec(), "llm": LLM_APP_ENGINE}
    for name, (_, expected) in SAMPLES.items():
        for config, engine in defaults.items():
            if not (config == "llm" and name in LLM_APP_REFUSED):
                assert getattr(engine, name) != expected, (config, name)
    assert set(LLM_APP_REFUSED) == set(UNUSED_SPEC_FIELDS)


def test_no_config_declares_a_field_of_the_spec_itself():
    for cls in (ServeConfig, LLMAppConfig, JobConfig):
        own = {f.name for f in fields(cls)}
        assert "engine" in own and not own & set(SPEC_FIELDS), cls.__name__


@pytest.mark.parametrize("name", SPEC_FIELDS)
def test_serve_yaml_args_and_cli_set_every_spec_field(name):
    given, expected = SAMPLES[name]
    config = ServeConfig.from_args({name: given})
    assert config.engine == BackendSpec(**{name: expected})
    config = serve_config_from_cli(serve_cli_args(cli_flag(name, given)))
    assert config.engine == BackendSpec(**{name: expected})


@pytest.mark.parametrize("name", SPEC_FIELDS)
def test_llm_app_yaml_args_set_every_spec_field_or_refuse_it_by_name(name):
    if name in LLM_APP_REFUSED:
        with pytest.raises(ValueError, match=f"^{name} stays"):
            LLMAppConfig.from_args({name: LLM_APP_REFUSED[name]})
        assert getattr(LLMAppConfig.from_args({name: getattr(LLM_APP_ENGINE, name)}).engine, name) \
            == getattr(LLM_APP_ENGINE, name)  # its own value may still be written out
        return
    given, expected = SAMPLES[name]
    assert LLMAppConfig.from_args({name: given}).engine == LLM_APP_ENGINE.with_overrides(**{name: expected})


@pytest.mark.parametrize("name", SPEC_FIELDS)
def test_job_settings_and_cli_set_every_spec_field(name):
    given, expected = SAMPLES[name]
    config, _ = job_cli_args(["--input", "in.jsonl", "--output", "out", *cli_flag(name, given)])
    assert getattr(config.engine, name) == expected
    assert config.engine == JobConfig.from_args({**JOB, name: given}).engine
    # The rest stays the default (device and num_threads: from the actor's resources).
    assert config.engine == BackendSpec(device="cpu", num_threads=1).with_overrides(**{name: expected})


def cli_flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def test_the_job_keeps_what_it_used_to_drop_and_derives_only_what_is_unset():
    config = JobConfig.from_args({**JOB, "kv_cache_gib": 2, "max_model_len": 1024, "enforce_eager": False})
    engine = config.engine
    assert (engine.kv_cache_gib, engine.max_model_len, engine.enforce_eager) == (2, 1024, False)
    config, _ = job_cli_args(["--input", "x", "--output", "o", "--no-enforce-eager"])
    assert config.engine.enforce_eager is False
    gpu = JobConfig.from_args({**JOB, "num_gpus_per_actor": 1, "num_cpus_per_actor": 4})
    assert (gpu.engine.device, gpu.engine.num_threads) == ("cuda", 4)
    assert JobConfig.from_args({**JOB, "num_gpus_per_actor": 1, "device": "cpu"}).engine.device == "cpu"


@pytest.mark.parametrize("build", [ServeConfig.from_args, LLMAppConfig.from_args,
                                   lambda args: JobConfig.from_args({**JOB, **args})])
def test_an_unknown_or_bad_key_is_an_error_naming_it(build):
    with pytest.raises(ValueError, match=r"unknown .*\['max_num_seq'\]"):
        build({"max_num_seq": 4})
    with pytest.raises(ValueError, match=r"unknown .*\['engine'\]"):  # one way in: flat keys
        build({"engine": {"max_num_seqs": 4}})
    for name, bad in [("max_num_seqs", "eight"), ("max_num_seqs", True), ("dtype", "int8"),
                      ("device", "tpu"), ("enforce_eager", "yes"), ("max_model_len", 1.5),
                      ("kv_cache_gib", 0), ("guard", False), ("num_threads", "2")]:
        with pytest.raises(ValueError, match=f"^{name} "):
            build({name: bad})


def test_a_bad_flag_fails_before_anything_starts(capsys):
    for argv in (["--dtype", "int8"], ["--max-num-seqs", "x"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            job_cli_args(["--input", "x", "--output", "o", *argv])
        with pytest.raises(SystemExit):
            serve_cli_args(argv)
    with pytest.raises(ValueError, match="^max_num_seqs"):
        job_cli_args(["--input", "x", "--output", "o", "--max-num-seqs", "0"])


def test_the_shipped_yaml_configs_build_their_configs():
    for path, cls in [("config.yaml", ServeConfig), ("config.gpu.yaml", ServeConfig),
                      ("config.vllm.yaml", LLMAppConfig), ("config.vllm.gpu.yaml", LLMAppConfig)]:
        (application,) = yaml.safe_load((REPO_ROOT / "deployments" / path).read_text())["applications"]
        cls.from_args(application["args"])
    gpu = LLMAppConfig.from_args({"device": "gpu"})  # Serve LLM's spelling of cuda
    assert gpu.engine.device == "cuda"
    with pytest.raises(ValueError, match="^device must be 'cpu' or 'gpu'"):
        LLMAppConfig.from_args({"device": "auto"})
