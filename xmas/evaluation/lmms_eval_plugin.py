"""The lmms-eval models xmas registers, through lmms-eval's entry-point group ``lmms_eval.models``
(pyproject.toml): lmms-eval finds them by name once xmas is installed beside it. Nothing here is imported
unless lmms-eval asks for it."""

from __future__ import annotations


def manifests():
    """``xmas_qwen2_5_vl``, ``xmas_qwen3_vl``, ``xmas_internvl``, ``xmas_llava_onevision`` and ``xmas_gemma3``:
    lmms-eval's own models for them, with images loaded as training loaded them
    (:mod:`xmas.evaluation.lmms_eval_qwen`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    module = "xmas.evaluation.lmms_eval_qwen"
    return [
        *(
            ModelManifest(model_id=f"xmas_{name}", simple_class_path=f"{module}.{cls}")
            for name, cls in (
                ("qwen2_5_vl", "Qwen2_5_VL"),
                ("qwen3_vl", "Qwen3_VL"),
                ("llava_onevision", "LlavaOneVision"),
                ("gemma3", "Gemma3"),
            )
        ),
        ModelManifest(model_id="xmas_internvl", chat_class_path=f"{module}.InternVL"),  # a chat model in lmms-eval
    ]
