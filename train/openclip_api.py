"""open_clip's model interface over a trained grain model, so open_clip-based tools can score it as they are.

Tools such as CLIP_benchmark, or open_clip's own zero-shot code, take a model object with ``encode_image``,
``encode_text``, ``forward`` and ``logit_scale``, plus an image transform and a tokenizer. :func:`load_model` returns
a :class:`GrainCLIP` that has all of these, so nobody needs to write a wrapper::

    import grain
    from torchvision.datasets import ImageFolder

    model = grain.load_model("runs/x/model")                 # a folder written by grain.train.model.save_model
    data = ImageFolder(root, transform=model.preprocess, loader=model.loader)
    # clip_benchmark.metrics.zeroshot_classification.evaluate(model, loader, model.tokenizer, ...)

Everything delegates to :class:`grain.train.model.GrainModel` and to grain's own image and text preparation, so a
score from such a tool is the score ``grain evaluate`` gives (tests/test_openclip_api.py checks this with
CLIP_benchmark's zero-shot classification).

The image side (``preprocess``) matches ``grain.train.data.load_image`` exactly when it gets the image as
``PIL.Image.open`` returned it. torchvision's default ImageFolder loader converts every image with
``convert("RGB")`` before the transform sees it, which keeps EXIF orientation (``preprocess`` applies it) but drops
transparency (grain composites on white), clips 16-bit greys and ignores CMYK ICC profiles. For images like that,
pass ``loader=model.loader`` (grain's decoder) to get grain's exact pixels; for RGB/grey JPEGs and PNGs either
loader gives the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from grain.data.files import decode_rgb, orient, to_rgb
from grain.train.data import image_tensor
from grain.train.model import GrainModel, text_tokenizer
from grain.train.model import load_model as load_grain_model

__all__ = ["GrainCLIP", "GrainPreprocess", "load_model", "open_image"]

class GrainPreprocess:
    """The image transform of a grain model: PIL image → ``[3,S,S]`` float32 tensor.

    Applies the rule of :func:`grain.data.files.decode_rgb` to an already opened image (EXIF orientation when the
    tag says the image is rotated or mirrored, then :func:`grain.data.files.to_rgb`), then
    :func:`grain.train.data.image_tensor` (squash resize to ``S×S``, bicubic, the model's mean/std). So
    ``preprocess(Image.open(path))`` equals ``load_image(path's bytes, S)``, the tensor grain trains and evaluates
    on. A plain class (not a closure) so DataLoader worker processes can pickle it.
    """

    def __init__(self, image_size: int, norm: tuple | None = None) -> None:
        self.image_size = int(image_size)
        self.norm = norm  # the model's image_norm (mean, std); None = ImageNet's

    def __call__(self, img: Image.Image) -> Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"preprocess takes a PIL.Image.Image, got {type(img).__name__}")
        # decode_rgb's orientation rule. Image files opened by torchvision are not transposed (and its
        # convert("RGB") keeps the EXIF block), so this is where the rule must run.
        img = orient(img)
        return torch.from_numpy(image_tensor(to_rgb(img), self.image_size, self.norm))

    def __repr__(self) -> str:
        return f"GrainPreprocess(image_size={self.image_size})"


def open_image(path: str | Path) -> Image.Image:
    """An image file decoded exactly as grain decodes image bytes (:func:`grain.data.files.decode_rgb`): RGB, EXIF
    orientation applied, alpha composited on white.

    Meant as torchvision's ``ImageFolder(..., loader=open_image)``: its default loader's ``convert("RGB")`` loses
    transparency and 16-bit range before any transform can see them. Raises ValueError naming the file when it does
    not decode.
    """
    path = Path(path)
    return decode_rgb(path.read_bytes(), where=str(path))


class GrainCLIP(nn.Module):
    """A :class:`GrainModel` with open_clip's ``CLIP`` interface (``output_dict=False``).

    Attributes:
        grain: the underlying :class:`GrainModel` (its parameters are this module's parameters).
        mode: the model's training mode (``grain``, ``no_rd``, ``no_box``, ``clip``, ``clip_desc``).
        preprocess: :class:`GrainPreprocess` for the model's image size.
        tokenizer: open_clip's ``SimpleTokenizer`` with the model's context length (what grain's
            ``grain.evaluate.zeroshot.TextEncoder`` uses): ``str | list[str]`` → ``LongTensor [N, context_length]``.
        loader: :func:`open_image`, for torchvision datasets that take a ``loader``.
        image_size, context_length, embed_dim: from the model's architecture.

    grain's embeddings are always L2-normalised, so ``normalize=False`` (open_clip's default) returns unit vectors
    too; ``normalize=True`` normalises again, which changes nothing beyond rounding.
    """

    def __init__(self, model: GrainModel) -> None:
        super().__init__()
        self.grain = model
        self.mode: str = model.mode
        self.image_size: int = model.image_size
        self.context_length: int = model.context_length
        self.embed_dim: int = int(model.arch["embed_dim"])
        self.preprocess = GrainPreprocess(model.image_size, model.image_norm)
        self.tokenizer = text_tokenizer(model.context_length)  # what grain's own evaluation uses (TextEncoder)
        self.loader = open_image

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log temperature (open_clip's ``logit_scale``; ``logit_scale.exp()`` multiplies cosines)."""
        return self.grain.logit_scale

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """images ``[B,3,S,S]`` (from :attr:`preprocess`) → the global image embedding ``[B,D]``.

        The image query's output in decoder modes, the CLS embedding in ``clip`` / ``clip_desc`` mode: the vector
        ``grain evaluate`` scores classes with.
        """
        out = self.grain.encode_image(images)["image_embed"]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """tokens ``[N,T]`` (from :attr:`tokenizer`) → text embeddings ``[N,D]``."""
        out = self.grain.encode_text(text)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_regions(self, images: Tensor) -> dict[str, Tensor]:
        """images ``[B,3,S,S]`` → ``{"region_embed": [B,Q,D], "boxes": [B,Q,4], "image_embed": [B,D]}``.

        ``boxes`` are (cx, cy, w, h) in [0, 1] of the squashed model frame, which are also the original image's
        normalised coordinates. Only models with region queries have them: a ValueError names the mode otherwise.
        """
        if not self.grain.uses_decoder:
            raise ValueError(f"encode_regions needs a model with region queries (a decoder mode such as 'grain'); "
                             f"this model was trained in mode {self.mode!r}, which has only the global embedding")
        out = self.grain.encode_image(images)
        return {"region_embed": out["region_embed"], "boxes": out["boxes"], "image_embed": out["image_embed"]}

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(image_features, text_features, logit_scale.exp())`` as open_clip's CLIP returns with
        ``output_dict=False``; features are normalised, and ``None`` where the input was ``None``."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, image_size={self.image_size}, context_length={self.context_length}, embed_dim={self.embed_dim}"


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GrainCLIP:
    """A model folder written by :func:`grain.train.model.save_model` as an open_clip-style model, in eval mode.

    Loading is :func:`grain.train.model.load_model`'s (same checks and errors); the result adds open_clip's
    interface, ``preprocess`` and ``tokenizer`` (see :class:`GrainCLIP`).
    """
    return GrainCLIP(load_grain_model(path, device=device)).eval()
