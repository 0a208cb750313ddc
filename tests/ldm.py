"""Write a diffusers SD1 pipeline as a single-file checkpoint in the original (LDM) key layout.

The diffusers package converts LDM -> diffusers when it loads a single file, but has no
converter the other way for arbitrary sizes, so the tests carry this one. It covers the
SD1 layout (4 levels, cross-attention in the first three) at any width and depth.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_UNET_TOP = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _unet_prefixes(state: dict, layers: int, levels: int) -> list[tuple[str, str]]:
    out = []
    step = layers + 1
    for i in range(levels):
        for j in range(layers):
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * step + j}.0."),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * step + j}.1.")]
        for j in range(step):
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * step + j}.0."),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * step + j}.1.")]
        if i < levels - 1:
            # the upsampler follows the level's attention when it has one
            slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in state) else 1
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * step}.0.op."))
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * step + layers}.{slot}."))
    out += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
            ("mid_block.resnets.1.", "middle_block.2."),
            ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
    return out + _UNET_TOP


def _vae_prefixes(layers: int) -> list[tuple[str, str]]:
    out = []
    for i in range(4):
        out += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        out += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(layers + 1)]
        if i < 3:
            out += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.")]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        out.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    return out


def _rename(key: str, prefixes) -> str:
    for ours, theirs in prefixes:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def unet_to_ldm(state: dict, layers: int, levels: int = 4) -> dict:
    out = {}
    prefixes = _unet_prefixes(state, layers, levels)
    for key, value in state.items():
        new = _rename(key, prefixes)
        if "resnets." in key:
            for ours, theirs in _RESNET:
                new = new.replace(f".{ours}.", f".{theirs}.")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, layers: int) -> dict:
    out = {}
    prefixes = _vae_prefixes(layers)
    for key, value in state.items():
        new = _rename(key, prefixes).replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in new:
            for ours, theirs in _VAE_ATTENTION:
                new = new.replace(ours, theirs)
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
        out["first_stage_model." + new] = value
    return out


def text_to_ldm(state: dict) -> dict:
    # transformers 5 dropped the "text_model." level from CLIPTextModel's keys; LDM has it.
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


_OPENCLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
             ("embeddings.position_embedding.weight", "positional_embedding"), ("final_layer_norm.", "ln_final."),
             ("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def openclip_to_ldm(state: dict, prefix: str = "cond_stage_model.model.") -> dict:
    """OpenCLIP's layout (SD2): q, k and v stacked into one in_proj per layer."""
    out, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":  # OpenCLIP keeps the projection as a matrix applied from the right
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        if ".self_attn." in key and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            layer, proj, kind = key.rsplit(".", 2)
            qkv.setdefault((layer, kind), {})[proj] = value
            continue
        for ours, theirs in _OPENCLIP:
            key = key.replace(ours, theirs)
        out[prefix + key] = value
    for (layer, kind), parts in qkv.items():
        layer = layer.replace("encoder.layers.", "transformer.resblocks.").replace(".self_attn", ".attn")
        out[f"{prefix}{layer}.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def save_sd1_checkpoint(pipe, path: Path, layers: int, openclip: bool = False) -> Path:
    """SD1 layout; with openclip=True the text encoder in SD2's (OpenCLIP) layout."""
    text = openclip_to_ldm(pipe.text_encoder.state_dict()) if openclip else text_to_ldm(pipe.text_encoder.state_dict())
    state = {**unet_to_ldm(pipe.unet.state_dict(), layers), **vae_to_ldm(pipe.vae.state_dict(), layers), **text}
    save_file({k: v.contiguous().to(torch.float32) for k, v in state.items()}, str(path))
    return path


def save_sdxl_checkpoint(pipe, path: Path, layers: int) -> Path:
    """SDXL layout: 3 UNet levels, CLIP-L under embedders.0, OpenCLIP-bigG under embedders.1."""
    state = {**unet_to_ldm(pipe.unet.state_dict(), layers, levels=len(pipe.unet.config.block_out_channels)),
             **vae_to_ldm(pipe.vae.state_dict(), layers),
             **{"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                for k, v in pipe.text_encoder.state_dict().items()},
             **openclip_to_ldm(pipe.text_encoder_2.state_dict(), prefix="conditioner.embedders.1.model.")}
    save_file({k: v.contiguous().to(torch.float32) for k, v in state.items()}, str(path))
    return path


def build_tiny_xl_pipeline(inpainting: bool = False):
    """An SDXL-shaped pipeline of a few channels: 3 UNet levels with text-time embeddings, two text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from workers.tiny import SCHEDULER_CONFIG, build_tiny_pipeline, clip_byte_vocab

    base = build_tiny_pipeline(layers_per_block=2)
    vocab, merges = clip_byte_vocab()
    text = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=32 + 48,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu", **text)),
        # diffusers tells the two encoders apart by width, as 768 and 1280 are in the real model
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=32,
                                                                  hidden_act="gelu", **text)),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )
