"""Prompt embeddings with the webui's "Clip skip".

diffusers 0.42's own clip_skip path reaches for `text_encoder.text_model`, which
transformers 5 removed (CLIPTextModel is flat now), so farm takes the hidden state
itself: the output of the N-th layer from the end, through the final layer norm,
as the webui does.
"""

from __future__ import annotations

from typing import Sequence

import torch


def encode(pipe, prompts: Sequence[str], clip_skip: int) -> torch.Tensor:
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    encoder = pipe.text_encoder
    out = encoder(tokens, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(hidden).to(dtype=encoder.dtype)


def embeddings(pipe, prompts: Sequence[str], negatives: Sequence[str], clip_skip: int) -> dict:
    """Keyword arguments for a pipeline call: plain prompts, or embeddings when layers are skipped."""
    if clip_skip <= 1:
        return {"prompt": list(prompts), "negative_prompt": list(negatives)}
    return {"prompt_embeds": encode(pipe, prompts, clip_skip),
            "negative_prompt_embeds": encode(pipe, negatives, clip_skip)}
