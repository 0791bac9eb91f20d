"""The model loader's parts that need neither a checkpoint nor torch: renaming weights between the two layouts.

Loading (and refusing) checkpoints is tested in tests/integration/test_models.py; even its errors for a path
that is not a checkpoint go through the loader's torch import first.
"""

from __future__ import annotations

from asr_server.models import loading


def test_key_renaming_round_trips() -> None:
    cases = {
        "model.audio_tower.conv2d1.weight": "thinker.audio_tower.conv2d1.weight",
        "model.multi_modal_projector.linear_1.bias": "thinker.audio_tower.proj1.bias",
        "model.multi_modal_projector.linear_2.weight": "thinker.audio_tower.proj2.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight": "thinker.model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight": "thinker.lm_head.weight",
    }
    for hf_key, original_key in cases.items():
        assert loading.hf_to_original_key(hf_key, "asr") == original_key
        assert loading.original_to_hf_key(original_key, "asr") == hf_key
    assert loading.original_to_hf_key("thinker.lm_head.weight", "aligner") == "score.weight"
    assert loading.hf_to_original_key("score.weight", "aligner") == "thinker.lm_head.weight"

