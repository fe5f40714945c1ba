"""benchmarks.models_table: the guard facts it reads and the ratios it prints."""
from types import SimpleNamespace

from benchmarks import models_table


def test_guard_facts_of_the_shipped_default_guard():
    facts = models_table.guard_facts("default")
    assert facts["model_name"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and facts["hidden_size"] == 896
    assert facts["num_guard_params"] == 896 * 2 + 2 + 896 + 1  # stop head + done head
    assert facts["num_training_samples"] == 934 and facts["num_train_tokens"] == 149_107
    assert facts["syntax_gate_max_lines"] == 2  # chosen on held-out train prompts (docs/stop-policy-choices.md)


def test_render_prints_the_shipped_policy_and_ratios_against_baseline_and_stop_words():
    totals = {"baseline": {"num_tokens": 1000, "pass_at_1": 0.1, "num_early": 0, "num_early_unparseable": 0},
              "stop_words": {"num_tokens": 400, "pass_at_1": 0.3, "num_early": 1, "num_early_unparseable": 0},
              "guard": {"num_tokens": 300, "pass_at_1": 0.31, "num_early": 2, "num_early_unparseable": 1},
              "guard+gate": {"num_tokens": 360, "pass_at_1": 0.32, "num_early": 1, "num_early_unparseable": 0},
              "guard+gate_stubs": {"num_tokens": 320, "pass_at_1": 0.32, "num_early": 1, "num_early_unparseable": 0}}
    row = {"model_name": "m", "hidden_size": 8, "num_guard_params": 27, "num_training_samples": 5,
           "num_train_tokens": 50, "totals": totals, "shipped": "guard"}
    text = models_table.render([row], SimpleNamespace(limit=25, languages=["python"]))
    assert ("| m | Linear(8, 2+1) (27) | 5 (50) | no gate | 1,000 / 400 / 300 | 0.30x | 0.75x | 10.00 / 30.00 / 31.00"
            " | 2 (1) | strict gate: 0.90x, 32.00, 1 (0); gate, stubs pass: 0.80x, 32.00, 1 (0) |") in text
    # a guard shipped with the gate is shown by that policy's numbers
    text = models_table.render([{**row, "shipped": "guard+gate_stubs"}], SimpleNamespace(limit=25, languages=["python"]))
    assert "| gate, stubs pass | 1,000 / 400 / 320 | 0.32x | 0.80x | 10.00 / 30.00 / 32.00 | 1 (0) | no gate: 0.75x" in text
    # with the gate, the row names its bound; without it there is no bound to name
    text = models_table.render([{**row, "shipped": "guard+gate_stubs", "syntax_gate_max_lines": 2}],
                               SimpleNamespace(limit=25, languages=["python"]))
    assert "| gate, stubs pass, 2-line bound | 1,000 / 400 / 320 |" in text
    text = models_table.render([{**row, "syntax_gate_max_lines": 2}], SimpleNamespace(limit=25, languages=["python"]))
    assert "| no gate | 1,000 / 400 / 300 |" in text
