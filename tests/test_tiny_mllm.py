"""The tiny local Qwen2-VL (tests/support/tiny_mllm.py) and the vLLM server wrapper (tests/support/vllm_server.py).

The model folder is built from nothing in a temporary folder; it must load offline in transformers (this
venv) and in vLLM (the separate vLLM venv, started through VLLMServer) and give the same greedy text in
both. The vLLM test is never skipped: without the vLLM venv it fails and says how to create it.
"""

from __future__ import annotations

import base64
import io
import json
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support.tiny_mllm import SPECIAL_TOKENS, build_tiny_qwen2vl
from support.vllm_server import VLLMServer, VLLMServerError

SERVED_NAME = "tiny-qwen2vl"


def noise_image(seed: int, width: int = 96, height: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def gradient(width: int, height: int, blue: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, blue)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# Image/prompt pairs compared between the two stacks: square 96x96 (9 vision tokens), and sizes that the
# image processor must resize (not multiples of 28, other aspect ratios, above max_pixels).
CASES = [
    (noise_image(0), "Describe the image."),
    (gradient(200, 120, 60), "What colour is the cat?"),
    (noise_image(5, 33, 77), "Region 3: list the parts of the red car."),
]


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def model_dir(tiny_mllm_dir) -> Path:
    return tiny_mllm_dir  # the session's model (conftest), also served by the session's vLLM server


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    return processor, model


def hf_generate(hf, img: Image.Image, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy transformers generation for one PIL image + prompt; only the new tokens, decoded."""
    processor, model = hf
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_build_is_complete_and_deterministic(model_dir, tmp_path):
    names = {p.name for p in model_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
    assert expected <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in model_dir.iterdir())

    again = load_file(build_tiny_qwen2vl(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_qwen2vl(tmp_path / "other", seed=1) / "model.safetensors")
    ref = load_file(model_dir / "model.safetensors")
    assert again.keys() == ref.keys() == other.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    assert all(t.dtype == torch.float32 for t in ref.values())
    matrices = [k for k, t in ref.items() if t.ndim >= 2]  # norms (ones) and biases (zeros) do not depend on the seed
    assert "lm_head.weight" in matrices and all(not torch.equal(other[k], ref[k]) for k in matrices)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_config_sizes_and_token_ids_agree(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    text_sizes = [text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")]
    assert text_sizes == [64, 2, 2, 1]
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]
    vision_sizes = [vision[k] for k in ("depth", "embed_dim", "hidden_size", "num_heads", "mlp_ratio")]
    assert vision_sizes == [2, 32, 64, 2, 2]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == eos == config["eos_token_id"] == text["eos_token_id"]
    assert tok.pad_token_id == pad == config["pad_token_id"] == gen["pad_token_id"]
    assert gen["eos_token_id"] == [eos, pad] and gen["do_sample"] is False and gen["max_new_tokens"] > 0
    assert tok_cfg["eos_token"] == "<|im_end|>"
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert text["vocab_size"] == len(tok)


def test_tokenizer_round_trips_and_has_special_tokens(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert 2000 <= len(tok) <= 5000
    samples = [
        "A photo of a red cat with 4 legs.",
        "Region 12: the blue car's wheel (left), 37% visible!",
        "naïve ✓ 猫\n\t",
    ]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("A photo of a red cat", add_special_tokens=False)) == 6  # trained words are single tokens
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
        assert tok.decode(ids, skip_special_tokens=True) == ""
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens) | set(tok.get_added_vocab())


def test_chat_template_handles_openai_messages(hf):
    processor, _ = hf
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_transformers_greedy_generation(hf):
    processor, _ = hf
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": noise_image(0)}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]  # 96x96 -> 84x84 -> 36 patches -> 9 tokens
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 9

    first = hf_generate(hf, noise_image(0), "Describe the image.")
    assert first and first == hf_generate(hf, noise_image(0), "Describe the image.")
    assert first.isascii() and first.isprintable()
    # The image reaches the language model: another image changes the text.
    assert hf_generate(hf, noise_image(1), "Describe the image.") != first


def test_server_reports_missing_python(tmp_path):
    server = VLLMServer(tmp_path, python=tmp_path / "nope" / "python")
    with pytest.raises(FileNotFoundError, match="setup_vllm.sh"):
        server.start()


def test_server_failure_quotes_log_and_leaves_no_process(tmp_path):
    """A 'server' that never answers: start() times out, quotes the log, and kills its whole group."""
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\necho fake vllm starting\nsleep 300 &\necho child $!\nsleep 300\n")
    fake.chmod(0o755)
    server = VLLMServer(tmp_path, python=fake, work_dir=tmp_path / "work", startup_timeout=2)
    with pytest.raises(VLLMServerError, match="did not become ready") as err:
        server.start()
    assert "fake vllm starting" in str(err.value)
    log = (tmp_path / "work" / "vllm_server.log").read_text()
    child = int(log.split("child ")[1].split()[0])
    assert not server.is_running()
    assert not _alive(child)

    dying = tmp_path / "dying_python"
    dying.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    dying.chmod(0o755)
    with pytest.raises(VLLMServerError, match="exited with code 3") as err:
        VLLMServer(tmp_path, python=dying, startup_timeout=30).start()
    assert "boom" in str(err.value)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process; orphaned zombies may never be reaped in a container."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_vllm_server_matches_transformers(vllm_server, hf):
    server = vllm_server
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert [m["id"] for m in server.get_json("/v1/models")["data"]] == [SERVED_NAME]

    for img, prompt in CASES:
        expected = hf_generate(hf, img, prompt)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(img)}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        t0 = time.monotonic()
        reply = server.chat_completions(
            {"model": SERVED_NAME, "messages": messages, "temperature": 0, "max_tokens": 32}
        )
        elapsed = time.monotonic() - t0
        got = reply["choices"][0]["message"]["content"]
        assert got == expected, f"vLLM and transformers differ for {img.size} {prompt!r}"
        assert reply["model"] == SERVED_NAME
        assert elapsed < 30

    # stopping (and that no process survives) is checked by the session fixture's teardown in conftest
