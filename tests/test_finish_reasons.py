"""How a completion's end goes out over HTTP (deployments/finish_reasons.py): OpenAI's finish
reasons only, a guard stop named in stop_reason, and clients of our apps that still read it."""
from deployments.finish_reasons import HTTP_FINISH, guard_stop_fields, is_guard_stop


def test_a_guard_stop_is_an_openai_stop_with_stop_reason_guard():
    from openai.types import CompletionChoice

    from deployments.app import finish_fields

    assert finish_fields("guard") == {"finish_reason": "stop", "stop_reason": "guard"}
    assert finish_fields("eos") == {"finish_reason": "stop", "stop_reason": None}
    for finish_reason, _ in HTTP_FINISH.values():  # all of them parse in the openai package's types
        CompletionChoice.model_validate({"text": "", "index": 0, "finish_reason": finish_reason})
    assert guard_stop_fields() == ("stop", "guard") and guard_stop_fields(legacy=True) == ("guard", None)


def test_http_clients_of_our_apps_tell_a_guard_stop_in_either_convention():
    assert is_guard_stop({"finish_reason": "stop", "stop_reason": "guard"})
    assert is_guard_stop({"finish_reason": "guard"})  # an app with guard_finish_reason: guard
    assert not is_guard_stop({"finish_reason": "stop", "stop_reason": None})
    assert not is_guard_stop({"finish_reason": "stop", "stop_reason": 151643})  # vLLM: a stop token id
    assert not is_guard_stop({"finish_reason": "length"})
