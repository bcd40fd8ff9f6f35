"""lmms-eval's own Qwen-VL models (``lmms_eval.models.simple.qwen2_5_vl`` and ``qwen3_vl``), its InternVL model
(``lmms_eval.models.chat.internvl_hf``), its transformers LLaVA model for LLaVA-OneVision
(``lmms_eval.models.simple.llava_hf``) and its Gemma 3 model (``lmms_eval.models.simple.gemma3``) for xmas's targets.

Everything that scores is lmms-eval's: the prompt (its system turn, the images before the question), the
batching, greedy generation and the stop strings. Two things the Qwen models import need torchvision, which a
CPU machine often lacks, and would load images otherwise than training did; both are replaced in the
models' modules when this module is imported (by lmms-eval, through :mod:`xmas.evaluation.lmms_eval_plugin`).
InternVL's, LLaVA-OneVision's and Gemma 3's need only the first: they hand the processor lmms-eval's images
themselves.

- ``AutoProcessor``: transformers builds Qwen-VL's video processor with torchvision alone. The processor is
  xmas's (:func:`xmas.models.checkpoints.load_processor`: images only, the PIL image processor training used)
  with the ``min_pixels``/``max_pixels`` lmms-eval is given (xmas gives it the checkpoint's own).
- ``process_vision_info`` of qwen-vl-utils, which imports torchvision at import time: :func:`process_vision_info`
  decodes each image (lmms-eval hands them over as JPEG data URLs) and resizes it as qwen-vl-utils does, to
  transformers' ``smart_resize`` of its bounds (bicubic). Videos are refused.
"""

from __future__ import annotations

import base64
import importlib
import io

from PIL import Image

from xmas.errors import XmasError


class ImageOnlyProcessor:
    """Stands where lmms-eval's model calls ``AutoProcessor.from_pretrained(path, max_pixels=..., min_pixels=...)``."""

    @staticmethod
    def from_pretrained(path, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs):
        """(``kwargs``: what else the models pass, a revision, trust_remote_code: xmas's checkpoints are local.)"""
        from xmas.models.checkpoints import load_processor
        from xmas.models.families import family_of
        from xmas.models.image_tokens import bound_pixels, pixel_bounds

        processor = load_processor(path)
        if pixel_bounds(processor.image_processor, family_of(processor)):  # Gemma 3's takes none: lmms-eval's ignored
            processor.image_processor = bound_pixels(
                processor.image_processor, family_of(processor), min_pixels, max_pixels
            )
        return processor


def opened(image) -> Image.Image:
    """An image item's picture: a PIL image, a data URL, or a file path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str) and image.startswith("data:image"):
        return Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).convert("RGB")
    with Image.open(image.removeprefix("file://")) as picture:
        return picture.convert("RGB")


def resized(item: dict, image_patch_size: int) -> Image.Image:
    """The item's image resized to the multiple of a merged patch within its pixel bounds (qwen-vl-utils' rule)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    picture = opened(item["image"])
    factor = 2 * image_patch_size  # 2x2 patches merge into one token
    bounds = {
        "min_pixels": item.get("min_pixels", 4 * factor**2),
        "max_pixels": item.get("max_pixels", 16384 * factor**2),
    }
    height, width = smart_resize(picture.height, picture.width, factor, **bounds)
    return picture.resize((width, height), Image.Resampling.BICUBIC)


def process_vision_info(
    conversations, return_video_kwargs: bool = False, image_patch_size: int = 14, return_video_metadata: bool = False
):
    """The images of one conversation or a batch of them, in order, as qwen-vl-utils returns them (no videos)."""
    batch = conversations if conversations and isinstance(conversations[0], list) else [conversations]
    images = []
    for messages in batch:
        for message in messages:
            content = message.get("content")
            for item in content if isinstance(content, list) else []:
                if item.get("type") == "video" or "video" in item:
                    raise XmasError("xmas's lmms-eval Qwen models take images only; a task asked for a video")
                if item.get("type") == "image" or "image" in item:
                    images.append(resized(item, image_patch_size))
    found = (images or None, None)
    return (*found, {}) if return_video_kwargs else found


def lmms_eval_model(module_name: str, class_name: str):
    """The lmms-eval model class, its module using the two replacements above."""
    module = importlib.import_module(module_name)
    module.AutoProcessor = ImageOnlyProcessor
    module.process_vision_info = process_vision_info
    return getattr(module, class_name)


Qwen2_5_VL = lmms_eval_model("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL")
Qwen3_VL = lmms_eval_model("lmms_eval.models.simple.qwen3_vl", "Qwen3_VL")
InternVL = lmms_eval_model("lmms_eval.models.chat.internvl_hf", "InternVLHf")
LlavaOneVision = lmms_eval_model("lmms_eval.models.simple.llava_hf", "LlavaHf")
Gemma3 = lmms_eval_model("lmms_eval.models.simple.gemma3", "Gemma3")
