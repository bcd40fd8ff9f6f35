"""The model families xmas supports as proxy and target: the one table that says, per family, what
every stage needs to know about it.

Everything family-specific elsewhere is read from here: which transformers classes load it, where
its vision tower, projector and language model live (freezing, LoRA's layers, the projector's
learning rate), its image token and how an image becomes tokens (:mod:`xmas.models.image_tokens`),
which processor outputs run along the tokens, and lmms-eval's model for it. Adding a family is
one entry here, one stand-in (:mod:`xmas.models.standins`) and the family's tests (docs/development.md).

This module imports neither torch nor transformers, so the workflow can read it while it builds the DAG.
"""

from __future__ import annotations

import dataclasses

from xmas.errors import XmasError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type of the family's checkpoints
    model_class: str  # transformers class of the whole model (image and text to text)
    processor_class: str
    image_processor_class: str  # the PIL backend, so CPU machines and GPU machines preprocess alike
    vision_tower: str  # module path in the model; its parameters stay frozen with freeze_vision_tower
    projector: tuple[str, ...]  # module paths: trained with the projector's learning rate, whole under LoRA
    language_model: str  # module path of the decoder whose layers hold the captured attention and LoRA
    image_token: str  # the token whose positions are the attention block's columns
    layout: str  # how an image becomes tokens: fixed, dynamic or tiles (xmas.models.image_tokens.LAYOUTS)
    lmms_eval_model: str  # lmms-eval's --model for the family ("" where it has none)
    images_per_record: int | None = None  # the most images one record may hold; None: any number
    # Processor outputs with one value per token, cut and padded with input_ids (Qwen's M-RoPE needs them).
    token_inputs: tuple[str, ...] = ()
    # The chat template ends an image's line itself (``<image>\n``): the newline after a record's <image> tag goes.
    image_line: bool = False
    flash_attention: bool = True  # flash-attn 2 can run its attention (not Gemma 3's masks)
    source: str = ""

    def transformers_class(self, attribute: str):
        """One of the family's transformers classes by its field (``model_class``, ``processor_class``, ...)."""
        import transformers

        return getattr(transformers, getattr(self, attribute))


LLAVA = Family(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    image_processor_class="CLIPImageProcessorPil",
    vision_tower="model.vision_tower",
    projector=("model.multi_modal_projector",),
    language_model="model.language_model",
    image_token="<image>",
    layout="fixed",
    lmms_eval_model="llava_hf",
    images_per_record=1,  # LLaVA-1.5 and TinyLLaVA were trained and evaluated with one image per record
    source="LLaVA-1.5 and TinyLLaVA composed in transformers' Llava classes (the paper's models)",
)
QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    image_processor_class="Qwen2VLImageProcessorPil",
    vision_tower="model.visual",
    projector=("model.visual.merger",),  # the patch merger: Qwen's fine-tuning code calls it the mm MLP
    language_model="model.language_model",
    image_token="<|image_pad|>",
    layout="dynamic",
    lmms_eval_model="xmas_qwen2_5_vl",  # lmms-eval's qwen2_5_vl, loading images as training did
    token_inputs=("mm_token_type_ids",),
    source="Qwen2.5-VL: dynamic resolution (2x2 merged 14 px patches), M-RoPE, window attention in the ViT",
)
QWEN3_VL = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessorPil",
    vision_tower="model.visual",
    # DeepStack: mergers of intermediate ViT layers feed the first decoder layers beside the last merger.
    projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
    language_model="model.language_model",
    image_token="<|image_pad|>",
    layout="dynamic",
    lmms_eval_model="xmas_qwen3_vl",  # lmms-eval's qwen3_vl, likewise (xmas.evaluation.lmms_eval_qwen)
    token_inputs=("mm_token_type_ids",),
    source="Qwen3-VL: dynamic resolution (2x2 merged 16 px patches), interleaved M-RoPE, DeepStack",
)
IDEFICS3 = Family(
    name="idefics3",
    model_types=("idefics3",),
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    image_processor_class="Idefics3ImageProcessorPil",
    vision_tower="model.vision_model",
    projector=("model.connector",),
    language_model="model.text_model",
    image_token="<image>",
    layout="tiles",
    lmms_eval_model="",  # lmms-eval 0.7.3 has no model for it: the exact-match suite scores it
    source="SmolVLM-256M/500M/2.2B-Instruct and Idefics3: tiles with row/column markers plus a global image",
)
SMOLVLM = dataclasses.replace(
    IDEFICS3,
    name="smolvlm",
    model_types=("smolvlm",),
    model_class="SmolVLMForConditionalGeneration",
    processor_class="SmolVLMProcessor",
    image_processor_class="SmolVLMImageProcessorPil",
    source="SmolVLM2: Idefics3's layout in transformers' SmolVLM classes",
)

INTERNVL = Family(
    name="internvl",
    model_types=("internvl",),
    model_class="InternVLForConditionalGeneration",
    processor_class="InternVLProcessor",
    image_processor_class="GotOcr2ImageProcessorPil",
    vision_tower="model.vision_tower",
    projector=("model.multi_modal_projector",),
    language_model="model.language_model",
    image_token="<IMG_CONTEXT>",
    layout="crops",
    lmms_eval_model="xmas_internvl",  # lmms-eval's internvl_hf, loading images as training did
    image_line=True,
    source="InternVL3 and InternVL3.5 (-hf): 448 px crops by aspect ratio plus a thumbnail, pixel-shuffled ViT",
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    model_types=("llava_onevision",),
    model_class="LlavaOnevisionForConditionalGeneration",
    processor_class="LlavaOnevisionProcessor",
    image_processor_class="LlavaOnevisionImageProcessorPil",
    vision_tower="model.vision_tower",
    projector=("model.multi_modal_projector",),
    language_model="model.language_model",
    image_token="<image>",
    layout="anyres",
    lmms_eval_model="xmas_llava_onevision",  # lmms-eval's llava_hf, loading images as training did
    image_line=True,
    source="LLaVA-OneVision (-hf): SigLIP tiles of the best anyres grid with a newline per row, Qwen2",
)

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    model_class="Gemma3ForConditionalGeneration",
    processor_class="Gemma3Processor",
    image_processor_class="Gemma3ImageProcessorPil",
    vision_tower="model.vision_tower",
    projector=("model.multi_modal_projector",),
    language_model="model.language_model",
    image_token="<image_soft_token>",  # the template writes <start_of_image>; the processor adds these after it
    layout="framed",
    lmms_eval_model="xmas_gemma3",  # lmms-eval's gemma3, loading images as training did
    token_inputs=("token_type_ids",),  # marks the image tokens, which attend to each other both ways
    flash_attention=False,
    source="Gemma 3 (4B and up): SigLIP at 896 px pooled to 256 tokens, bidirectional image blocks, sliding windows",
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (LLAVA, QWEN2_5_VL, QWEN3_VL, IDEFICS3, SMOLVLM, INTERNVL, LLAVA_ONEVISION, GEMMA3)
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise XmasError(f"no model family {name!r}; xmas supports {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_model_type(model_type: str, where: str = "the model") -> Family:
    """The family of a checkpoint by its config's ``model_type``."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(model_type for family in FAMILIES.values() for model_type in family.model_types))
    raise XmasError(
        f"{where} is a {model_type!r} model; xmas supports the model types {supported} "
        "(the families of xmas.models.families)"
    )


def family_of(obj) -> Family:
    """The family of a model (peft-wrapped or not), a config, or a processor."""
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        return family_of_model_type(model_type, type(obj).__name__)
    for family in FAMILIES.values():  # a processor: by its class (or the class it specialises)
        if any(cls.__name__ == family.processor_class for cls in type(obj).__mro__):
            return family
    raise XmasError(f"{type(obj).__name__} belongs to none of the model families {', '.join(FAMILIES)}")
