"""The cost model (grain.costs): FlopCounterMode counts of the real models, the analytic VLM formula against
FlopCounterMode on tiny random models of the same classes, the GPU-hour arithmetic, the stored paper-size counts,
measured images/s from stage summaries, and the "Cost at scale" section of the main job's report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from grain import costs

# ------------------------------------------------------------------------------------------------ train step


def test_import_does_not_load_torch_transformers_or_prefect():
    code = ("import sys, grain.costs; bad = [m for m in ('torch', 'transformers', 'open_clip', 'prefect') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("arch", ["grain-tiny", "grain-tiny-paper"])
@pytest.mark.parametrize("mode", ["grain", "clip", "clip_desc"])
def test_meta_count_equals_a_real_cpu_training_step(arch, mode):
    """The meta-device count (model forward + backward, no loss) agrees with a real step — forward_backward with
    GrainCriterion on real tensors — to within the loss's own few matmuls."""
    meta = costs.count_train_step_flops(arch, mode, batch=4, descriptions_per_image=3, device="meta")
    real = costs.count_train_step_flops(arch, mode, batch=4, descriptions_per_image=3, device="cpu")
    assert meta["device"] == "meta" and meta["fallback"] is None and real["device"] == "cpu"
    assert meta["flops_per_step"] > 0
    assert real["flops_per_step"] == pytest.approx(meta["flops_per_step"], rel=0.01)
    assert real["flops_per_step"] >= meta["flops_per_step"]  # the loss only adds
    assert meta["params"] == real["params"]


def test_step_flops_scale_linearly_with_batch():
    small = costs.count_train_step_flops("grain-tiny", "grain", batch=2, device="cpu")
    large = costs.count_train_step_flops("grain-tiny", "grain", batch=8, device="cpu")
    assert large["flops_per_step"] == pytest.approx(4 * small["flops_per_step"], rel=0.02)
    meta2 = costs.count_train_step_flops("grain-tiny", "grain", batch=2)
    meta8 = costs.count_train_step_flops("grain-tiny", "grain", batch=8)
    # linear up to the few per-step terms that do not depend on the batch (the decoder's query positions)
    assert meta8["flops_per_step"] == pytest.approx(4 * meta2["flops_per_step"], rel=0.01)
    assert meta8["flops_per_step"] < 4 * meta2["flops_per_step"]


def test_descriptions_and_decoder_cost_flops():
    per_image = {mode: costs.count_train_step_flops("grain-tiny", mode, batch=4)["flops_per_image"]
                 for mode in ("grain", "clip_desc", "clip")}
    assert per_image["grain"] > per_image["clip_desc"] > per_image["clip"]
    fewer = costs.count_train_step_flops("grain-tiny", "grain", batch=4, descriptions_per_image=2)["flops_per_image"]
    shorter = costs.count_train_step_flops("grain-tiny", "grain", batch=4, text_tokens=16)["flops_per_image"]
    assert per_image["clip"] < fewer < per_image["grain"] and shorter < per_image["grain"]
    # clip mode reads no descriptions whatever it is asked
    assert costs.count_train_step_flops("grain-tiny", "clip", batch=4, descriptions_per_image=9)["flops_per_image"] == per_image["clip"]


def test_meta_failure_falls_back_to_a_real_step_at_batch_one(monkeypatch):
    def broken(*_a, **_k):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(costs, "_count_meta", broken)
    out = costs.count_train_step_flops("grain-tiny", "grain", batch=16)
    assert out["device"] == "cpu" and out["batch"] == 1 and "no meta kernel" in out["fallback"]
    assert out["flops_per_image"] > 0


def test_stored_paper_counts_match_the_code_and_open_clip():
    """PAPER_FLOPS (what reports print) is what the code counts now; the CLIP step agrees with open_clip's
    published ViT-B-16 forward FLOPs × 3 (model_profile.csv, counted with the same FlopCounterMode convention)."""
    counts = {
        "train_grain": costs.count_train_step_flops(mode="grain")["flops_per_image"],
        "train_clip": costs.count_train_step_flops(mode="clip")["flops_per_image"],
        "train_grain_text32": costs.count_train_step_flops(mode="grain", text_tokens=32)["flops_per_image"],
        "train_clip_text32": costs.count_train_step_flops(mode="clip", text_tokens=32)["flops_per_image"],
        "ground_owlv2": costs.count_owlv2_flops()["flops_per_image"],
    }
    for key, value in counts.items():
        assert costs.PAPER_FLOPS[key] == pytest.approx(value, rel=1e-9), f"update grain.costs.PAPER_FLOPS[{key!r}] = {value}"
    assert counts["train_clip"] == pytest.approx(3 * costs.OPEN_CLIP_VIT_B16["forward_gflops"] * 1e9, rel=0.01)


def test_owlv2_config_is_b16_at_960():
    cfg = costs.owlv2_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (960, 16, 768, 12)
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings) == (512, 12, 16)


def test_owlv2_meta_count_equals_a_real_forward_on_a_small_config():
    from transformers import Owlv2Config

    small = Owlv2Config(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 128, "patch_size": 16},
                        projection_dim=32)
    meta = costs.count_owlv2_flops(queries=3, config=small)
    real = costs.count_owlv2_flops(queries=3, config=small, device="cpu")
    assert meta["patches"] == 64 and meta["flops_per_image"] > 0
    assert real["flops_per_image"] == pytest.approx(meta["flops_per_image"], rel=1e-6)
    more = costs.count_owlv2_flops(queries=6, config=small)
    assert more["text_tower"] == pytest.approx(2 * meta["text_tower"], rel=1e-9)
    assert more["vision_tower"] == meta["vision_tower"]


# ------------------------------------------------------------------------------------------------ the VLM formula


def _counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        out = fn()
    return out, counter.get_total_flops()


def test_vlm_formula_matches_flop_counter_on_tiny_qwen2_models():
    """A tiny Qwen2 decoder (the LLM of Qwen2-VL: GQA, SwiGLU, biases on q/k/v) and a tiny Qwen2-VL vision tower,
    random init: prefill, each decode step and the vision encoder, counted by FlopCounterMode, equal the analytic
    counts built from the same config numbers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    llm_cfg = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 160, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1000}
    vis_cfg = {"depth": 2, "embed_dim": 48, "num_heads": 4, "mlp_ratio": 4, "patch_size": 14, "temporal_patch_size": 2,
               "spatial_merge_size": 2, "in_channels": 3, "hidden_size": 64}
    cfg = {"name": "tiny", "llm": llm_cfg, "vision": vis_cfg}
    llm = Qwen2ForCausalLM(Qwen2Config(**llm_cfg)).eval()
    vision = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**vis_cfg)).eval()

    grid_h, grid_w = 8, 6  # an image of 8 x 6 patches -> 12 LLM tokens after the 2 x 2 merge
    image_tokens, prompt_tokens, output_tokens = grid_h * grid_w // 4, 9, 5
    _, vision_flops = _counted(lambda: vision(torch.randn(grid_h * grid_w, 3 * 2 * 14 * 14),
                                              grid_thw=torch.tensor([[1, grid_h, grid_w]])))
    context = image_tokens + prompt_tokens
    ids = torch.randint(0, 1000, (1, context))
    out, prefill_flops = _counted(lambda: llm(input_ids=ids, use_cache=True, logits_to_keep=1))
    assert prefill_flops == pytest.approx(costs.llm_forward_flops(llm_cfg, context, 0, 1), rel=0.01)
    decode_flops, cache = 0, out.cache
    for i in range(output_tokens - 1):
        step, flops = _counted(lambda: llm(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True))
        assert flops == pytest.approx(costs.llm_forward_flops(llm_cfg, 1, context + i, 1), rel=0.01)
        decode_flops += flops
        cache = step.cache

    analytic = costs.vlm_flops_per_image(cfg, image_tokens, prompt_tokens, output_tokens)
    assert analytic["vision"] == pytest.approx(vision_flops, rel=0.01)
    assert analytic["prefill"] == pytest.approx(prefill_flops, rel=0.01)
    assert analytic["decode"] == pytest.approx(decode_flops, rel=0.01)
    assert analytic["total"] == pytest.approx(vision_flops + prefill_flops + decode_flops, rel=0.01)


def test_qwen2_vl_7b_config_gives_a_7b_model():
    llm = costs.QWEN2_VL_7B["llm"]
    h, layers = llm["hidden_size"], llm["num_hidden_layers"]
    per_token = costs.llm_forward_flops(llm, 1, 0, 0) / 2  # matmul parameters touched per token (attention ≈ 0)
    embeddings = 2 * h * llm["vocab_size"]  # input table + LM head
    assert 7.4e9 < per_token + embeddings < 7.8e9  # Qwen2-7B: 7.6B parameters
    assert per_token == pytest.approx(layers * (2 * h * h + 2 * h * 512 + 3 * h * 18944), rel=1e-3)
    v = costs.QWEN2_VL_7B["vision"]
    assert costs.image_tokens_for(448, 448) == 256
    assert costs.vision_encoder_flops(v, 1024) > 2 * 1024 * 32 * 12 * 1280**2  # the blocks' matmuls at least


def test_describe_flops_per_image_adds_its_requests():
    reqs = [{"request": "a", "prompt_tokens": 50, "output_tokens": 10},
            {"request": "b", "prompt_tokens": 30, "output_tokens": 3}]
    out = costs.describe_flops_per_image(requests=reqs)
    one = [costs.vlm_flops_per_image(costs.QWEN2_VL_7B, 256, r["prompt_tokens"], r["output_tokens"]) for r in reqs]
    for key in ("vision", "prefill", "decode", "total"):
        assert out[key] == pytest.approx(one[0][key] + one[1][key], rel=1e-12)
    assert out["vision"] == pytest.approx(2 * costs.vision_encoder_flops(costs.QWEN2_VL_7B["vision"], 1024))
    assert costs.describe_flops_per_image(requests=reqs[:1])["total"] < out["total"]


# ------------------------------------------------------------------------------------------------ GPU-hours


def test_estimate_arithmetic_by_hand():
    flops = {"describe_prefill": 7e12, "describe_decode": 1e12, "ground": 2e12, "train": 3e11, "train_clip": 1e11}
    a = costs.Assumptions(peak_flops=1e15, mfu_train=0.5, mfu_ground=0.25, mfu_prefill=0.4, mfu_decode=0.1,
                          epochs=10, gpus=8)
    n = 1_000_000
    e = costs.estimate(n, flops=flops, assumptions=a)
    describe = n * (7e12 / (1e15 * 0.4) + 1e12 / (1e15 * 0.1)) / 3600
    ground = n * 2e12 / (1e15 * 0.25) / 3600
    train = n * 10 * 3e11 / (1e15 * 0.5) / 3600
    assert e["gpu_hours"]["describe"] == pytest.approx(describe, rel=1e-12)
    assert e["gpu_hours"]["ground"] == pytest.approx(ground, rel=1e-12)
    assert e["gpu_hours"]["train"] == pytest.approx(train, rel=1e-12)
    assert e["total_gpu_hours"] == pytest.approx(describe + ground + train, rel=1e-12)
    assert e["days_on_gpus"] == pytest.approx((describe + ground + train) / 8 / 24, rel=1e-12)
    assert e["train_clip_gpu_hours"] == pytest.approx(n * 10 * 1e11 / (1e15 * 0.5) / 3600, rel=1e-12)
    # epochs scale only training; images scale everything
    e35 = costs.estimate(n, epochs=35, flops=flops, assumptions=a)
    assert e35["gpu_hours"]["train"] == pytest.approx(3.5 * train) and e35["gpu_hours"]["ground"] == pytest.approx(ground)
    assert costs.estimate(2 * n, flops=flops, assumptions=a)["total_gpu_hours"] == pytest.approx(2 * e["total_gpu_hours"])


def test_cost_model_uses_the_stored_counts_and_the_paper_hardware():
    result = costs.cost_model()
    f = result["flops_per_image"]
    assert f["train"] == costs.PAPER_FLOPS["train_grain"] and f["ground"] == costs.PAPER_FLOPS["ground_owlv2"]
    assert f["train"] > f["train_clip"]
    vlm = costs.describe_flops_per_image()
    assert f["describe_prefill"] == vlm["vision"] + vlm["prefill"] and f["describe_decode"] == vlm["decode"]
    a = result["assumptions"]
    assert a["peak_flops"] == 989e12 and a["gpus"] == 16 and a["epochs"] == 35
    cc3m, cc12m = result["estimates"]["CC3M"], result["estimates"]["CC12M"]
    assert cc3m["images"] == costs.DATASETS["CC3M"]["images"] < costs.DATASETS["CC3M"]["listed"]
    assert cc12m["total_gpu_hours"] == pytest.approx(cc3m["total_gpu_hours"] * cc12m["images"] / cc3m["images"])
    json.dumps(result)  # JSON-able, for bench/cost_model.py


def test_open_clip_reference_is_its_published_run():
    ref = costs.open_clip_reference({"X": 1_000_000}, epochs=2)
    rate = 32 * 400e6 / (10700 * 3600)
    assert ref["samples_per_s_per_gpu"] == pytest.approx(rate)
    assert ref["samples_per_s_per_gpu"] == pytest.approx(340, rel=0.05)  # the "≈ 340 samples/s per A100" of the peers
    assert ref["implied_mfu"] == pytest.approx(rate * 3 * 41.09e9 / 312e12)
    assert ref["a100_hours"]["X"] == pytest.approx(2e6 / rate / 3600)


# ------------------------------------------------------------------------------------------------ measured, Markdown

SUMMARIES = {
    "ingest": {"out": "/w/samples/a", "totals": {"rows_in": 600, "rows_out": 598}, "wall_seconds": 3.0},
    "describe": {"out": "/w/descriptions/b", "totals": {"rows_in": 598, "rows_out": 598}, "wall_seconds": 0.5, "reused": True},
    "ground": {"out": "/w/regions/c", "totals": {"rows_in": 598, "rows_out": 598}, "wall_seconds": 0.0},
    "train": {"out": "/w/train/d", "steps": 10, "seconds": 4.0, "wall_seconds": 6.0},
    "evaluate": {"out": "/w/eval/e", "wall_seconds": 2.0, "encoded": 3},
    "train (clip_desc)": {"out": "/w/train/f", "steps": 10, "wall_seconds": 2.0, "batch_size": 16},
}


def test_measured_throughput_from_stage_summaries():
    m = costs.measured_throughput(SUMMARIES, batch_size=32)
    assert set(m) == {"ingest", "describe", "train", "train (clip_desc)"}  # no images in evaluate, no time in ground
    assert m["ingest"]["images_per_s"] == pytest.approx(600 / 3.0)
    assert m["describe"]["reused"] and not m["ingest"]["reused"]
    assert m["train"]["images"] == 320 and m["train"]["images_per_s"] == pytest.approx(320 / 4.0)  # the loop's seconds
    assert m["train (clip_desc)"]["stage"] == "train" and m["train (clip_desc)"]["images_per_s"] == pytest.approx(160 / 2.0)
    days = costs.at_scale_days(m, 1_000_000, 35)
    assert days["train"] == pytest.approx(35e6 / 80 / 86400) and days["ingest"] == pytest.approx(1e6 / 200 / 86400)
    assert "train" not in costs.measured_throughput(SUMMARIES)  # no batch size: no train images


def test_markdown_has_both_datasets_the_assumptions_and_the_measured_stages():
    result = costs.cost_model()
    measured = costs.measured_throughput(SUMMARIES, batch_size=32)
    text = "\n".join(costs.markdown_lines(result, measured, machine="test box"))
    assert text.startswith("## Cost at scale")
    for name in ("CC3M", "CC12M"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {result['estimates'][name]['days_on_gpus']:.2f} |" in row
    for needle in ("MFU train 0.40", "VLM decode 0.05", "989 TFLOP/s", "Qwen2-VL-7B-Instruct", "OWLv2 B/16",
                   "grain-vit-b16", "docs/model_profile.csv", "docs/PRETRAINED.md", "test box", "| train (clip_desc) |",
                   "(cached: timing of the run that made it)"):
        assert needle in text, needle
    assert "Measured on this machine" not in "\n".join(costs.markdown_lines(result))


def test_main_job_report_carries_the_cost_section(tmp_path, monkeypatch):
    from grain.flows import pipeline
    from grain.config import load_config

    monkeypatch.setattr(pipeline, "create_markdown_artifact", lambda **_k: None)
    cfg = load_config(None, [f"workdir={tmp_path}"])
    eval_dir = tmp_path / "eval" / "x"
    eval_dir.mkdir(parents=True)
    summaries = {k: dict(v) for k, v in SUMMARIES.items() if "(" not in k}
    summaries["evaluate"]["out"] = str(eval_dir)
    text = pipeline.write_report(cfg, summaries, 12.0).read_text()
    assert "## Cost at scale" in text and "| CC12M |" in text
    assert f"| train | {cfg.train.arch} grain, batch {cfg.train.batch_size} | 320 |" in text

    def broken(*_a, **_k):
        raise RuntimeError("no table")

    monkeypatch.setattr(costs, "cost_model", broken)
    text = pipeline.write_report(cfg, summaries, 12.0).read_text()
    assert "## Cost at scale" in text and "Not available: RuntimeError: no table" in text


def test_the_prefix_cache_reuses_whole_blocks_of_the_shared_prefix_as_measured():
    """The cost model's reading of bench/annotation_reuse.py: a caption rewrite reuses the whole KV blocks of the
    prefix it shares with its image's description — the stored measurement (37 shared tokens: 32 hit at 32-token
    blocks, 0 at 128) is what the rule gives, and the rule lowers only the later requests' prefill."""
    m = costs.MEASURED_PREFIX_REUSE
    shared = m["shared_prefix_tokens"]
    for block, got in m["by_block_size"].items():
        assert (shared // int(block)) * int(block) == got["prefix_hit_tokens_per_image"]
    plain = costs.describe_flops_per_image()
    reused = costs.describe_flops_per_image(prefix_block=16)
    tokens = costs.shared_prefix_tokens(plain["image_tokens"])
    assert reused["prefix_cached_tokens"] == tokens // 16 * 16 and plain["prefix_cached_tokens"] == 0
    assert reused["vision"] == plain["vision"] and reused["decode"] == plain["decode"]
    assert 0 < reused["prefill"] < plain["prefill"]
    first = costs.vlm_flops_per_image(costs.QWEN2_VL_7B, plain["image_tokens"], plain["requests"][0]["prompt_tokens"],
                                      plain["requests"][0]["output_tokens"])
    assert reused["prefill"] > first["prefill"]  # the description's prefill is whole; only the rewrite's shrinks
    r = costs.cost_model()["with_reuse"]
    assert all(r["describe_gpu_hours"][k] < e["gpu_hours"]["describe"] for k, e in costs.cost_model()["estimates"].items())
