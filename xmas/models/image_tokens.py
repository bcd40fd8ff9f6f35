"""The tokens one image becomes, per image and from its size alone, for every family's layout.

The chat template writes one placeholder token per image (``<image>``, Qwen's ``<|image_pad|>``); the
processor replaces it by the image's run of tokens. How long that run is, and what is in it, depends
on the family's layout (:data:`LAYOUTS`) and, for dynamic resolution and tiles, on the image's size.
:class:`ImageTokens` gives the run for an image of a given size without its pixels (``prepare`` reads
sizes from image headers), with the processor's own arithmetic and its own replacement text, so the
counts are the processor's; the encoder checks every encoded record against it. Each layout also
says how ``min_pixels``/``max_pixels`` bound its images.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from PIL import Image

from xmas.errors import XmasError
from xmas.models.families import Family, family_of


@dataclasses.dataclass(frozen=True)
class Run:
    """The tokens that replace one image's placeholder token."""

    ids: tuple[int, ...]
    last_image: int  # index in ``ids`` of its last image token
    image_tokens: int  # how many of ``ids`` are image tokens (the attention block's columns)


class Fixed:
    """Every image resized to one size: one count (Llava's CLIP or SigLIP tower)."""

    nested = False  # the processor takes a batch's images as one list (True: a list per sample)

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1):
        return None

    @staticmethod
    def replacement(processor, key) -> str:
        side = Fixed.smallest_side(processor.image_processor)
        batch = processor(text=[processor.image_token], images=[Image.new("RGB", (side, side))], return_tensors="pt")
        count = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
        return processor.image_token * count

    @staticmethod
    def smallest_side(image_processor) -> int:
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        return max((value for value in dict(size).values() if isinstance(value, int)), default=224)

    largest_side = smallest_side

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        raise XmasError(
            f"min_pixels/max_pixels: a {family.name} model resizes every image to one size; leave them null"
        )

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        return {}


class Dynamic:
    """Qwen-VL's dynamic resolution: the image resized to a multiple of a merged patch within min/max pixels,
    one token per merged patch."""

    nested = False

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1) -> int:
        try:
            patches = image_processor.get_number_of_image_patches(height, width, {})
        except ValueError as error:  # Qwen's smart_resize refuses aspect ratios beyond 200
            raise XmasError(f"image of {width}x{height} pixels: {error}") from None
        return patches // image_processor.merge_size**2

    @staticmethod
    def replacement(processor, key: int) -> str:
        return processor.image_token * key

    @staticmethod
    def smallest_side(image_processor) -> int:
        return image_processor.patch_size * image_processor.merge_size

    @staticmethod
    def largest_side(image_processor) -> int:
        return math.isqrt(image_processor.size["longest_edge"])

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        size = dict(settings["size"])
        size.update(
            {
                key: value
                for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels))
                if value is not None
            }
        )
        if size["shortest_edge"] > size["longest_edge"]:
            raise XmasError(f"min_pixels {size['shortest_edge']} is above max_pixels {size['longest_edge']}")
        factor = settings["patch_size"] * settings["merge_size"]
        if size["longest_edge"] < factor * factor:
            raise XmasError(
                f"max_pixels {size['longest_edge']} is below one {factor}x{factor} merged patch "
                f"({factor * factor} pixels), the least a {family.name} image takes"
            )
        return {"size": size}

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        return {"min_pixels": image_processor.size["shortest_edge"], "max_pixels": image_processor.size["longest_edge"]}


class Tiles:
    """Idefics3's and SmolVLM's: the image's longest edge resized to one length, split into tiles of one size
    plus the global image, each a fixed run of image tokens after its marker."""

    nested = True

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1) -> tuple[int, int]:
        _, rows, cols = image_processor.get_number_of_image_patches(height, width, {})
        return rows, cols

    @staticmethod
    def replacement(processor, key: tuple[int, int]) -> str:
        rows, cols = key
        return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)

    @staticmethod
    def smallest_side(image_processor) -> int:
        return image_processor.max_image_size["longest_edge"]  # one tile

    @staticmethod
    def largest_side(image_processor) -> int:
        return image_processor.size["longest_edge"]

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        if min_pixels is not None:
            raise XmasError(
                f"min_pixels: a {family.name} model resizes every image's longest edge to one length "
                "(max_pixels sets it); it has no lower bound, leave min_pixels null"
            )
        tile = settings["max_image_size"]["longest_edge"]
        edge = math.isqrt(max_pixels) // tile * tile
        if edge < tile:
            raise XmasError(
                f"max_pixels {max_pixels} is below one {tile}x{tile} tile ({tile * tile} pixels), "
                f"the least a {family.name} image takes"
            )
        return {"size": {"longest_edge": edge}}

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        return {"max_pixels": image_processor.size["longest_edge"] ** 2}


class Crops:
    """InternVL's: the image cut into square crops of one size, as many as its aspect ratio asks within
    ``min_patches``..``max_patches``, plus a thumbnail of the whole when there are several; each crop a fixed run
    of image tokens, all of them between one ``<img>`` and ``</img>``. Pixel bounds set the crops' count."""

    nested = False

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1) -> int:
        return image_processor.get_number_of_image_patches(height, width, {"crop_to_patches": True})

    @staticmethod
    def replacement(processor, key: int) -> str:
        return processor.replace_image_token({"num_patches": [key]}, 0)

    @staticmethod
    def smallest_side(image_processor) -> int:
        return image_processor.size["height"]  # one crop, no thumbnail

    @staticmethod
    def largest_side(image_processor) -> int:
        return image_processor.size["height"] * math.isqrt(image_processor.max_patches)

    @staticmethod
    def most(processor) -> int:
        """Every crop an image may take and the thumbnail (an image of the best aspect ratio takes them)."""
        crops = processor.image_processor.max_patches
        return (crops + (crops > 1)) * processor.image_seq_length

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        side = settings["size"]["height"]
        crops = {
            key: max(1, math.ceil(value / side**2) if key == "min_patches" else value // side**2)
            for key, value in (("min_patches", min_pixels), ("max_patches", max_pixels))
            if value is not None
        }
        if max_pixels is not None and max_pixels < side * side:
            raise XmasError(
                f"max_pixels {max_pixels} is below one {side}x{side} crop ({side * side} pixels), "
                f"the least a {family.name} image takes"
            )
        merged = {"min_patches": settings["min_patches"], "max_patches": settings["max_patches"], **crops}
        if merged["min_patches"] > merged["max_patches"]:
            raise XmasError(f"min_pixels {min_pixels} asks for more crops than max_pixels {max_pixels} allows")
        return merged

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        """As lmms-eval's InternVL model takes them."""
        return {"min_patches": image_processor.min_patches, "max_patches": image_processor.max_patches}


class Anyres:
    """LLaVA-OneVision's: an image alone in its record is cut into the tiles of its best grid (anyres, at most 9
    tiles' worth) plus the whole image, its features unpadded to the image's aspect ratio with a newline
    feature closing each row (image tokens too); each image of a record of several is padded to a square,
    one tile's features and a newline. The processor takes a record's images together."""

    nested = True

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1):
        return (height, width) if images == 1 else "one of several"

    @staticmethod
    def replacement(processor, key) -> str:
        if key == "one of several":
            count = processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")
        else:
            count = processor._get_num_multimodal_tokens(image_sizes=[key])["num_image_tokens"][0]
        return processor.image_token * count

    @staticmethod
    def smallest_side(image_processor) -> int:
        return image_processor.size["height"]  # one tile

    @staticmethod
    def largest_side(image_processor) -> int:
        return max(side for pinpoint in image_processor.image_grid_pinpoints for side in pinpoint)

    @staticmethod
    def fewest(processor) -> int:
        return processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        raise XmasError(
            f"min_pixels/max_pixels: a {family.name} model lays every image on one of its grids "
            "(image_grid_pinpoints, at most 9 tiles' worth); it takes no pixel bounds, leave them null"
        )

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        return {}


class Framed:
    """Gemma 3's: every image resized to one size, one fixed run of soft tokens between ``<start_of_image>``
    (what the chat template writes) and ``<end_of_image>``, a blank line before and after. The processor writes
    the run into the text before tokenizing, and its newlines join the text's around them into one token: the
    encoder expands these runs in the text (``in_text``), not token by token."""

    nested = True
    in_text = True

    @staticmethod
    def key(image_processor, width: int, height: int, images: int = 1):
        return None

    @staticmethod
    def replacement(processor, key) -> str:
        return processor.full_image_sequence

    @staticmethod
    def smallest_side(image_processor) -> int:
        return image_processor.size["height"]

    largest_side = smallest_side

    @staticmethod
    def bounded(settings: dict, family: Family, min_pixels: int | None, max_pixels: int | None) -> dict:
        raise XmasError(
            f"min_pixels/max_pixels: a {family.name} model resizes every image to one size (pan and scan, which "
            "would crop large ones, is off as in its processor); leave them null"
        )

    @staticmethod
    def bounds(image_processor) -> dict[str, int]:
        return {}


LAYOUTS = {"fixed": Fixed, "dynamic": Dynamic, "tiles": Tiles, "crops": Crops, "anyres": Anyres, "framed": Framed}


class ImageTokens:
    """Per image size, the run of tokens the family's processor writes in place of its placeholder."""

    def __init__(self, processor):
        self.processor = processor
        self.family: Family = family_of(processor)
        self.layout = LAYOUTS[self.family.layout]
        self.tokenizer = processor.tokenizer
        # what the chat template writes for an image, and the token of its columns (Gemma's differ)
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.family.image_token)
        self._runs = functools.lru_cache(maxsize=4096)(self._run_of_key)

    def run(self, width: int, height: int, images: int = 1) -> Run:
        """The run of an image of ``width`` x ``height``, one of ``images`` in its record."""
        return self._runs(self.layout.key(self.processor.image_processor, width, height, images))

    def text(self, width: int, height: int, images: int = 1) -> str:
        """The text the processor writes for such an image in place of its placeholder."""
        return self.layout.replacement(
            self.processor, self.layout.key(self.processor.image_processor, width, height, images)
        )

    def _run_of_key(self, key) -> Run:
        ids = tuple(self.tokenizer(self.layout.replacement(self.processor, key), add_special_tokens=False)["input_ids"])
        image = [position for position, token in enumerate(ids) if token == self.image_token_id]
        if not image:
            raise XmasError(f"{self.family.name}: the processor's text for an image holds no {self.family.image_token}")
        return Run(ids, image[-1], len(image))

    def smallest_side(self) -> int:
        """The side of a small square image the processor takes whole (one merged patch, one tile)."""
        return self.layout.smallest_side(self.processor.image_processor)

    def fewest(self) -> int:
        """Image tokens of the fewest an image can take (a lower bound over every image)."""
        if hasattr(self.layout, "fewest"):
            return self.layout.fewest(self.processor)
        if self.family.layout == "tiles":
            return self.processor.image_seq_len  # the global image alone, where no image is split
        return self.run(self.smallest_side(), self.smallest_side()).image_tokens

    def most(self) -> int:
        """Image tokens of the largest square image the settings allow (the square takes the most), or what the
        layout says is most."""
        if hasattr(self.layout, "most"):
            return self.layout.most(self.processor)
        side = self.layout.largest_side(self.processor.image_processor)
        return self.run(side, side).image_tokens


def bound_pixels(image_processor, family: Family, min_pixels: int | None, max_pixels: int | None):
    """The image processor with the settings' bounds on an image's pixels (None: as it is): dynamic
    resolution resizes every image to between ``min_pixels`` and ``max_pixels``; tiles resize the longest
    edge to the largest multiple of the tile size whose square is within ``max_pixels``; a fixed layout
    resizes every image to one size and takes no bounds."""
    if min_pixels is None and max_pixels is None:
        return image_processor
    settings = {key: value for key, value in image_processor.to_dict().items() if key != "image_processor_type"}
    changed = LAYOUTS[family.layout].bounded(settings, family, min_pixels, max_pixels)
    return type(image_processor)(**{**settings, **changed})


def pixel_bounds(image_processor, family: Family) -> dict[str, int]:
    """The bounds in effect, as min_pixels/max_pixels (what lmms-eval's Qwen models take as model_args)."""
    return LAYOUTS[family.layout].bounds(image_processor)
