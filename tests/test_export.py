"""`avatarforge export --format kohya`: the LoRA file ComfyUI and AUTOMATIC1111 load.

Checked three ways, none of them with our own converter's code:
- diffusers' own reader of kohya files (``load_lora_weights`` detects the format and converts
  back) must rebuild every LoRA layer of a trained adapter, bit for bit, with the same
  alpha / rank scale, and give the same image;
- ComfyUI's key rules (comfy/lora.py ``model_lora_keys_unet``/``model_lora_keys_clip``,
  comfy/utils.py ``unet_to_diffusers``, the SD 2.x configs of comfy/model_detection.py and
  comfy/text_encoders/sd2_clip_config.json), rewritten here, must recognise every key and land
  it on a weight of the right shape, on the full SD 2.1 architecture built on the meta device;
- AUTOMATIC1111's name rule (``convert_diffusers_name_to_compvis``) must land every UNet key on
  the same LDM module ComfyUI finds.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from avatarforge.adapter import METADATA_FILE, WEIGHTS_FILE, load_adapter
from avatarforge.base.pipeline import load_pipeline
from avatarforge.cli.common import Commands
from avatarforge.cli.export import register
from avatarforge.export import ExportError, diffusers_to_kohya, export_kohya
from avatarforge.fullsize import TEXT_ENCODER_CONFIG, UNET_CONFIG
from avatarforge.train.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, diffusers_layers

PROMPT = "a photo of <<TOK>> person"


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def exported(trained_adapter, tmp_path_factory):
    return export_kohya(trained_adapter, tmp_path_factory.mktemp("export") / "alice.safetensors")


# ---------------------------------------------------------------- diffusers reads it back


def _latents(pipe) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(0)
    # one DDIM step runs the text encoder and the UNet, so every LoRA layer of both, once
    out = pipe(
        PROMPT, num_inference_steps=1, height=64, width=64, generator=g, output_type="latent"
    )
    return out.images.numpy()


def _lora_layers(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, int]]:
    """module -> (A, B, scale, rank) of every LoRA layer peft put into ``model``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: (
            layer.lora_A["user"].weight.detach().clone(),
            layer.lora_B["user"].weight.detach().clone(),
            layer.scaling["user"],
            layer.r["user"],
        )
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


@pytest.fixture(scope="module")
def pipelines(trained_adapter, tiny_base, exported):
    """Our adapter loaded our way, and the exported file loaded by diffusers' kohya reader."""
    ours = load_pipeline(tiny_base, device="cpu")
    load_adapter(ours, trained_adapter, tiny_base, "user")
    theirs = load_pipeline(tiny_base, device="cpu")
    theirs.load_lora_weights(str(exported.path), adapter_name="user")
    return ours, theirs


def test_diffusers_rebuilds_every_lora_layer_bit_for_bit(pipelines, exported, trained_adapter):
    ours, theirs = pipelines
    tensors, _ = _read(exported.path)
    original, _ = _read(trained_adapter / WEIGHTS_FILE)
    pairs = len(original) // 2
    assert pairs == 56 and (exported.unet_pairs, exported.text_encoder_pairs) == (48, 8)
    assert len(tensors) == 3 * pairs  # down, up, alpha per pair: none dropped, none added
    for component in ("unet", "text_encoder"):
        a, b = _lora_layers(getattr(ours, component)), _lora_layers(getattr(theirs, component))
        assert a.keys() == b.keys() and a, component
        for name, (down, up, scale, rank) in a.items():
            down2, up2, scale2, rank2 = b[name]
            assert torch.equal(down, down2) and torch.equal(up, up2), name
            assert (scale, rank) == (scale2, rank2), name  # (d) alpha / rank kept exactly


def test_round_trip_gives_the_same_image(pipelines):
    ours, theirs = pipelines
    reference = _latents(ours)
    # exact: the conversion renames tensors and never recomputes them, so the fp16 values,
    # the alpha / rank scale and diffusers' arithmetic are all the same -> tolerance 0
    np.testing.assert_array_equal(_latents(theirs), reference)
    ours.disable_lora()
    try:
        base = _latents(ours)
    finally:
        ours.enable_lora()
    assert np.abs(base - reference).max() > 1e-3  # the adapter matters: this test can fail


def test_alpha_per_module_and_kohya_metadata(exported, trained_adapter):
    tensors, header = _read(exported.path)
    meta = json.loads((trained_adapter / METADATA_FILE).read_text())
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 56
    for key, alpha in alphas.items():
        want = meta["unet_alpha"] if key.startswith("lora_unet_") else meta["text_encoder_alpha"]
        rank = tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]
        assert alpha.ndim == 0 and alpha.item() == want and rank == 4, key
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "2.0")
    assert header["ss_v2"] == "True" and header["ss_base_model_version"] == "sd_v2"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert header["modelspec.trigger_phrase"] == "<<TOK>>" == meta["token"]
    assert header["avatarforge.base_hash"] == meta["base_hash"]


def test_same_adapter_same_bytes(exported, trained_adapter, tmp_path):
    again = export_kohya(trained_adapter, tmp_path / "alice.safetensors")
    assert again.path.read_bytes() == exported.path.read_bytes()


# ---------------------------------------------------------------- ComfyUI's key rules, rewritten

# comfy/utils.py: the LDM <-> diffusers names inside one attention block / resnet.
_ATTN = ("proj_in", "proj_out", "norm")
_BLOCK = (
    *("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"),
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
)
_RESNET = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
_BASIC = {
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
# comfy/lora.py LORA_CLIP_MAP
_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
         "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
         "self_attn.out_proj": "self_attn_out_proj"}  # fmt: skip
# comfy/model_detection.py: what ComfyUI reads off an SD 2.1 checkpoint
COMFY_SD21 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}  # fmt: skip
# comfy/text_encoders/sd2_clip_config.json (OpenCLIP ViT-H as a CLIPTextModel: all 24 layers)
COMFY_SD2_CLIP = {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096}


def comfy_unet_config(cfg: dict) -> dict:
    """ComfyUI's unet_config for a diffusers UNet config (its detection reads the same facts
    from an LDM checkpoint); output depths are listed from the highest resolution, as there."""
    per = cfg["layers_per_block"]
    down = [int("CrossAttn" in t) for t in cfg["down_block_types"] for _ in range(per)]
    up = [int("CrossAttn" in t) for t in cfg["up_block_types"] for _ in range(per + 1)]
    return {
        "num_res_blocks": [per] * len(cfg["block_out_channels"]),
        "channel_mult": [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
        "transformer_depth": down,
        "transformer_depth_middle": 1,
        "transformer_depth_output": up[::-1],
    }


def unet_to_diffusers(uc: dict) -> dict[str, str]:
    """diffusers module -> LDM module, by comfy/utils.py unet_to_diffusers' rules."""
    out: dict[str, str] = {}
    depth, depth_out = list(uc["transformer_depth"]), list(uc["transformer_depth_output"])

    def attention(diff: str, ldm: str, blocks: int) -> None:
        for b in _ATTN:
            out[f"{diff}.{b}"] = f"{ldm}.{b}"
        for t in range(blocks):
            for b in _BLOCK:
                out[f"{diff}.transformer_blocks.{t}.{b}"] = f"{ldm}.transformer_blocks.{t}.{b}"

    def resnet(diff: str, ldm: str) -> None:
        for ldm_name, diff_name in _RESNET.items():
            out[f"{diff}.{diff_name}"] = f"{ldm}.{ldm_name}"

    n_blocks, res = len(uc["channel_mult"]), uc["num_res_blocks"]
    for x in range(n_blocks):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if (d := depth.pop(0)) > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", uc["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    res = res[::-1]
    for x in range(n_blocks):
        n = (res[x] + 1) * x
        for i in range(res[x] + 1):
            c = 1
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            if (d := depth_out.pop()) > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
            if i == res[x]:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({diff: ldm for ldm, diff in _BASIC.items()})
    return out


def comfy_key_map(unet_cfg: dict, unet_weights: set[str], clip_layers: int) -> dict[str, str]:
    """LoRA name -> model weight, as comfy/lora.py builds it for an SD 2.x model: the LDM
    names themselves, the diffusers names through unet_to_diffusers, and the kohya text-encoder
    names of the clip_h model. ``unet_weights``: the diffusers UNet's weight names."""
    to_ldm = unet_to_diffusers(comfy_unet_config(unet_cfg))
    ldm_weights = {to_ldm[w[: -len(".weight")]] + ".weight" for w in unet_weights}
    key_map = {}
    for k in ldm_weights:
        key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = "diffusion_model." + k
    for diff, ldm in to_ldm.items():
        if ldm + ".weight" in ldm_weights:
            key_map["lora_unet_" + diff.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
    for b in range(clip_layers):
        for c, lora in _CLIP.items():
            weight = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            key_map[f"lora_te_text_model_encoder_layers_{b}_{lora}"] = weight
    return key_map


def _meta_models(unet_cfg: dict, te_cfg: dict):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return unet, text_encoder


def _meta_kohya(unet, text_encoder, unet_targets=UNET_TARGETS) -> dict[str, torch.Tensor]:
    """Our LoRA layers on meta models, saved as training saves them, converted to kohya."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(unet_targets)))
    text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TEXT_ENCODER_TARGETS))
    state = {f"unet.{k}": v for k, v in diffusers_layers(unet).items()}
    state |= {f"text_encoder.{k}": v for k, v in diffusers_layers(text_encoder).items()}
    return diffusers_to_kohya(state, {"unet": 8.0, "text_encoder": 8.0})


def _assert_comfy_loads_all(tensors, key_map, shapes):
    """comfy/lora.py load_lora over our file: each pair found by '{x}.lora_up.weight', with its
    '{x}.alpha'; no key left over ('lora key not loaded'); up @ down has the weight's shape."""
    loaded = set()
    for x, target in key_map.items():
        if f"{x}.lora_up.weight" in tensors:
            up, down = tensors[f"{x}.lora_up.weight"], tensors[f"{x}.lora_down.weight"]
            assert f"{x}.alpha" in tensors, x
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"}
            assert (up.shape[0], *down.shape[1:]) == shapes[target], (x, target)
    assert set(tensors) - loaded == set()


def _comfy_unet(unet_cfg: dict, unet) -> tuple[set[str], dict[str, tuple[int, ...]]]:
    """The diffusers UNet's weight names, and ComfyUI's LDM weights' shapes through the map
    (read before LoRA layers wrap the modules and rename their weights)."""
    weights = {k for k in unet.state_dict() if k.endswith(".weight")}
    to_ldm = unet_to_diffusers(comfy_unet_config(unet_cfg))
    shapes = {
        f"diffusion_model.{to_ldm[k[: -len('.weight')]]}.weight": tuple(p.shape)
        for k, p in unet.state_dict().items()
        if k in weights
    }
    return weights, shapes


def test_comfyui_recognises_every_key_on_full_sd21():
    assert comfy_unet_config(UNET_CONFIG) == COMFY_SD21  # our rewrite of its detection agrees
    unet, text_encoder = _meta_models(UNET_CONFIG, TEXT_ENCODER_CONFIG)
    weights, shapes = _comfy_unet(UNET_CONFIG, unet)
    # ComfyUI's map covers the whole UNet, one LDM weight per diffusers weight
    assert len(shapes) == len(weights) > 300
    # clip_h's weights, from ComfyUI's own SD 2 text-encoder config
    h, i = COMFY_SD2_CLIP["hidden_size"], COMFY_SD2_CLIP["intermediate_size"]
    clip = {"mlp.fc1": (i, h), "mlp.fc2": (h, i)} | {f"self_attn.{p}_proj": (h, h) for p in "qkvo"}
    clip["self_attn.out_proj"] = clip.pop("self_attn.o_proj")
    for b in range(COMFY_SD2_CLIP["num_hidden_layers"]):
        for c, shape in clip.items():
            shapes[f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"] = shape
    tensors = _meta_kohya(unet, text_encoder)
    assert len(tensors) == 3 * (16 * 8 + 23 * 4)  # 16 transformer blocks, 23 text layers
    key_map = comfy_key_map(UNET_CONFIG, weights, COMFY_SD2_CLIP["num_hidden_layers"])
    _assert_comfy_loads_all(tensors, key_map, shapes)


def test_comfyui_rules_hold_beyond_attention_on_full_sd21():
    """LoRA on every kind of UNet layer ComfyUI maps (linear, 1x1 and 3x3 convs) keeps mapping."""
    targets = (*UNET_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out",
               "linear_1", "linear_2")  # fmt: skip
    unet, text_encoder = _meta_models(UNET_CONFIG, TEXT_ENCODER_CONFIG)
    weights, shapes = _comfy_unet(UNET_CONFIG, unet)
    tensors = {k: v for k, v in _meta_kohya(unet, text_encoder, targets).items() if "_unet_" in k}
    assert any(t.ndim == 4 and t.shape[-1] == 3 for t in tensors.values())  # 3x3 convs too
    assert any("downsamplers" in k for k in tensors) and any("time_embedding" in k for k in tensors)
    _assert_comfy_loads_all(tensors, comfy_key_map(UNET_CONFIG, weights, 0), shapes)


def test_comfyui_recognises_every_key_of_the_trained_tiny_adapter(exported, tiny_base):
    """The same rules on the tiny base (another block layout: attention only at low resolution)."""
    unet_cfg = json.loads((tiny_base.path / "unet" / "config.json").read_text())
    unet_cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    te_cfg = json.loads((tiny_base.path / "text_encoder" / "config.json").read_text())
    unet, text_encoder = _meta_models(unet_cfg, te_cfg)
    weights, shapes = _comfy_unet(unet_cfg, unet)
    for name, p in text_encoder.state_dict().items():
        shapes[f"clip_h.transformer.text_model.{name}"] = tuple(p.shape)
    tensors, _ = _read(exported.path)
    key_map = comfy_key_map(unet_cfg, weights, te_cfg["num_hidden_layers"])
    _assert_comfy_loads_all(tensors, key_map, shapes)


# ---------------------------------------------------------------- AUTOMATIC1111's name rule


def a1111_compvis(key: str) -> str:
    """extensions-builtin/Lora convert_diffusers_name_to_compvis, is_sd2=True, for the names
    this exporter writes (its SD 2.x rule hard-codes 3 LDM blocks per level)."""
    res = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
           "conv_shortcut": "skip_connection"}  # fmt: skip
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        side, b, kind, i, rest = m.groups()
        suffix = res.get(rest, rest) if kind == "resnets" else rest
        block = 1 + int(b) * 3 + int(i) if side == "down" else int(b) * 3 + int(i)
        ldm = "input_blocks" if side == "down" else "output_blocks"
        return f"diffusion_model_{ldm}_{block}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m.groups()
        suffix = res.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else int(i) * 2}_{suffix}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        i, rest = m.groups()
        rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
        return f"model_transformer_resblocks_{i}_{rest.replace('self_attn', 'attn')}"
    return key


def test_automatic1111_finds_the_modules_comfyui_finds():
    unet, text_encoder = _meta_models(UNET_CONFIG, TEXT_ENCODER_CONFIG)
    weights = {k for k in unet.state_dict() if k.endswith(".weight")}
    key_map = comfy_key_map(UNET_CONFIG, weights, COMFY_SD2_CLIP["num_hidden_layers"])
    tensors = _meta_kohya(unet, text_encoder)
    names = {k.removesuffix(".alpha") for k in tensors if k.endswith(".alpha")}
    for name in names:
        compvis = a1111_compvis(name)
        if name.startswith("lora_unet_"):
            ldm = key_map[name].removeprefix("diffusion_model.").removesuffix(".weight")
            assert compvis == "diffusion_model_" + ldm.replace(".", "_"), name
        else:  # OpenCLIP: q/k/v are slices of the block's MultiheadAttention in_proj
            assert re.fullmatch(
                r"model_transformer_resblocks_([0-9]|1[0-9]|2[0-3])_(attn_[qkv]_proj|"
                r"attn_out_proj|mlp_c_fc|mlp_c_proj)",
                compvis,
            ), name


# ---------------------------------------------------------------- refusals


def _pair(module: str, rank: int = 2, dim: int = 8) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora.down.weight": torch.zeros(rank, dim),
        f"{module}.lora.up.weight": torch.zeros(dim, rank),
    }


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"unet.x.lora_magnitude_vector": torch.zeros(2)}, "not a LoRA down/up matrix"),
        ({"unet.a.lora.down.weight": torch.zeros(2, 8)}, "up matrix is missing"),
        (_pair("text_encoder_2.encoder.layers.0.self_attn.q_proj"), "'unet' and 'text_encoder'"),
        (_pair("text_encoder.text_projection"), "would be ignored there"),
        (_pair("unet.a_b.c") | _pair("unet.a.b_c"), "both map to lora_unet_a_b_c"),
        (
            {
                "unet.a.lora.down.weight": torch.zeros(2, 8),
                "unet.a.lora.up.weight": torch.zeros(8, 3),
            },
            "not a LoRA pair",
        ),
        ({}, "no LoRA pairs"),
    ],
    ids=["dora", "half", "te2", "te-projection", "collision", "shapes", "empty"],
)
def test_what_cannot_be_exported_is_refused_by_name(state, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        diffusers_to_kohya(state, {"unet": 1.0, "text_encoder": 1.0})


def test_peft_and_transformers_4_spellings_give_the_same_names():
    attn, fc1 = (
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder.text_model.encoder.layers.3.mlp.fc1",
    )
    a = diffusers_to_kohya(
        {
            f"{attn}.lora_A.weight": torch.ones(2, 8),
            f"{attn}.lora_B.weight": torch.ones(8, 2),
            f"{fc1}.lora_linear_layer.down.weight": torch.ones(2, 8),
            f"{fc1}.lora_linear_layer.up.weight": torch.ones(8, 2),
        },
        {"unet": 1.0, "text_encoder": 2.0},
    )
    assert sorted(a) == [
        "lora_te_text_model_encoder_layers_3_mlp_fc1.alpha",
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_down.weight",
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
    ]
    assert a["lora_te_text_model_encoder_layers_3_mlp_fc1.alpha"].item() == 2.0


def test_an_alpha_that_disagrees_with_the_weights_file_is_refused(trained_adapter, tmp_path):
    adapter = shutil.copytree(trained_adapter, tmp_path / "adapter")
    meta = json.loads((adapter / METADATA_FILE).read_text())
    meta["unet_alpha"] = 8.0
    (adapter / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="lora_alpha 2.0 in the weights file differs from 8.0"):
        export_kohya(adapter, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cli():
    # the root app's group class: it turns an AvatarforgeError into "error: ..." (exit code 1)
    app = typer.Typer(cls=Commands)
    app.callback()(lambda: None)  # a group, so the command keeps its name as in the root app
    register(app)
    return app


def test_export_command_writes_the_file_and_says_how_to_use_it(cli, trained_adapter, tmp_path):
    runner = CliRunner()
    out = tmp_path / "alice.safetensors"
    args = ["export", "alice", "--adapter", str(trained_adapter), "--out", str(out)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "48 UNet + 8 text-encoder" in result.output
    assert "models/loras" in result.output and "<lora:alice:1>" in result.output
    assert "<<TOK>>" in result.output
    assert "random weights for tests" in result.output  # the tiny base is of no use there
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and "replaced" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such"], "USER: 'no/such' is not a valid user id"),
        (["alice", "--format", "lycoris"], "--format: must be one of kohya"),
        (["alice", "--out", "x.bin"], "must end in .safetensors"),
        (["alice", "--adapter", "/nonexistent"], "is not an adapter folder"),
    ],
)
def test_export_command_errors_name_the_input(cli, args, message):
    result = CliRunner().invoke(cli, ["export", *args])
    assert result.exit_code == 1
    assert message in result.output.replace("\n", "") and "Traceback" not in result.output
