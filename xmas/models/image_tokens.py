"""The tokens one image becomes, per image and from its size alone, for every family's layout.

The chat template writes one placeholder token per image (``<image>``, Qwen's ``<|image_pad|>``); the
processor replaces it by the image's run of tokens. How long that run is, and what is in it, depends
on the family's layout (:data:`xmas.models.families.LAYOUTS`) and, for dynamic resolution and tiles,
on the image's size. :class:`ImageTokens` gives the run for an image of a given size without its
pixels (``prepare`` reads sizes from image headers), with the processor's own arithmetic and its
own replacement text, so the counts are the processor's; the encoder checks every encoded record
against it. The pixel bounds (``min_pixels``/``max_pixels``) are applied here too, per layout.
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


class ImageTokens:
    """Per image size, the run of tokens the family's processor writes in place of its placeholder."""

    def __init__(self, processor):
        self.processor = processor
        self.family: Family = family_of(processor)
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self._runs = functools.lru_cache(maxsize=4096)(self._run_of_key)
        self._fixed: int | None = None

    def key(self, width: int, height: int):
        """What the run depends on: nothing (fixed), the merged patch count (dynamic), the tile grid (tiles)."""
        image_processor = self.processor.image_processor
        if self.family.layout == "fixed":
            return None
        if self.family.layout == "dynamic":
            try:
                patches = image_processor.get_number_of_image_patches(height, width, {})
            except ValueError as error:  # Qwen's smart_resize refuses aspect ratios beyond 200
                raise XmasError(f"image of {width}x{height} pixels: {error}") from None
            return patches // image_processor.merge_size**2
        _, rows, cols = image_processor.get_number_of_image_patches(height, width, {})
        return rows, cols

    def run(self, width: int, height: int) -> Run:
        return self._runs(self.key(width, height))

    def _run_of_key(self, key) -> Run:
        ids = tuple(self.tokenizer(self._replacement(key), add_special_tokens=False)["input_ids"])
        image = [position for position, token in enumerate(ids) if token == self.image_token_id]
        if not image:
            raise XmasError(f"{self.family.name}: the processor's text for an image holds no {self.family.image_token}")
        return Run(ids, image[-1], len(image))

    def _replacement(self, key) -> str:
        """The text the processor puts where the placeholder was (its own replacement code where it has one)."""
        if self.family.layout == "fixed":
            return self.processor.image_token * self._fixed_count()
        if self.family.layout == "dynamic":
            return self.processor.image_token * key
        rows, cols = key
        return self.processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)

    def _fixed_count(self) -> int:
        """Tokens of one image, counted by the processor on a blank image of its input size."""
        if self._fixed is None:
            self._fixed = self._count_on_blank_image()
        return self._fixed

    def _count_on_blank_image(self) -> int:
        side = self.smallest_side()
        batch = self.processor(text=[self.processor.image_token], images=[Image.new("RGB", (side, side))],
                               return_tensors="pt")
        return int((batch["input_ids"] == self.image_token_id).sum())

    def smallest_side(self) -> int:
        """The side of the smallest square image that takes the fewest tokens (a filler's blank image)."""
        image_processor = self.processor.image_processor
        if self.family.layout == "dynamic":
            return image_processor.patch_size * image_processor.merge_size
        if self.family.layout == "tiles":
            return image_processor.max_image_size["longest_edge"]
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        return max((value for value in dict(size).values() if isinstance(value, int)), default=224)

    def fewest(self) -> int:
        """Image tokens of the smallest image the settings allow (a lower bound over every image)."""
        if self.family.layout == "fixed":
            return self.run(1, 1).image_tokens
        if self.family.layout == "dynamic":
            return self.run(self.smallest_side(), self.smallest_side()).image_tokens
        return self.processor.image_seq_len  # the global image alone

    def most(self) -> int:
        """Image tokens of the largest square image the settings allow (an upper bound over square images)."""
        side = largest_side(self.family, self.processor.image_processor)
        return self.run(side, side).image_tokens


def largest_side(family: Family, image_processor) -> int:
    if family.layout == "fixed":
        return 1
    if family.layout == "dynamic":
        return math.isqrt(image_processor.size["longest_edge"])
    return image_processor.size["longest_edge"]


# ---------------------------------------------------------------------------------------- pixel bounds


def bound_pixels(image_processor, family: Family, min_pixels: int | None, max_pixels: int | None):
    """The image processor with the settings' bounds on an image's pixels (None: as it is), per layout:
    dynamic resolution resizes every image to between ``min_pixels`` and ``max_pixels``; tiles resize the
    longest edge to the largest multiple of the tile size whose square is within ``max_pixels``; a fixed
    layout resizes every image to one size and takes no bounds."""
    if min_pixels is None and max_pixels is None:
        return image_processor
    settings = {key: value for key, value in image_processor.to_dict().items() if key != "image_processor_type"}
    if family.layout == "fixed":
        raise XmasError(f"min_pixels/max_pixels: a {family.name} model resizes every image to one size "
                        f"({type(image_processor).__name__}); leave them null")
    if family.layout == "dynamic":
        size = dict(settings["size"])
        size.update({key: value for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels))
                     if value is not None})
        if size["shortest_edge"] > size["longest_edge"]:
            raise XmasError(f"min_pixels {size['shortest_edge']} is above max_pixels {size['longest_edge']}")
        factor = settings["patch_size"] * settings["merge_size"]
        if size["longest_edge"] < factor * factor:
            raise XmasError(f"max_pixels {size['longest_edge']} is below one {factor}x{factor} merged patch "
                            f"({factor * factor} pixels), the least a {family.name} image takes")
    else:
        if min_pixels is not None:
            raise XmasError(f"min_pixels: a {family.name} model resizes every image's longest edge to one length "
                            "(max_pixels sets it); it has no lower bound, leave min_pixels null")
        tile = settings["max_image_size"]["longest_edge"]
        edge = math.isqrt(max_pixels) // tile * tile
        if edge < tile:
            raise XmasError(f"max_pixels {max_pixels} is below one {tile}x{tile} tile ({tile * tile} pixels), "
                            f"the least a {family.name} image takes")
        size = {"longest_edge": edge}
    return type(image_processor)(**{**settings, "size": size})


def pixel_bounds(image_processor, family: Family) -> dict[str, int]:
    """The bounds in effect, as min_pixels/max_pixels (what lmms-eval's Qwen models take as model_args)."""
    if family.layout == "dynamic":
        return {"min_pixels": image_processor.size["shortest_edge"], "max_pixels": image_processor.size["longest_edge"]}
    if family.layout == "tiles":
        return {"max_pixels": image_processor.size["longest_edge"] ** 2}
    return {}
