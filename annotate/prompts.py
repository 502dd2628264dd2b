"""Request building for the describe stage: image + prompt → OpenAI-style chat messages. Pure functions.

The prompt texts themselves live in ``grain.config`` (``DescribeConfig.prompt`` / ``rewrite_prompt``) so users
override them from YAML; ``prompt_id`` versions whatever text was used, and is stored in every output row.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

from PIL import Image

Messages = list[dict[str, Any]]


def prompt_id(describe_prompt: str, rewrite_prompt: str | None = None) -> str:
    """A short, stable id of the exact prompt texts used (``describe@1a2b3c4d`` or ``describe+rewrite@…``)."""
    text = describe_prompt if rewrite_prompt is None else describe_prompt + "\x00" + rewrite_prompt
    name = "describe" if rewrite_prompt is None else "describe+rewrite"
    return f"{name}@{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def image_data_url(image: bytes, max_side: int) -> str:
    """The image as a ``data:`` URL, downscaled (aspect kept) so its longer side is at most ``max_side``.

    Images already small enough are sent as they are (no re-encoding); larger ones are re-encoded as PNG, so the
    pixels the model sees do not depend on a JPEG encoder's settings.
    """
    with Image.open(io.BytesIO(image)) as img:
        fmt = (img.format or "PNG").upper()
        if max(img.size) > max_side or fmt not in ("JPEG", "PNG", "WEBP"):
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            image, fmt = buf.getvalue(), "PNG"
    mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def describe_messages(image_url: str, prompt: str) -> Messages:
    """One user turn: the image, then the description prompt."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt},
            ],
        }
    ]


def rewrite_messages(image_url: str, caption: str, prompt: str) -> Messages:
    """One user turn: the image, then the rewrite prompt with the original caption filled in."""
    return describe_messages(image_url, prompt.replace("{caption}", caption.strip()))


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:…;base64,`` URL (what engines that take PIL images need)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError(f"not a base64 data URL: {url[:40]!r}")
    return base64.b64decode(payload)
